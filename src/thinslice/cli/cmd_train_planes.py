"""``thinslice train-planes``: train the through-plane planes network (``--method planes``)."""

from __future__ import annotations

import argparse

from thinslice.cli.cmd_train import add_generic_options, check_out_folder, run_options


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "train-planes", help="train the planes network (2D on the thick grid; trains on a CPU)",
        description="Train the 2D network that refines cubic-dc on coronal and sagittal planes, computing on the "
        "thick grid. Examples are planes of the training volumes and axial slices degraded along one in-plane axis, "
        "with random factor, profile and thickness. Validation runs the shipped pipeline on the --val volumes "
        "(x4 gaussian). OUT/final/planes.safetensors is what thinslice upsample --method planes --checkpoint "
        "OUT/final runs. Use --mixed-precision bf16 on a CPU. Several GPUs or CPU processes: torchrun "
        "--nproc_per_node N -m thinslice.cli.main train-planes ... (the effective batch is --batch-size x N).",
    )
    add_generic_options(p)
    p.add_argument("--loss", default="l1", choices=["l1", "mse"], help="training loss (default l1)")
    p.add_argument("--init", default=None, metavar="DIR",
                   help="start from these planes weights (a bundle folder, e.g. the shipped thinslice/weights or "
                        "a run's final/) instead of a fresh network: fine-tuning on your own data")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from thinslice.io.prepare import resolve_data_paths
    from thinslice.train.planes import PlanesTrainOptions, train_planes

    train = resolve_data_paths(args.data)
    val = resolve_data_paths(args.val) if args.val else None
    check_out_folder(args.out, [*train, *(val or [])])
    train_planes(train, val, PlanesTrainOptions(**run_options(args), loss=args.loss, init=args.init))
    return 0
