"""``thinslice demo``: the whole pipeline on a built-in phantom (or on ``--input``)."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from thinslice.cli.checks import FACTOR, SEED
from thinslice.errors import ThinsliceError

log = logging.getLogger("thinslice.cli")


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "demo",
        help="run the whole pipeline on a built-in synthetic chest CT (or --input FILE)",
        description="Simulate thick slices from a thin CT (a built-in phantom unless --input is given), upsample "
        "them back, score the result against the truth and save a PNG of axial/coronal/sagittal views.",
    )
    parser.add_argument("--out", default="demo_out", help="output folder (default: demo_out)")
    parser.add_argument("--input", default=None, help="your own CT volume (NIfTI, NRRD, MHA or DICOM folder)")
    parser.add_argument("--method", default=None,
                        help="upsampling method compared with cubic (default: every method with weights)")
    parser.add_argument("--factor", type=FACTOR, default=4.0, help="thick/thin slice ratio (1 to 64, default 4)")
    parser.add_argument("--profile", default="gaussian", choices=["gaussian", "box", "decimate"])
    parser.add_argument("--seed", type=SEED, default=0)
    parser.add_argument("--checkpoint", default=None, help="model bundle folder (default: the shipped weights)")
    parser.add_argument("--precision", choices=("fp32", "bf16"), default=None,
                        help="learned methods: bf16 autocast (about twice as fast on a CPU)")
    parser.set_defaults(func=run)


# The files a demo writes into its folder: the demo owns them, so a re-run replaces them (and says so); nothing
# else in the folder is touched.
DEMO_FILES = ("thin_truth.nii.gz", "thick_input.nii.gz", "result_*.nii.gz", "views.png", "metrics.json")


def earlier_outputs(out: Path) -> list[Path]:
    """The files of an earlier demo in ``out`` (refusing an ``out`` that is a file: a demo writes a folder)."""
    if out.exists() and not out.is_dir():
        raise ThinsliceError(f"--out {out} is a file; the demo writes a folder: give a folder path")
    if not out.is_dir():
        return []
    return sorted({item for pattern in DEMO_FILES for item in out.glob(pattern) if item.is_file()})


def run(args: argparse.Namespace) -> int:
    from thinslice.demo import run_demo

    earlier = earlier_outputs(Path(args.out))
    if earlier:
        log.info(f"note: replacing the {len(earlier)} files of an earlier demo in {args.out} (the demo owns "
                 f"{', '.join(DEMO_FILES)} there)")
    run_demo(args.out, input_path=args.input, method=args.method, factor=args.factor, profile=args.profile,
             seed=args.seed, checkpoint=args.checkpoint, precision=args.precision)
    return 0
