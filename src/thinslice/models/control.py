"""IRControlNet (DiffBIR, Lin et al. 2023): a trainable copy of the UNet encoder fed with the LR latent.

The copy sees the same input as the UNet (noisy latent concatenated with the LR latent) plus the LR latent injected
again through a zero-initialised convolution after its input convolution, and returns one residual per UNet skip
connection plus one for the middle block, each through a zero-initialised 1x1x1 convolution and multiplied by
``scale``. Zero initialisation makes a fresh control net a no-op, so it can be added to a trained UNet without
disturbing it. ``ControlConfig.enabled = False`` means no control net at all (the UNet's concatenation only).
"""

from __future__ import annotations

import torch
from torch import nn

from thinslice.models.unet import ConditionEmbedding, LatentUNet3D, UNetConfig, UNetEncoder, zero_module
from thinslice.presets import ControlConfig  # noqa: F401 (configured by it; re-exported)


class IRControlNet(nn.Module):
    """``forward(x_t_scaled, t, y_latent, factor) -> list of residuals`` for :class:`LatentUNet3D`."""

    def __init__(self, unet_cfg: UNetConfig, cfg: ControlConfig | None = None) -> None:
        super().__init__()
        self.cfg = cfg or ControlConfig()
        self.unet_cfg = unet_cfg
        self.embedding = ConditionEmbedding(unet_cfg)
        self.encoder = UNetEncoder(unet_cfg, in_channels=2 * unet_cfg.latent_channels)
        self.condition_conv = zero_module(
            nn.Conv3d(unet_cfg.latent_channels, unet_cfg.base_channels, kernel_size=3, padding=1)
        )
        out_channels = [*self.encoder.skip_channels, self.encoder.mid_channels]
        self.zero_convs = nn.ModuleList(zero_module(nn.Conv3d(c, c, kernel_size=1)) for c in out_channels)
        self.control_scale = float(self.cfg.scale)
        self.set_gradient_checkpointing(unet_cfg.gradient_checkpointing)

    @classmethod
    def from_unet(cls, unet: LatentUNet3D, cfg: ControlConfig | None = None) -> IRControlNet:
        """A control net whose encoder and embeddings start as copies of ``unet``'s (DiffBIR initialisation)."""
        control = cls(unet.cfg, cfg)
        control.embedding.load_state_dict(unet.embedding.state_dict())
        control.encoder.load_state_dict(unet.encoder.state_dict())
        return control.to(next(unet.parameters()).device)

    def set_gradient_checkpointing(self, enabled: bool) -> None:
        self.encoder.gradient_checkpointing = enabled

    def forward(
        self,
        x_t: torch.Tensor,
        t: torch.Tensor,
        y_latent: torch.Tensor,
        factor: torch.Tensor | float | None = None,
        condition: torch.Tensor | None = None,
    ) -> list[torch.Tensor]:
        """Residuals for the UNet's skips and middle block. ``condition`` defaults to ``y_latent``."""
        condition = y_latent if condition is None else condition
        emb = self.embedding(t, factor, x_t.shape[0])
        skips, mid = self.encoder(torch.cat([x_t, y_latent], dim=1), emb, hint=self.condition_conv(condition))
        return [conv(h) * self.control_scale for conv, h in zip(self.zero_convs, [*skips, mid], strict=True)]
