"""Upsample a real thick-slice scan (no thin truth) with several methods; time each (ldm per stage); save the views.

    .venv/bin/python benchmarks/real_thick.py THICK.nii.gz --spacing 1.25 --out real_out \
        [--methods cubic cubic-dc planes ldm] [--checkpoint DIR] [--steps 4] [--precision bf16] [--threads 2] [--write]

Prints seconds per LDM stage (prior, encode, decode of the prior's latent, sampling, decode, consistency), the total and
the peak resident memory, and writes ``views.png`` (axial, coronal and sagittal planes of the thick input and of each
result at true physical aspect) and ``timings.json`` into ``--out``; ``--write`` also writes the volumes.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from thinslice.evaluate.figures import save_comparison_figure
from thinslice.infer import upsample
from thinslice.infer.upsample import get_method, run_method
from thinslice.io import read_volume, write_volume
from thinslice.io.atomic import write_text_atomic
from thinslice.memory import process_peak_mb


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("input", help="thick-slice volume (file or DICOM folder)")
    parser.add_argument("--spacing", type=float, required=True, help="output slice spacing (mm)")
    parser.add_argument("--out", default="real_out")
    parser.add_argument("--methods", nargs="+", default=["cubic", "cubic-dc", "ldm"])
    parser.add_argument("--checkpoint", default=None, help="model bundle (default: the shipped weights)")
    parser.add_argument("--steps", type=int, default=None, help="ResShift steps (default: the model's)")
    parser.add_argument("--precision", choices=("fp32", "bf16"), default="bf16")
    parser.add_argument("--profile", default="gaussian", help="assumed slice profile of the input")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--write", action="store_true", help="also write the upsampled volumes")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    thick = read_volume(args.input)
    results, seconds = {}, {}
    report: dict[str, object] = {"input": str(args.input), "thick_shape": list(thick.slices_first().shape),
                                 "threads": torch.get_num_threads(), "precision": args.precision}
    for method in args.methods:
        if method == "ldm":
            start = time.perf_counter()
            ldm = run_method(thick, args.spacing, "ldm", checkpoint=args.checkpoint, steps=args.steps,
                             precision=args.precision, device=args.device, profile=args.profile, progress=True)
            seconds["ldm"] = time.perf_counter() - start
            results["ldm"] = ldm.volume
            report.update({"ldm_stages_s": ldm.volume.metadata.get("ldm_timing_s"),
                           "consistency_hu": ldm.volume.metadata.get("consistency_hu")})
            continue
        entry = get_method(method)
        options: dict[str, object] = {"profile": args.profile} if entry.uses_profile else {}
        if entry.needs_weights:
            options.update({"checkpoint": args.checkpoint, "precision": args.precision, "progress": True})
        start = time.perf_counter()
        results[method] = upsample(thick, args.spacing, method=method, **options)
        seconds[method] = time.perf_counter() - start
    report.update({"thin_shape": list(next(iter(results.values())).slices_first().shape), "seconds": seconds,
                   "peak_rss_gb": process_peak_mb() / 1024})
    print(json.dumps(report, indent=1, default=str))
    panels = {f"thick input ({thick.slice_spacing:g} mm)": thick}
    panels.update({f"{name} ({args.spacing:g} mm)": vol for name, vol in results.items()})
    save_comparison_figure(panels, out / "views.png", title=f"{Path(args.input).name}: {thick.slice_spacing:g} mm "
                           f"-> {args.spacing:g} mm")
    write_text_atomic(out / "timings.json", json.dumps(report, indent=1, default=str))
    if args.write:
        for name, vol in results.items():
            write_volume(vol, out / f"{name.replace(' ', '_')}.nii.gz", reference_input=args.input)
    print(f"wrote {out / 'views.png'}, {out / 'timings.json'}")


if __name__ == "__main__":
    main()
