"""``thinslice train``: train the latent diffusion model (ResShift + IRControlNet) on a frozen VAE's latents."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from thinslice.cli.checks import SEED, STEPS, ranged


def add_generic_options(p: argparse.ArgumentParser) -> None:
    """Options every trainer shares (``train``, ``train-baseline``, ``train-vae``); see :func:`run_options`."""
    p.add_argument("--data", nargs="+", required=True, metavar="SPLIT_OR_DIR",
                   help="thin-slice training volumes: split .txt file(s), folder(s) of NIfTI/NRRD/MHA files, or files")
    p.add_argument("--val", nargs="+", default=None, metavar="SPLIT_OR_DIR",
                   help="held-out volumes for validation (central crops; for train and train-baseline degraded by "
                   "factor 4, gaussian); default: the training volumes")
    p.add_argument("--preset", default=None, help="tiny, small, paper or a preset .json (default small)")
    p.add_argument("--out", required=True, type=Path, help="run folder (checkpoints, TensorBoard logs, weights)")
    p.add_argument("--resume", action="store_true", help="continue from the last checkpoint in --out")
    p.add_argument("--max-steps", type=ranged(int, 1, 10**9),
                   default=None, help="total optimiser steps (default: from the preset)")
    p.add_argument("--batch-size", type=ranged(int, 1, 4096),
                   default=None, help="patches per step and process (default: preset)")
    p.add_argument("--lr", type=ranged(float, 1e-10, 1), default=None, help="peak learning rate (default: preset)")
    p.add_argument("--ema-decay", type=ranged(float, 0, 0.99999), default=None,
                   help="EMA of the weights used for validation and export (0 = off; default: preset)")
    p.add_argument("--val-every", type=ranged(int, 0, 10**9),
                   default=None, help="validate every N steps (0 = only at the end)")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda", "mps"])
    p.add_argument("--precision", "--mixed-precision", dest="mixed_precision", default="no",
                   choices=["no", "fp32", "fp16", "bf16"],
                   help="autocast precision, as for upsample --precision: fp32 (= no), bf16 (CPUs and recent GPUs), "
                        "fp16 (GPUs only); --mixed-precision is the same option")
    p.add_argument("--gradient-checkpointing", action="store_true", help="less memory, about 30%% slower")
    p.add_argument("--seed", type=SEED, default=None)
    p.add_argument("--time-limit-min", "--time-limit", dest="time_limit_min", type=ranged(float, 0.01, 10**6),
                   default=None,
                   metavar="MIN", help="stop (with a checkpoint) after this many minutes; continue with --resume")


def run_options(args: argparse.Namespace) -> dict[str, Any]:
    """The parsed :func:`add_generic_options` as keyword arguments of the trainers' ``RunOptions`` (argparse's
    values, typed by its ``type=`` functions)."""
    from thinslice.presets import DEFAULT_PRESET, load_preset

    return {"run_dir": args.out, "preset": load_preset(args.preset or DEFAULT_PRESET), "max_steps": args.max_steps,
            "device": args.device, "mixed_precision": "no" if args.mixed_precision == "fp32" else args.mixed_precision,
            "gradient_checkpointing": args.gradient_checkpointing, "seed": args.seed, "resume": args.resume,
            "batch_size": args.batch_size, "lr": args.lr, "ema_decay": args.ema_decay, "val_every": args.val_every,
            "time_limit_s": args.time_limit_min * 60 if args.time_limit_min else None}


def check_out_folder(out: Path, inputs: list[Path]) -> None:
    """The run folder must not be one of the input files (never write over an input)."""
    from thinslice.errors import ThinsliceError

    target = Path(out).resolve()
    if any(Path(p).resolve() == target for p in inputs) or (target.exists() and not target.is_dir()):
        raise ThinsliceError(f"--out {out} is a file (or one of the inputs); pass a run folder")


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "train", help="train the latent diffusion model",
        description="Train the 3D latent diffusion model (ResShift with an IRControlNet) on thin-slice CT. "
        "With the lossless wavelet first stage (--first-stage haar, the small preset's) every training volume is "
        "degraded once per factor and profile of the preset, the prior (--prior planes: the planes network; "
        "cubic-dc; cubic) is computed on the whole volume, and the model learns the residual from that prior to the "
        "truth on random latent crops. With a trained VAE (--first-stage vae --vae ...) pairs are simulated on the "
        "fly from cubic upsampling, or read from a latent cache made by thinslice encode (--cache). OUT/final and "
        "OUT/best are complete model bundles (denoiser, plus the VAE or the planes weights it needs) for "
        "thinslice upsample --method ldm --checkpoint OUT/final. Several GPUs or CPU processes: torchrun "
        "--nproc_per_node N -m thinslice.cli.main train ... (the effective batch is --batch-size x N).",
    )
    add_generic_options(p)
    p.add_argument("--vae", default=None,
                   help="VAE weights for --first-stage vae: vae.safetensors or a train-vae run folder")
    p.add_argument("--first-stage", choices=["vae", "haar"], default=None,
                   help="haar: the lossless wavelet transform (no training); vae: a trained VAE (--vae); "
                   "default: the preset's")
    p.add_argument("--prior", choices=["cubic", "cubic-dc", "planes"], default=None,
                   help="the estimate the model refines (default: the preset's)")
    p.add_argument("--init", default=None, metavar="DIR",
                   help="start from this bundle's denoiser (fine-tune the shipped or your own model on your data)")
    p.add_argument("--planes", default=None, metavar="DIR",
                   help="bundle with planes.safetensors for --prior planes (default: the shipped weights)")
    p.add_argument("--steps", type=STEPS, default=None,
                   help="ResShift sampling steps the model is trained for: 15 (paper) or 4 (fast schedule, saved as "
                   "denoiser-4step.safetensors); default: the preset's")
    p.add_argument("--no-control", action="store_true",
                   help="no IRControlNet: the LR latent is only concatenated to the UNet input (ablation)")
    p.add_argument("--cache", type=Path, default=None,
                   help="latent cache folder from thinslice encode (made with the same --vae): no VAE work per step")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from thinslice.io.prepare import resolve_data_paths
    from thinslice.train.diffusion import DiffusionTrainOptions, train_diffusion

    train = resolve_data_paths(args.data)
    val = resolve_data_paths(args.val) if args.val else None
    check_out_folder(args.out, [*train, *(val or []), *([Path(args.vae)] if args.vae else [])])
    opts = DiffusionTrainOptions(**run_options(args), vae=args.vae, steps=args.steps, control=not args.no_control,
                                 cache=args.cache, first_stage=args.first_stage, prior=args.prior,
                                 planes=args.planes, init=args.init)
    train_diffusion(train, val, opts)
    return 0
