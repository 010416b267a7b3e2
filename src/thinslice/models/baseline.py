"""Small 3D residual CNN baseline: refines a cubic-upsampled volume (SRCNN/EDSR-style residual learning).

Written by hand because MONAI has no residual super-resolution network of this shape; it is deliberately small
(about 0.36M parameters with the default config) so that it trains on a CPU and shows what a plain supervised
network gets through the same pipeline as the diffusion model.
"""

from __future__ import annotations

import torch
from torch import nn

from thinslice.presets import BaselineConfig  # noqa: F401 (configured by it; re-exported)


class _ResBlock(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv3d(channels, channels, 3, padding=1)
        self.act = nn.PReLU(channels)
        self.conv2 = nn.Conv3d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Residual scaling as in EDSR keeps training stable without normalisation layers.
        return x + 0.1 * self.conv2(self.act(self.conv1(x)))


class ResidualCNN3D(nn.Module):
    """Input and output: (B, 1, D, H, W) in model range; the output is input + a learned correction.

    The last convolution starts at zero, so an untrained network returns its input (the cubic baseline) exactly.
    """

    def __init__(self, cfg: BaselineConfig) -> None:
        super().__init__()
        self.cfg = cfg
        c = cfg.channels
        self.head = nn.Conv3d(1, c, 3, padding=1)
        self.body = nn.Sequential(*[_ResBlock(c) for _ in range(cfg.num_blocks)])
        self.body_tail = nn.Conv3d(c, c, 3, padding=1)
        self.tail = nn.Conv3d(c, 1, 3, padding=1)
        nn.init.zeros_(self.tail.weight)
        if self.tail.bias is not None:
            nn.init.zeros_(self.tail.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features = self.head(x)
        features = features + self.body_tail(self.body(features))
        return x + self.tail(features)
