"""``thinslice train-baseline``: train the supervised residual 3D CNN baseline (``--method cnn``)."""

from __future__ import annotations

import argparse

from thinslice.cli.cmd_train import add_generic_options, check_out_folder, run_options


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "train-baseline", help="train the CNN baseline (refines cubic interpolation; no VAE needed)",
        description="Train the residual 3D CNN that refines cubic-upsampled thick-slice CT, on the same simulated "
        "pairs as the diffusion model (L1 loss). OUT/final/baseline.safetensors (and OUT/best) is what thinslice "
        "upsample --method cnn --checkpoint OUT/final runs. Several GPUs or CPU processes: torchrun "
        "--nproc_per_node N -m thinslice.cli.main train-baseline ... (the effective batch is --batch-size x N).",
    )
    add_generic_options(p)
    p.add_argument("--init", default=None,
                   help="start from existing baseline weights (baseline.safetensors or a folder holding it)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from thinslice.io.prepare import resolve_data_paths
    from thinslice.train.baseline import BaselineTrainOptions, train_baseline

    train = resolve_data_paths(args.data)
    val = resolve_data_paths(args.val) if args.val else None
    check_out_folder(args.out, [*train, *(val or [])])
    opts = BaselineTrainOptions(**run_options(args), init=args.init)
    train_baseline(train, val, opts)
    return 0
