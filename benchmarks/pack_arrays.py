"""Pack CT volumes as compact arrays for the one-call GPU recipe (``benchmarks/gpu_recipe.py``): int16 HU with
their geometry in a compressed .npz, cropped in-plane to the body (air beyond it carries nothing), so the recipe
needs no SimpleITK and the data travel in a few tens of MB.

    python benchmarks/pack_arrays.py --out .gpu/data runs/data/ct02_lower80.nii.gz ... \\
        --heldout runs/data/ct02_upper61.nii.gz
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from thinslice.io.volume import Volume

BODY_HU = -500.0
MARGIN = 4


def body_crop(vol: Volume) -> Volume:
    """The volume cropped in-plane to the bounding box of voxels above -500 HU (plus a margin); slices all kept."""
    a = vol.array
    keep = []
    for axis in range(3):
        if axis == vol.numpy_axis(vol.slice_axis):
            keep.append((0, a.shape[axis]))
            continue
        hits = np.where((a > BODY_HU).any(axis=tuple(j for j in range(3) if j != axis)))[0]
        lo, hi = (0, a.shape[axis]) if hits.size == 0 else (hits[0], hits[-1] + 1)
        keep.append((max(int(lo) - MARGIN, 0), min(int(hi) + MARGIN, a.shape[axis])))
    start_ijk = np.array([keep[2][0], keep[1][0], keep[0][0]], dtype=np.float64)
    origin = np.asarray(vol.origin) + vol.direction @ (start_ijk * np.asarray(vol.spacing))
    array = a[tuple(slice(lo, hi) for lo, hi in keep)]
    return Volume(np.ascontiguousarray(array), vol.spacing, tuple(origin), vol.direction, vol.slice_thickness)


def save_npz(vol: Volume, path: Path) -> None:
    np.savez_compressed(path, array=np.rint(vol.array).astype(np.int16), spacing=np.asarray(vol.spacing),
                        origin=np.asarray(vol.origin), direction=np.asarray(vol.direction).ravel())


def main(argv: list[str] | None = None) -> int:
    from thinslice.io import read_volume

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("volumes", nargs="+", type=Path)
    p.add_argument("--heldout", nargs="*", type=Path, default=[])
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    for path, tag in [*((v, "") for v in args.volumes), *((v, "_heldout") for v in args.heldout)]:
        stem = path.name.split(".")[0]
        save_npz(body_crop(read_volume(path)), args.out / f"{stem}{tag}.npz")
        print(f"{args.out / (stem + tag)}.npz", f"{(args.out / (stem + tag + '.npz')).stat().st_size / 1e6:.1f} MB")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
