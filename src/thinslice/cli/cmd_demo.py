"""``thinslice demo``: the whole pipeline on a built-in phantom (or on ``--input``)."""

from __future__ import annotations

import argparse


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
    parser.add_argument("--factor", type=float, default=4.0, help="thick/thin slice ratio (default 4)")
    parser.add_argument("--profile", default="gaussian", choices=["gaussian", "box", "decimate"])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--checkpoint", default=None, help="model bundle folder (default: the shipped weights)")
    parser.add_argument("--precision", choices=("fp32", "bf16"), default=None,
                        help="learned methods: bf16 autocast (about twice as fast on a CPU)")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from thinslice.demo import run_demo

    run_demo(args.out, input_path=args.input, method=args.method, factor=args.factor, profile=args.profile,
             seed=args.seed, checkpoint=args.checkpoint, precision=args.precision)
    return 0
