"""``thinslice train-vae``: train the 3D VAE on CT volumes (split file, folder or files)."""

from __future__ import annotations

import argparse

from thinslice.cli.checks import ranged
from thinslice.cli.cmd_train import add_generic_options, check_out_folder, run_options


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "train-vae", help="train the 3D VAE (autoencoder of the latent diffusion model)",
        description="Train the 3D KL autoencoder on random CT patches (L1 + KL + SSIM, optional patch GAN). "
        "Checkpoints go to OUT/checkpoints (resume with --resume), TensorBoard logs to OUT/tensorboard, the best "
        "and final weights to OUT/best/vae.safetensors and OUT/final/vae.safetensors (with the latent scaling "
        "factor). Several GPUs or CPU processes: torchrun --nproc_per_node N -m thinslice.cli.main train-vae ... "
        "(the effective batch is --batch-size x N).",
    )
    add_generic_options(p)
    p.add_argument("--init", default=None,
                   help="start from thinslice VAE weights (.safetensors) or a diffusers 2D AutoencoderKL folder/hub id")
    p.add_argument("--kl-weight", type=ranged(float, 0, 1e6), default=1e-6)
    p.add_argument("--ssim-weight", type=ranged(float, 0, 1e6), default=0.2)
    p.add_argument("--adv-weight", type=ranged(float, 0, 1e6),
                   default=0.0, help="patch-GAN weight (0 = off, e.g. 0.01)")
    p.add_argument("--adv-start", type=ranged(int, 0, 10**9),
                   default=0, help="step from which the adversarial loss is on")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from thinslice.io.prepare import resolve_data_paths
    from thinslice.train.losses import VAELossWeights
    from thinslice.train.vae import VAETrainOptions, train_vae

    train = resolve_data_paths(args.data)
    val = resolve_data_paths(args.val) if args.val else None
    check_out_folder(args.out, [*train, *(val or [])])
    opts = VAETrainOptions(**run_options(args), init=args.init,
                           loss=VAELossWeights(kl=args.kl_weight, ssim=args.ssim_weight, adversarial=args.adv_weight,
                                               adversarial_start=args.adv_start))
    train_vae(train, val, opts)
    return 0
