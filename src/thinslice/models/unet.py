"""3D latent UNet with anisotropic down-sampling (filled in by the diffusion issue)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class UNetConfig:
    """Shape of the latent denoiser. Input = noisy latent concatenated with the LR latent."""

    latent_channels: int = 4
    base_channels: int = 32
    channel_mult: tuple[int, ...] = (1, 2, 4)
    num_res_blocks: int = 1
    # One stride per down-sampling step (d, h, w); (1, 2, 2) where the slice axis must not shrink.
    strides: tuple[tuple[int, int, int], ...] = ((1, 2, 2), (2, 2, 2))
    # Self-attention at the coarsest ``attention_levels`` levels (2 = the two coarsest).
    attention_levels: int = 2
    num_head_channels: int = 32
    norm_num_groups: int = 8
    gradient_checkpointing: bool = False
