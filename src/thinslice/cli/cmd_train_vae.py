"""``thinslice train-vae``: train the 3D VAE on CT volumes (split file, folder or files)."""

from __future__ import annotations

import argparse
from pathlib import Path

from thinslice.presets import DEFAULT_PRESET


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "train-vae", help="train the 3D VAE (autoencoder of the latent diffusion model)",
        description="Train the 3D KL autoencoder on random CT patches (L1 + KL + SSIM, optional patch GAN). "
        "Checkpoints go to OUT/checkpoints (resume with --resume), TensorBoard logs to OUT/tensorboard, the best "
        "and final weights to OUT/best/vae.safetensors and OUT/final/vae.safetensors (with the latent scaling "
        "factor). Multi-GPU: accelerate launch -m thinslice.cli.main train-vae ...",
    )
    p.add_argument("--data", nargs="+", required=True, metavar="SPLIT_OR_DIR",
                   help="training volumes: split .txt file(s), folder(s) of NIfTI/NRRD/MHA files, or files")
    p.add_argument("--val", nargs="+", default=None, metavar="SPLIT_OR_DIR",
                   help="held-out volumes for validation PSNR (central crops); default: crops of the training data")
    p.add_argument("--preset", default=DEFAULT_PRESET, help="tiny, small, paper or a preset .json (default small)")
    p.add_argument("--out", required=True, type=Path, help="run folder (checkpoints, logs, weights)")
    p.add_argument("--init", default=None,
                   help="start from thinslice VAE weights (.safetensors) or a diffusers 2D AutoencoderKL folder/hub id")
    p.add_argument("--resume", action="store_true", help="continue from the last checkpoint in --out")
    p.add_argument("--max-steps", type=int, default=None, help="total optimiser steps (default: from the preset)")
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--lr", type=float, default=None)
    p.add_argument("--ema-decay", type=float, default=None, help="EMA of the weights (0 = off; default: preset)")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda", "mps"])
    p.add_argument("--mixed-precision", default="no", choices=["no", "fp16", "bf16"])
    p.add_argument("--gradient-checkpointing", action="store_true", help="less memory, ~30%% slower")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--kl-weight", type=float, default=1e-6)
    p.add_argument("--ssim-weight", type=float, default=0.2)
    p.add_argument("--adv-weight", type=float, default=0.0, help="patch-GAN weight (0 = off, e.g. 0.01)")
    p.add_argument("--adv-start", type=int, default=0, help="step from which the adversarial loss is on")
    p.add_argument("--time-limit-min", type=float, default=None,
                   help="stop (with a checkpoint) after this many minutes; continue later with --resume")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from thinslice.presets import load_preset
    from thinslice.train.data import resolve_data_paths
    from thinslice.train.losses import VAELossWeights
    from thinslice.train.vae import VAETrainOptions, train_vae

    train = resolve_data_paths(args.data)
    val = resolve_data_paths(args.val) if args.val else None
    opts = VAETrainOptions(
        run_dir=args.out, preset=load_preset(args.preset), max_steps=args.max_steps, device=args.device,
        mixed_precision=args.mixed_precision, gradient_checkpointing=args.gradient_checkpointing, seed=args.seed,
        init=args.init, resume=args.resume, batch_size=args.batch_size, lr=args.lr, ema_decay=args.ema_decay,
        loss=VAELossWeights(kl=args.kl_weight, ssim=args.ssim_weight, adversarial=args.adv_weight,
                            adversarial_start=args.adv_start),
        time_limit_s=args.time_limit_min * 60 if args.time_limit_min else None,
    )
    train_vae(train, val, opts)
    return 0
