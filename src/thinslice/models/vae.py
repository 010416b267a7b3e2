"""3D AutoencoderKL for CT with per-axis down-sampling (filled in by the VAE issue)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class VAEConfig:
    """Shape of the 3D VAE. Tensors are (B, C, D, H, W) with D the slice axis."""

    in_channels: int = 1
    latent_channels: int = 4
    channels: tuple[int, ...] = (16, 32, 64)
    num_res_blocks: int = 1
    # One stride per down-sampling step (len(channels) - 1 entries), (d, h, w): (1, 2, 2) keeps the slice axis.
    strides: tuple[tuple[int, int, int], ...] = ((1, 2, 2), (2, 2, 2))
    attention_at_lowest: bool = False
    norm_num_groups: int = 8
    # Multiplies latents so that they have roughly unit variance for the diffusion model (set after training).
    scaling_factor: float = 1.0
