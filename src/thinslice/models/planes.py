"""Through-plane 2D network that computes on the *thick* grid (``--method planes``).

It sees one through-plane plane at a time (sagittal or coronal: the slice axis and one in-plane axis) on the thick
grid: M thick rows x W pixels. Its inputs per thick row are the thick slice itself and the k thin rows of the
cubic-dc estimate that fall inside that thick cell (space-to-depth along the slice axis), plus the acquisition
(thickness / spacing, slice profile) as constant channels. It emits k residual rows per thick row (depth-to-space,
as ESPCN/SAINT do), added to cubic-dc. So its cost per output voxel is 1/k of a thin-grid 2D network of the same
size (138k multiply-adds at x4 with two orientations, against 360k for the 3D baseline of ``models/baseline.py``),
and a training example is a small 2D plane, which is what lets it train on a CPU.

One shared trunk serves every integer factor; each factor k has its own input and output convolution (a small
head: k channels in and out). The output convolutions start at zero, so an untrained network returns cubic-dc.

Written by hand: MONAI has no depth-to-space through-plane network of this shape (its SubpixelUpsample is
isotropic and works on the fine grid's channel layout, not on a thick-slice cell).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

# Order of the one-hot profile channels; the first conditioning channel is thickness / spacing - 1.
PROFILE_CHANNELS = ("gaussian", "box", "decimate")
COND_CHANNELS = 1 + len(PROFILE_CHANNELS)


@dataclass
class PlanesConfig:
    channels: int = 48
    num_blocks: int = 6
    factors: tuple[int, ...] = (2, 3, 4, 5, 6)
    # Neighbouring planes on each side given as extra input channels (2.5D); 0 = the plane alone.
    context: int = 0

    @property
    def planes(self) -> int:
        return 1 + 2 * int(self.context)


def acquisition_vector(thickness_ratio: float, profile: str) -> list[float]:
    """Conditioning values for one plane: thickness / spacing - 1 and a one-hot slice profile."""
    ratio = 0.0 if profile == "decimate" else float(thickness_ratio) - 1.0
    return [ratio, *(1.0 if profile == p else 0.0 for p in PROFILE_CHANNELS)]


class _ResBlock2d(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1)
        self.act = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # EDSR-style residual scaling keeps training stable without normalisation layers.
        return x + 0.1 * self.conv2(self.act(self.conv1(x)))


def space_to_depth(thin: torch.Tensor, k: int) -> torch.Tensor:
    """(B, P, M*k, W) -> (B, P*k, M, W): thin row ``m*k + i`` of plane ``p`` becomes channel ``p*k + i`` of thick
    row ``m``."""
    b, p, n, w = thin.shape
    return thin.reshape(b, p, n // k, k, w).permute(0, 1, 3, 2, 4).reshape(b, p * k, n // k, w)


def depth_to_space(cells: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`space_to_depth`: (B, k, M, W) -> (B, 1, M*k, W)."""
    b, k, m, w = cells.shape
    return cells.permute(0, 2, 1, 3).reshape(b, 1, m * k, w)


class PlanesNet(nn.Module):
    """``forward(thick, base, cond)``: thick (B, P, M, W), base = cubic-dc (B, P, M*k, W) for the plane and its
    ``cfg.context`` neighbours on each side (P = ``cfg.planes``, the plane itself in the middle), cond
    (B, COND_CHANNELS), all in model range; returns the middle plane's base + a learned residual, (B, 1, M*k, W)."""

    def __init__(self, cfg: PlanesConfig) -> None:
        super().__init__()
        self.cfg = cfg
        c = cfg.channels
        self.heads_in = nn.ModuleDict({str(k): nn.Conv2d((1 + k) * cfg.planes + COND_CHANNELS, c, 3, padding=1)
                                       for k in cfg.factors})
        self.body = nn.Sequential(*[_ResBlock2d(c) for _ in range(cfg.num_blocks)])
        self.body_tail = nn.Conv2d(c, c, 3, padding=1)
        self.heads_out = nn.ModuleDict({str(k): nn.Conv2d(c, k, 3, padding=1) for k in cfg.factors})
        for head in self.heads_out.values():
            nn.init.zeros_(head.weight)
            nn.init.zeros_(head.bias)

    @property
    def factors(self) -> tuple[int, ...]:
        return tuple(int(k) for k in self.cfg.factors)

    def forward(self, thick: torch.Tensor, base: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        b, _, m, w = thick.shape
        k = base.shape[2] // m
        if base.shape[2] != m * k or str(k) not in self.heads_in:
            raise ValueError(f"base has {base.shape[2]} rows for {m} thick rows; supported factors {self.factors}")
        cells = space_to_depth(base, k)
        planes = cond.to(thick.dtype)[:, :, None, None].expand(b, cond.shape[1], m, w)
        features = self.heads_in[str(k)](torch.cat([thick, cells, planes], dim=1))
        features = features + self.body_tail(self.body(features))
        middle = self.cfg.context
        return base[:, middle: middle + 1] + depth_to_space(self.heads_out[str(k)](features))
