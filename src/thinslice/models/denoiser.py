"""The full latent denoiser: UNet + optional IRControlNet + a learned null condition for classifier-free guidance.

Classifier-free guidance (Ho & Salimans 2022): during training the LR-latent *network input* is replaced by a learned
null latent for a random fraction of the batch (``condition_dropout``); at sampling time the prediction is
``uncond + w (cond - uncond)``. For ResShift the LR latent also appears in the forward process itself
(x_T = y + noise and the posterior), which is kept: only what the network is told about y is dropped.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

from thinslice.models.control import IRControlNet
from thinslice.models.unet import LatentUNet3D
from thinslice.presets import Preset, ResShiftConfig


class LatentDenoiser(nn.Module):
    """``forward(x_t_scaled, t, y, factor, drop_mask=None) -> prediction`` (x0, residual or noise)."""

    def __init__(self, unet: LatentUNet3D, control: IRControlNet | None, cfg: ResShiftConfig | None = None) -> None:
        super().__init__()
        self.unet = unet
        self.control = control
        self.cfg = cfg or ResShiftConfig()
        # Learned "no condition" latent, broadcast over the spatial axes (zeros = the LR latent's mean).
        self.null_condition = nn.Parameter(torch.zeros(unet.cfg.latent_channels, 1, 1, 1))

    @property
    def size_multiple(self) -> tuple[int, int, int]:
        return self.unet.size_multiple

    def use_channels_last(self) -> LatentDenoiser:
        """Convolution weights in the channels-last-3d layout (inputs follow): 1.8x faster bf16 inference on this CPU
        (oneDNN; 86x256x128 latent, 2 threads: 8.5 -> 4.7 s per pass), the same numbers."""
        for m in self.modules():
            if isinstance(m, nn.Conv3d):
                m.weight.data = m.weight.data.to(memory_format=torch.channels_last_3d)
        return self

    @property
    def channels_last(self) -> bool:
        conv = next((m for m in self.modules() if isinstance(m, nn.Conv3d)), None)
        return conv is not None and conv.weight.is_contiguous(memory_format=torch.channels_last_3d)

    def set_gradient_checkpointing(self, enabled: bool) -> None:
        self.unet.set_gradient_checkpointing(enabled)
        if self.control is not None:
            self.control.set_gradient_checkpointing(enabled)

    def null_like(self, y: torch.Tensor) -> torch.Tensor:
        return self.null_condition.to(y.dtype).expand(y.shape[0], -1, *y.shape[2:])

    def apply_drop_mask(self, y: torch.Tensor, drop_mask: torch.Tensor) -> torch.Tensor:
        """y with the elements where ``drop_mask`` (B,) is True replaced by the null latent."""
        mask = drop_mask.to(device=y.device, dtype=torch.bool).reshape(-1, *([1] * (y.ndim - 1)))
        return torch.where(mask, self.null_like(y), y)

    def condition_dropout(
        self, y: torch.Tensor, p: float | None = None, generator: torch.Generator | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(y with a random fraction ``p`` (default cfg.cfg_dropout) of batch elements nulled, the (B,) mask)."""
        p = self.cfg.cfg_dropout if p is None else p
        gen_device = generator.device if generator is not None else "cpu"
        mask = (torch.rand(y.shape[0], generator=generator, device=gen_device) < p).to(y.device)
        return self.apply_drop_mask(y, mask), mask

    def forward(
        self,
        x_t_scaled: torch.Tensor,
        t: torch.Tensor,
        y: torch.Tensor,
        factor: torch.Tensor | float | None = None,
        drop_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        if drop_mask is not None:
            y = self.apply_drop_mask(y, drop_mask)
        residuals = self.control(x_t_scaled, t, y, factor) if self.control is not None else None
        return self.unet(x_t_scaled, t, y, factor, control_residuals=residuals)

    def guided(
        self,
        x_t_scaled: torch.Tensor,
        t: torch.Tensor,
        y: torch.Tensor,
        factor: torch.Tensor | float | None = None,
        guidance_scale: float = 1.0,
    ) -> torch.Tensor:
        """uncond + w (cond - uncond); w = 1 is the conditional prediction alone (one network pass)."""
        cond = self(x_t_scaled, t, y, factor)
        if guidance_scale == 1.0:
            return cond
        uncond = self(x_t_scaled, t, self.null_like(y), factor)
        return uncond + guidance_scale * (cond - uncond)


def denoiser_from_preset(p: Preset) -> LatentDenoiser:
    """The whole latent denoiser of a preset: UNet (as many latent channels as the preset's first stage makes) +
    IRControlNet (when ``control.enabled``) + null condition; the builder of the 'denoiser' network kind.

    The control net starts as a copy of the UNet encoder when ``control.init_from_unet`` (DiffBIR), else randomly.
    """
    unet = LatentUNet3D(dataclasses.replace(p.unet, latent_channels=p.latent_channels))
    control = None
    if p.control.enabled:
        control = IRControlNet.from_unet(unet, p.control) if p.control.init_from_unet else IRControlNet(
            unet.cfg, p.control)
    return LatentDenoiser(unet, control, p.diffusion)
