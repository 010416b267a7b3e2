"""Where ``--profile auto`` stops being trustworthy: the estimate on central crops of whole scans.

    .venv/bin/python benchmarks/profile_estimate_fov.py runs/split/heldout/ct07_from175.nii.gz \
        runs/split/heldout/ct02_from80.nii.gz runs/split/heldout/ct08_from100.nii.gz \
        --json docs/results/profile_fov.json

For each volume and central in-plane crop (the whole field of view, then smaller squares), prints the fraction of
the crop's in-plane border that lies in the body (above -500 HU) and the FWHM error of the estimate for Gaussian
profiles of 1.0x and 1.6x the 5 mm spacing (docs/design/clinical.md: why --profile auto is not the default).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from thinslice.degrade.estimate import estimate_profile
from thinslice.degrade.profiles import degrade
from thinslice.io import read_volume

SIZES = (None, 448, 384, 320, 256)
RATIOS = (1.0, 1.6)


def border_body_fraction(thick) -> float:
    """Fraction of the in-plane border pixels (8 slices spread over the stack) above -500 HU."""
    hu = thick.slices_first()
    body = hu[np.unique(np.linspace(0, hu.shape[0] - 1, 8).round().astype(int))] > -500.0
    return float(np.concatenate([body[:, 0, :], body[:, -1, :], body[:, :, 0], body[:, :, -1]], axis=1).mean())


def _crop(volume, size: int | None):
    """The central ``size`` x ``size`` pixels of every slice (None: the whole field of view)."""
    hu = volume.slices_first()
    if size is None or size >= min(hu.shape[1:]):
        return volume
    a, b = ((n - size) // 2 for n in hu.shape[1:])
    return volume.with_slices(hu[:, a:a + size, b:b + size], volume.slice_spacing, 0.0, volume.slice_thickness)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("volumes", nargs="+")
    parser.add_argument("--spacing-mm", type=float, default=5.0)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    rows = []
    for path in args.volumes:
        thin = read_volume(path)
        for size in SIZES:
            crop = _crop(thin, size)
            row = {"volume": Path(path).name, "crop": size or "whole", "border_body": None}
            for ratio in RATIOS:
                thick = degrade(crop, thickness=ratio * args.spacing_mm, spacing=args.spacing_mm, profile="gaussian")
                row["border_body"] = round(border_body_fraction(thick), 3)
                row[f"error_{ratio:g}x_pct"] = round(100 * (estimate_profile(thick).ratio / ratio - 1), 1)
            rows.append(row)
            print("  ".join(f"{k} {v}" for k, v in row.items()), flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
