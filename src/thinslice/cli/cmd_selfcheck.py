"""``thinslice selfcheck``: which method works best on *your* thick scan, scored without thin truth."""

from __future__ import annotations

import argparse
import json

from thinslice.degrade.profiles import PROFILES


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "selfcheck",
        help="score the methods on your own thick scan (no thin truth needed) and recommend one",
        description="Degrade IN along its slice axis by --factor (e.g. 5 mm -> 20 mm) and restore it to its own "
                    "slices; and degrade an in-plane axis (fine pixels) to IN's slice thickness and restore it to "
                    "thickness / factor. Each method is scored against what IN itself holds (PSNR, SSIM, body "
                    "HU-MAE, mean of both checks); the best PSNR is recommended.",
    )
    parser.add_argument("input", metavar="IN", help="thick-slice volume file or DICOM series folder")
    parser.add_argument("--methods", nargs="+", default=["linear", "cubic", "cubic-dc", "planes"],
                        help="methods to compare (as in thinslice bench: also ldm, cnn, planes@auto, ...)")
    parser.add_argument("--factor", type=int, default=4, help="degradation factor of the checks (default 4)")
    parser.add_argument("--profile", choices=PROFILES, default="gaussian",
                        help="slice profile the checks simulate (default gaussian)")
    parser.add_argument("--no-inplane", action="store_true", help="only the through-plane check")
    parser.add_argument("--checkpoint", default=None, help="model bundle folder (default: shipped weights)")
    parser.add_argument("--precision", choices=("fp32", "bf16"), default="bf16",
                        help="learned methods' precision (default bf16)")
    parser.add_argument("--series", metavar="UID", default=None, help="series to read from a multi-series folder")
    parser.add_argument("--json", action="store_true",
                        help='print {"methods": {NAME: {"psnr", "ssim", "mae_hu_body"}}, "recommended": NAME, ...}')
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from thinslice.evaluate.selfcheck import format_selfcheck, run_selfcheck
    from thinslice.io import read_volume

    scan = read_volume(args.input, series_uid=args.series)
    result = run_selfcheck(scan, Path(args.input).name, args.methods, args.factor, args.profile,
                           inplane=not args.no_inplane, checkpoint=args.checkpoint, precision=args.precision)
    print(json.dumps(result.as_json(), indent=1) if args.json else format_selfcheck(result))
    return 0
