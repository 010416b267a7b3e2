"""Losses and metrics for the VAE (and any trainer that needs image-space PSNR/SSIM in model range).

L1 + small KL + SSIM (MONAI ``SSIMLoss``, 3D) + an optional patch-GAN term (MONAI ``PatchDiscriminator`` +
``PatchAdversarialLoss``, least squares) after a warm-up, as in the latent-diffusion VAE recipe.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from monai.losses import PatchAdversarialLoss, SSIMLoss
from monai.networks.nets import PatchDiscriminator
from torch import nn

from thinslice.models.intensity import hu_to_model
from thinslice.models.vae import AutoencoderKL3D


@dataclass
class VAELossWeights:
    kl: float = 1e-6
    ssim: float = 0.2
    adversarial: float = 0.0  # 0 = no discriminator
    adversarial_start: int = 0  # optimiser step from which the adversarial terms are on


def ssim_window(patch_size: tuple[int, ...], preferred: int = 7) -> int:
    """Largest odd SSIM window <= ``preferred`` that fits the smallest patch axis."""
    w = min(preferred, min(patch_size))
    return max(1, w if w % 2 else w - 1)


def make_discriminator(patch_size: tuple[int, int, int], channels: int = 32, max_layers: int = 3) -> PatchDiscriminator:
    """Patch discriminator with as many stride-2 layers (up to ``max_layers``) as the smallest patch axis allows."""
    num_layers = int(max(1, min(max_layers, np.floor(np.log2(max(1, min(patch_size)) / 4)))))
    # Instance norm: batch statistics are meaningless with batches of 1-4 3D patches.
    return PatchDiscriminator(spatial_dims=3, channels=channels, in_channels=1, out_channels=1,
                              num_layers_d=num_layers, norm="INSTANCE")


class VAELoss:
    """``loss_fn(models, batch, step)`` for :class:`thinslice.train.engine.Trainer`.

    ``models['vae']`` is trained; ``models['disc']`` (present when the adversarial weight is > 0) is trained in the
    same backward pass: its own loss uses the detached reconstruction, and the generator's adversarial term is computed
    with the discriminator's parameters frozen, so one optimiser step updates both correctly.
    """

    def __init__(self, weights: VAELossWeights, patch_size: tuple[int, int, int]) -> None:
        self.w = weights
        self.ssim = SSIMLoss(spatial_dims=3, data_range=2.0, win_size=ssim_window(patch_size))
        self.adv = PatchAdversarialLoss(criterion="least_squares")

    def __call__(self, models: dict[str, nn.Module], batch: dict, step: int) -> tuple[torch.Tensor, dict[str, float]]:
        vae = models["vae"]
        x = hu_to_model(batch["hu"])
        recon, mean, logvar = vae(x)
        recon = recon.float()
        l1 = (recon - x).abs().mean()
        kl = AutoencoderKL3D.kl_loss(mean, logvar)
        ssim = self.ssim(recon, x)
        loss = l1 + self.w.kl * kl + self.w.ssim * ssim
        logs = {"l1": float(l1.detach()), "kl": float(kl.detach()), "ssim_loss": float(ssim.detach()),
                "psnr": float(psnr_model_range(recon.detach(), x))}
        disc = models.get("disc")
        if disc is not None and self.w.adversarial > 0:
            if step >= self.w.adversarial_start:
                disc.requires_grad_(False)
                g_adv = self.adv(disc(recon)[-1], target_is_real=True, for_discriminator=False)
                disc.requires_grad_(True)
                # One discriminator forward for fake and real (instance norm: samples do not mix); DDP expects
                # each parameter to get its gradient from a single forward.
                logits = disc(torch.cat([recon.detach(), x]))[-1]
                n = x.shape[0]
                d_fake = self.adv(logits[:n], target_is_real=False, for_discriminator=True)
                d_real = self.adv(logits[n:], target_is_real=True, for_discriminator=True)
                d_loss = 0.5 * (d_fake + d_real)
                loss = loss + self.w.adversarial * g_adv + d_loss
                logs.update({"g_adv": float(g_adv.detach()), "d_loss": float(d_loss.detach())})
            else:
                # Keep the discriminator in the graph with zero weight (DDP expects every parameter to get a grad).
                loss = loss + 0.0 * sum(p.sum() for p in disc.parameters())
        return loss, logs


def psnr_model_range(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """PSNR in dB of model-range images (data range 2 = the full HU range)."""
    mse = torch.mean((pred.float().clamp(-1, 1) - target.float()) ** 2)
    return 10.0 * torch.log10(4.0 / mse.clamp_min(1e-12))
