"""A lossless first stage for the latent diffusion model: the orthonormal Haar wavelet transform (WDM, Friedrich et
al. 2024), as an alternative to the trained VAE.

``encode`` turns each 2x2x2 (or 1x2x2, in-plane only) block of the image into 8 (4) coefficients: the block mean
(scaled) and the detail differences; ``decode`` inverts it exactly. Nothing is learnt, so the first stage costs no
training and loses nothing (reconstruction is exact to float precision), at the price of a latent with as many
values as the image. It has the VAE's interface (``encode -> (mean, logvar)``, ``decode``, ``total_stride``,
``config.latent_channels``, ``scaling_factor``), so :mod:`thinslice.models.tiling` encodes and decodes whole
volumes with it unchanged.

Written by hand: MONAI has no discrete wavelet transform, and PyWavelets works on numpy arrays one level at a time
without autograd; the single-level Haar transform is a reshape and a few sums.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from thinslice.errors import ThinsliceError


@dataclass
class WaveletConfig:
    # (2, 2, 2): 8 coefficients per 2x2x2 block; (1, 2, 2): 4 per in-plane 2x2 block (slices kept apart).
    strides: tuple[int, int, int] = (2, 2, 2)
    scaling_factor: float = 1.0

    @property
    def latent_channels(self) -> int:
        return math.prod(self.strides)

    @property
    def total_stride(self) -> tuple[int, int, int]:
        d, h, w = (int(s) for s in self.strides)
        return d, h, w


def _haar_1d(x: torch.Tensor, dim: int) -> torch.Tensor:
    """Split ``dim`` (even length) into (sum, difference) / sqrt(2), stacked on a new axis after the channels."""
    even = x.narrow(dim, 0, x.shape[dim] // 2 * 2)
    a, b = even.unflatten(dim, (-1, 2)).unbind(dim + 1)
    return torch.stack(((a + b) / math.sqrt(2.0), (a - b) / math.sqrt(2.0)), dim=2)


def _unhaar_1d(pair: torch.Tensor, dim: int) -> torch.Tensor:
    """Inverse of :func:`_haar_1d` for a (B, C, 2, ...) tensor whose axis 2 holds (sum, difference)."""
    s, d = pair.unbind(2)
    a, b = (s + d) / math.sqrt(2.0), (s - d) / math.sqrt(2.0)
    return torch.stack((a, b), dim=dim + 1).flatten(dim, dim + 1)


class HaarFirstStage(nn.Module):
    """Orthonormal single-level Haar transform along the axes whose stride is 2 (see the module docstring)."""

    def __init__(self, config: WaveletConfig | None = None) -> None:
        super().__init__()
        self.config = config or WaveletConfig()
        if any(s not in (1, 2) for s in self.config.strides):
            raise ThinsliceError(f"wavelet strides must be 1 or 2 per axis, got {self.config.strides}")
        self.axes = [2 + i for i, s in enumerate(self.config.strides) if s == 2]
        # No parameters: this empty buffer follows .to(device), so tiled encode/decode knows where to run.
        self.register_buffer("device_probe", torch.zeros(0), persistent=False)

    @property
    def total_stride(self) -> tuple[int, int, int]:
        return self.config.total_stride

    @property
    def scaling_factor(self) -> float:
        return float(self.config.scaling_factor)

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(coefficients, zero log-variance): (B, 1, D, H, W) -> (B, latent_channels, D/sd, H/sh, W/sw)."""
        bad = [n for n, s in zip(x.shape[2:], self.total_stride, strict=True) if n % s]
        if x.shape[1] != 1 or bad:
            raise ThinsliceError(f"wavelet input must be one channel with sizes divisible by {self.total_stride}, "
                                 f"got {tuple(x.shape)}")
        z = x
        for axis in self.axes:
            z = _haar_1d(z, axis).flatten(1, 2)  # channels (c, pair): 1 -> 2 -> 4 -> 8
        return z, torch.zeros_like(z)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Exact inverse of :meth:`encode`."""
        x = z
        for axis in reversed(self.axes):
            x = _unhaar_1d(x.unflatten(1, (-1, 2)), axis)
        return x
