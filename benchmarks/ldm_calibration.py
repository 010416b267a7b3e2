"""Calibration of the ldm std map on a held-out volume: rank correlation of std with |error|, coverage of
mean +- 2 std, and one PNG of the error beside the std (docs/design/diffusion.md).

    .venv/bin/python benchmarks/ldm_calibration.py --data runs/data/ct02_upper61.nii.gz --samples 8 \\
        [--checkpoint DIR] [--factor 4] [--profile gaussian] --out docs/images/ldm_calibration.png

The volume is degraded (factor, profile), upsampled with ``--method ldm --samples N`` (the same call as
``thinslice upsample ... --samples N``, which writes the std map), and scored against the thin truth in the body.
Prints a JSON line; the PNG shows a coronal slice: truth, mean, |mean - truth| and std, on one HU scale.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

from thinslice.degrade.pairs import simulate_pair
from thinslice.evaluate.calibration import calibration
from thinslice.evaluate.metrics import psnr
from thinslice.infer.upsample import run_method
from thinslice.io import read_volume


def save_figure(path: Path, truth: np.ndarray, mean: np.ndarray, std: np.ndarray, spacing: tuple[float, float],
                title: str) -> None:
    """Coronal slice through the middle: truth, mean, |error| and std on one scale (is the std's size right?), and
    std on its own scale (does it point at the errors?)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    row = truth.shape[1] // 2
    views = [truth[:, row], mean[:, row], np.abs(mean - truth)[:, row], std[:, row], std[:, row]]
    top = float(np.percentile(views[2], 99.5))
    own = float(np.percentile(views[3], 99.5))
    names = ["truth", "mean of samples", "|mean - truth| (HU)", "std of samples (HU, same scale)",
             f"std of samples (HU, own scale, 0-{own:.0f})"]
    aspect = spacing[0] / spacing[1]
    fig, axes = plt.subplots(5, 1, figsize=(9, 11))
    for i, (ax, img, name) in enumerate(zip(axes, views, names, strict=True)):
        kw = {"cmap": "gray", "vmin": -1000, "vmax": 600} if i < 2 else {"cmap": "magma", "vmin": 0, "vmax": top}
        if i == 4:
            kw["vmax"] = own
        im = ax.imshow(img, aspect=aspect, origin="lower", **kw)
        ax.set_title(name)
        ax.axis("off")
        if i >= 2:
            fig.colorbar(im, ax=ax, fraction=0.046)
    fig.suptitle(title)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", required=True, help="thin held-out volume")
    parser.add_argument("--checkpoint", default=None, help="ldm bundle (default: shipped)")
    parser.add_argument("--samples", type=int, default=8)
    parser.add_argument("--factor", type=float, default=4.0)
    parser.add_argument("--profile", default="gaussian")
    parser.add_argument("--precision", default="bf16")
    parser.add_argument("--out", type=Path, default=Path("docs/images/ldm_calibration.png"))
    args = parser.parse_args()
    thin = read_volume(args.data)
    thick, truth = simulate_pair(thin, factor=args.factor, profile=args.profile)
    start = time.perf_counter()
    result = run_method(thick, truth.slice_spacing, "ldm", checkpoint=args.checkpoint, samples=args.samples,
                             precision=args.precision, profile=args.profile, progress=False)
    seconds = time.perf_counter() - start
    n = min(result.volume.num_slices, truth.num_slices)
    mean = result.volume.slices_first()[:n]
    std = result.extras["std"].slices_first()[:n]
    ref = truth.slices_first()[:n]
    scores = {"data": Path(args.data).name, "factor": args.factor, "profile": args.profile, "samples": args.samples,
              "psnr_mean": psnr(mean, ref), "seconds": seconds, **calibration(mean, std, ref)}
    print(json.dumps(scores))
    save_figure(args.out, ref, mean, std, (truth.slice_spacing, truth.spacing[0]),
                f"ldm, {args.samples} samples, x{args.factor:g} {args.profile}: coverage(2 std) "
                f"{scores['coverage_2std']:.2f}, Spearman std~|error| voxel {scores['spearman_voxel']:.2f} / "
                f"block {scores['spearman_block']:.2f}")


if __name__ == "__main__":
    main()
