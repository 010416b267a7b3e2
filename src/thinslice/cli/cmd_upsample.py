"""``thinslice upsample``: thick-slice volume -> thin slices by a registered method (interpolation, CNN, LDM).

The method flags come from the one option table (:data:`thinslice.infer.options.METHOD_FLAGS`, shared with
``thinslice batch``); each is parsed for every method but only passed to, and checked by, the methods that use it,
so new methods plug in without changing this parser. The run itself is a :class:`thinslice.Upsampler`.
"""

from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path
from typing import TYPE_CHECKING

from thinslice.cli.checks import (
    check_input,
    check_mm,
    check_output,
    note_replaced,
    output_exists,
    warn_if_sparse,
)
from thinslice.cli.cmd_degrade import refuse_same_path, summary
from thinslice.cli.method_flags import add_method_arguments

if TYPE_CHECKING:
    from thinslice.infer.upsample import Upsampler

log = logging.getLogger("thinslice.cli")


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "upsample",
        help="resample a thick-slice volume to thin slices",
        description="Resample along the slice axis to --spacing mm on the thin grid covering the thick stack (the "
                    "grid a thin scan of the same extent would have). Methods: linear, cubic (B-spline) and any "
                    "installed learned method (see --method help).",
    )
    parser.add_argument("input", metavar="IN", help="thick-slice volume file or DICOM series folder")
    parser.add_argument("output", metavar="OUT", help="output file (.nii.gz, .nrrd, .mha) or folder for DICOM")
    parser.add_argument("--spacing", type=float, required=True, metavar="MM",
                        help="output slice spacing in mm (0.05 to 1000)")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace OUT (and its _std map) when it exists (default: refuse, nothing is replaced)")
    parser.add_argument("--method", default="auto", help="upsampling method (default: auto = the best method whose "
                        "weights ship with thinslice, else cubic); an unknown name "
                        "lists the available ones")
    parser.add_argument("--series", metavar="UID", default=None,
                        help="series to read from a multi-series folder (SeriesNumber or UID; `thinslice info "
                             "FOLDER` lists them)")
    parser.add_argument("--dtype", choices=("int16", "float32"), default="int16",
                        help="output voxel type for file outputs (default: int16 HU)")
    add_method_arguments(parser, parser, "options of learned methods (ignored by linear/cubic)")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from thinslice.infer.upsample import Upsampler
    from thinslice.io import read_volume, write_volume
    from thinslice.io.writers import write_std_map

    check_input(args.input)
    refuse_same_path(args.output, args.input)
    check_mm(args.spacing, "--spacing")
    check_mm(args.thickness, "--thickness")
    check_output(args.output, args.dtype, overwrite=args.overwrite)
    replacing = output_exists(args.output)
    up = Upsampler.from_args(args)  # an unknown method or a bad option fails before the volume is read
    start = time.perf_counter()
    thick = read_volume(args.input, series_uid=args.series)
    warn_if_sparse(thick)
    decision = up.decide(thick)
    for note in decision.notes:
        log.info(f"note: {note}")
    std_path = _std_path(args, up, decision.method)
    result = up.run(thick, decision)
    thin = result.volume
    if std_path is not None and "std" in result.extras:
        # A DICOM std map is a series of its own beside the output: source SeriesNumber + 2000, "... <method> std".
        std_existed = output_exists(std_path)
        written_std = write_std_map(result.extras["std"], std_path, decision.method)
        note_replaced(written_std, std_existed)
        thin.metadata["std_map"] = str(written_std)
        print(f"wrote {written_std}: std map, {result.report.get('uncertainty', 'uncalibrated')}")
    written = write_volume(thin, args.output, dtype=args.dtype, reference_input=args.input, method=decision.method)
    note_replaced(written, replacing)
    print(f"wrote {written}: {thick.num_slices} -> {thin.num_slices} slices, {summary(thin)}, "
          f"{decision.method}, {time.perf_counter() - start:.1f} s")
    return 0


def _std_path(args: argparse.Namespace, up: Upsampler, method: str) -> Path | None:
    """Where the uncertainty map goes (``--samples`` >= 2 or ``--uncertainty`` for a method that gives one): beside
    the output, ``ct.nii.gz`` -> ``ct_std.nii.gz``; checked against the input before any work."""
    from thinslice.io.writers import std_dtype, std_path_for

    typed = up.options_of(method)
    if int(str(typed.get("samples") or 1)) < 2 and not typed.get("uncertainty"):
        return None
    path = std_path_for(args.output)
    refuse_same_path(str(path), args.input)
    check_output(path, std_dtype(path), overwrite=args.overwrite)
    return path
