"""Inference-side design points of ``planes`` on ct02's held-out slices (x4 gaussian): orientations, precision, the
final projection, adaptation.

    .venv/bin/python benchmarks/planes_design_points.py [--data runs/data/ct02_upper61.nii.gz] \
        [--checkpoint runs/planes_main/final]

Prints PSNR, SSIM and seconds per variant (docs/design/planes.md#inference-side-design-points).
"""

from __future__ import annotations

import argparse
import time

from thinslice.degrade.pairs import simulate_pair
from thinslice.evaluate.metrics import evaluate_volumes
from thinslice.infer.upsample import upsample
from thinslice.io import read_volume

VARIANTS = [("both, bf16", {}), ("coronal only", {"orientations": "coronal"}),
            ("sagittal only", {"orientations": "sagittal"}), ("both, fp32", {"precision": "fp32"}),
            ("both, no final projection", {"consistency": False}),
            ("adapt (<=1500 steps / 180 s)", {"adapt": True})]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default="runs/data/ct02_upper61.nii.gz")
    parser.add_argument("--checkpoint", default="runs/planes_main/final")
    args = parser.parse_args()
    thin = read_volume(args.data)
    thick, truth = simulate_pair(thin, factor=4, profile="gaussian")
    for label, options in VARIANTS:
        start = time.perf_counter()
        out = upsample(thick, thin.slice_spacing, method="planes", checkpoint=args.checkpoint, **options)
        scores = evaluate_volumes(out, truth)
        print(f"{label:32s} PSNR {scores['psnr']:.2f}  SSIM {scores['ssim']:.4f}  {time.perf_counter() - start:.1f} s",
              flush=True)


if __name__ == "__main__":
    main()
