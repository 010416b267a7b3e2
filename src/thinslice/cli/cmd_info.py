"""``thinslice info``: geometry and HU range of a volume file or DICOM series, in one compact block."""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # numpy, SimpleITK and the readers are imported where used, so that the CLI starts fast
    from thinslice.io.volume import Volume

_AXIS_NAMES = "ijk"


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "info",
        help="show shape, spacing, orientation, slice axis and HU range of a volume",
        description="Print the geometry (shape, spacing, origin, direction, slice axis, slice thickness) and the HU "
                    "range of a NIfTI/NRRD/MHA file, a DICOM file or a folder holding a DICOM series.",
    )
    parser.add_argument("path", metavar="FILE_OR_DIR", help="volume file, DICOM file or DICOM series folder")
    parser.add_argument("--series", metavar="UID", default=None,
                        help="series to read when the folder holds several (its SeriesNumber or UID; without it a "
                             "folder of several series is listed, one line each)")
    parser.set_defaults(func=run)


def describe_volume(volume: Volume, name: str = "") -> str:
    """The compact text block that ``thinslice info`` prints."""
    import numpy as np
    import SimpleITK as sitk

    axis = volume.slice_axis
    direction = volume.direction
    orientation = sitk.DICOMOrientImageFilter.GetOrientationFromDirectionCosines(
        [float(v) for v in direction.ravel()])
    patient_axis = ["LR", "AP", "SI"][int(np.argmax(np.abs(direction[:, axis])))]
    array = volume.array
    lines = []
    if name:
        lines.append(f"file:            {name}")
    lines += [
        f"shape (i,j,k):   {' x '.join(str(n) for n in volume.shape_ijk)}   (numpy {tuple(array.shape)})",
        f"spacing (mm):    {' x '.join(f'{s:.4g}' for s in volume.spacing)}",
        f"origin (mm):     ({', '.join(f'{o:.2f}' for o in volume.origin)})",
        "direction:       " + "  ".join("[" + " ".join(f"{round(v, 3) + 0.0:+.3f}" for v in direction[:, c]) + "]"
                                        for c in range(3)) + f"   (columns i j k, {orientation})",
        f"slice axis:      {_AXIS_NAMES[axis]} ({patient_axis}), {volume.num_slices} slices every "
        f"{volume.slice_spacing:.4g} mm, extent {volume.num_slices * volume.slice_spacing:.1f} mm",
        "slice thickness: " + (f"{volume.slice_thickness:.4g} mm" if volume.slice_thickness else "not recorded"),
        f"HU range:        {array.min():.0f} .. {array.max():.0f}   (mean {array.mean():.0f}, "
        f"1st-99th percentile {np.percentile(array[::2, ::2, ::2], 1):.0f} .. "
        f"{np.percentile(array[::2, ::2, ::2], 99):.0f})",
    ]
    extra = {k: v for k, v in volume.metadata.items() if k not in ("source", "series_uid", "study_uid",
                                                                  "dicom_source")}
    if "series_uid" in volume.metadata:
        lines.append(f"series:          {volume.metadata['series_uid']}")
    if extra:
        lines.append("metadata:        " + "; ".join(f"{k}={v}" for k, v in sorted(extra.items())))
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from thinslice.io.readers import read_dicom_folder, read_volume

    path = Path(args.path)
    if not path.is_dir():
        volume = read_volume(path, series_uid=args.series)
    else:
        from thinslice.io.discovery import scan_dicom_folder

        scan = scan_dicom_folder(path)
        if args.series is None and len(scan.volumes) > 1:
            print(f"{path}: {len(scan.volumes)} image series; `thinslice info {path} --series NUMBER` (or UID) "
                  "shows one")
            print("\n".join(scan.listing()))
            return 0
        volume = read_dicom_folder(path, args.series, scan=scan)
    print(describe_volume(volume, args.path))
    return 0
