"""``thinslice degrade``: simulate a thick-slice acquisition from a thin-slice CT (box, Gaussian or decimation)."""

from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path
from typing import TYPE_CHECKING

from thinslice.cli.checks import (
    FACTOR,
    check_input,
    check_mm,
    check_output,
    check_output_path,
    check_positive,
    note_replaced,
    output_exists,
)
from thinslice.degrade.profiles import PROFILES
from thinslice.errors import ThinsliceError

if TYPE_CHECKING:
    from thinslice.io.volume import Volume

log = logging.getLogger("thinslice.cli")


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "degrade",
        help="simulate thick slices from a thin-slice volume",
        description="Average (box, gaussian) or pick (decimate) thin slices into thick slices along the slice axis. "
                    "Give --factor K (thickness = spacing = K x input spacing; non-integer allowed) or --thickness "
                    "in mm with an optional --spacing (overlapping slices when spacing < thickness).",
    )
    parser.add_argument("input", metavar="IN", help="thin-slice volume file or DICOM series folder")
    parser.add_argument("output", metavar="OUT", help="output file (.nii.gz, .nrrd, .mha) or folder for DICOM")
    size = parser.add_mutually_exclusive_group(required=True)
    size.add_argument("--factor", type=FACTOR, help="thick slice = FACTOR thin slices (e.g. 4 or 2.5; 1 to 64)")
    size.add_argument("--thickness", type=float, metavar="MM", help="thick slice thickness in mm")
    parser.add_argument("--spacing", type=float, metavar="MM", default=None,
                        help="thick slice spacing in mm (with --thickness; default: the thickness)")
    parser.add_argument("--profile", choices=PROFILES, default="gaussian",
                        help="slice profile (default: gaussian with FWHM = thickness)")
    parser.add_argument("--series", metavar="UID", default=None, help="series to read from a multi-series folder")
    parser.add_argument("--dtype", choices=("int16", "float32"), default="int16",
                        help="output voxel type for file outputs (default: int16 HU)")
    parser.add_argument("--overwrite", action="store_true", help="replace OUT when it exists (default: refuse)")
    parser.set_defaults(func=run)


def refuse_same_path(output: str, *inputs: str) -> None:
    """Fail before any work when the output would replace (or contain) an input (a symbolic-link loop, which
    cannot be compared, first: one line instead of the traceback of ``Path.resolve``)."""
    from thinslice.io.writers import refuse_overwriting_input

    check_output_path(output)
    for item in inputs:
        check_input(item)
    for item in inputs:
        refuse_overwriting_input(Path(output), Path(item))


def run(args: argparse.Namespace) -> int:
    from thinslice.degrade.profiles import degrade
    from thinslice.io import read_volume, write_volume

    if args.spacing is not None and args.thickness is None:
        raise ThinsliceError("--spacing goes with --thickness; with --factor the spacing is factor x input spacing")
    check_input(args.input)
    refuse_same_path(args.output, args.input)
    check_positive(args.factor, "--factor", unit="")
    check_mm(args.thickness, "--thickness")
    check_mm(args.spacing, "--spacing")
    check_output(args.output, args.dtype, overwrite=args.overwrite)
    replacing = output_exists(args.output)
    start = time.perf_counter()
    thin = read_volume(args.input, series_uid=args.series)
    thick = _on_thin_lattice(thin, degrade(thin, factor=args.factor, thickness=args.thickness, spacing=args.spacing,
                                           profile=args.profile))
    written = write_volume(thick, args.output, dtype=args.dtype, reference_input=args.input)
    note_replaced(written, replacing)
    print(f"wrote {written}: {thin.num_slices} -> {thick.num_slices} slices, {summary(thick)}, "
          f"{thick.metadata['degrade']}, {time.perf_counter() - start:.1f} s")
    return 0


def _on_thin_lattice(thin: Volume, thick: Volume) -> Volume:
    """``thick`` cut to an extent of whole thin slices (see :func:`thinslice.degrade.grid.whole_extent`), with a note:
    ``thinslice upsample`` back to the thin spacing then lands on ``thin``'s own slices, which ``thinslice evaluate``
    can score without resampling."""
    from thinslice.degrade.grid import whole_extent

    kept = whole_extent(thick, thin.slice_spacing)
    if kept.num_slices < thick.num_slices:
        log.info(f"note: kept {kept.num_slices} of the {thick.num_slices} thick slices: their extent is then a whole "
                 f"number of the input's {thin.slice_spacing:.4g} mm slices, so upsampling back lands on them")
    return kept


def summary(volume: Volume) -> str:
    """Shape and spacing for the one-line report of what was written."""
    shape = "x".join(str(n) for n in volume.shape_ijk)
    spacing = "x".join(f"{s:.4g}" for s in volume.spacing)
    return f"shape {shape}, spacing {spacing} mm"
