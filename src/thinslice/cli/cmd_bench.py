"""``thinslice bench``: every method on every simulated case of a data folder, as one table."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from thinslice.cli.checks import FACTOR, ranged
from thinslice.degrade.profiles import PROFILES

log = logging.getLogger("thinslice.cli")


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "bench",
        help="benchmark upsampling methods on thin volumes (simulated thick slices), one table",
        description="For each volume x factor x slice profile, simulate thick slices, upsample them back with each "
                    "method and score against the thin truth: PSNR, SSIM, HU-MAE (body), data-consistency residual, "
                    "seconds, peak memory. Prints a table and writes bench.json, bench.md and a PNG of one case.",
    )
    parser.add_argument("--data", nargs="+", required=True,
                        help="thin-slice volumes: files, folders of NIfTI/NRRD/MHA, or split .txt files")
    parser.add_argument("--out", default="bench_out", help="folder for bench.json, bench.md, bench.png")
    parser.add_argument("--factors", type=FACTOR, nargs="*", default=[2.0, 4.0],
                        help="factor cases (thick spacing = factor x the volume's spacing); none with --mm only")
    parser.add_argument("--profiles", nargs="+", default=["gaussian", "decimate"], choices=PROFILES,
                        help="slice profiles to simulate (triangle, trapezoid, tailed: profiles the methods are not "
                             "told unless they are; see NAME@auto in --methods)")
    parser.add_argument("--mm", nargs="*", default=[], metavar="T[/S]",
                        help="clinical cases named in millimetres, back to each volume's own spacing: 5 (5 mm slices "
                             "every 5 mm), 5/2.5 (5 mm every 2.5 mm), ...; e.g. --mm 5 3 5/2.5 2/1 on a 1 mm volume")
    parser.add_argument("--overlaps", type=ranged(float, 1, 16), nargs="*", default=[], metavar="RATIO",
                        help="extra cases with overlapping slices: slice thickness = RATIO x slice spacing (e.g. 1.5 2 "
                             "3), for the gaussian and box profiles")
    parser.add_argument("--methods", nargs="+", default=["linear", "cubic", "cubic-dc", "planes", "cnn", "ldm"],
                        help="any upsample method (linear, cubic, cubic-dc, planes, cnn, ldm) and the variants "
                             "cnn-adapt, ldm-N (N steps), ldm-meanN (mean of N samples), ldm-cfgW (guidance scale W); "
                             "NAME@auto: told --profile auto, NAME@gaussian: told a Gaussian of the nominal thickness, "
                             "instead of the simulated profile; "
                             "learned methods without "
                             "weights are skipped with a note")
    parser.add_argument("--checkpoint", default=None, help="model bundle folder (default: shipped weights)")
    parser.add_argument("--device", default=None, help="torch device for learned methods (default: auto)")
    parser.add_argument("--precision", choices=("fp32", "bf16"), default=None,
                        help="learned methods: bf16 autocast (about twice as fast on a CPU; default fp32)")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from thinslice.evaluate.bench import markdown_table, parse_methods, parse_mm_case, run_benchmark, write_results
    from thinslice.infer.upsample import get_method
    from thinslice.io.prepare import resolve_data_paths

    specs = []
    for spec in parse_methods(args.methods, args.checkpoint, args.device, args.precision):
        if get_method(spec.method).needs_weights and not get_method(spec.method).has_weights(args.checkpoint):
            log.info(f"note: no weights for '{spec.label}' "
                     f"({'--checkpoint ' + args.checkpoint if args.checkpoint else 'shipped'}); skipped")
            continue
        specs.append(spec)
    out = Path(args.out)
    rows = run_benchmark(resolve_data_paths(args.data), args.factors, args.profiles, specs,
                         figure_path=out / "bench.png", overlaps=args.overlaps,
                         mm_cases=[parse_mm_case(text) for text in args.mm], out_dir=out)
    json_path, md_path = write_results(rows, out)
    print()
    print(markdown_table(rows))
    print(f"wrote {json_path}, {md_path}, {out / 'bench.png'}")
    return 0
