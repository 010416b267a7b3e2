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

import torch
from torch import nn

from thinslice.presets import PlanesConfig  # noqa: F401 (configured by it; re-exported)

# Order of the one-hot profile channels; the first conditioning channel is thickness / spacing - 1.
PROFILE_CHANNELS = ("gaussian", "box", "decimate")
COND_CHANNELS = 1 + len(PROFILE_CHANNELS)


def acquisition_vector(thickness_ratio: float, profile: str) -> list[float]:
    """Conditioning values for one plane: thickness / spacing - 1 and a one-hot slice profile. The smooth profiles
    without a channel of their own (triangle, trapezoid, tailed) take the Gaussian's: their FWHM is the thickness and
    their shape is closer to it than to a box (the networks are trained to tolerate the difference)."""
    ratio = 0.0 if profile == "decimate" else float(thickness_ratio) - 1.0
    channel = profile if profile in PROFILE_CHANNELS else "gaussian"
    return [ratio, *(1.0 if channel == p else 0.0 for p in PROFILE_CHANNELS)]


def _conv(dims: int, c_in: int, c_out: int) -> nn.Conv2d | nn.Conv3d:
    """3-wide convolution over the slice axis and the in-plane axes (2D planes or 3D thick-grid blocks)."""
    if dims == 2:
        return nn.Conv2d(c_in, c_out, 3, padding=1)
    return nn.Conv3d(c_in, c_out, 3, padding=1)


class _ResBlock(nn.Module):
    def __init__(self, channels: int, dims: int = 2) -> None:
        super().__init__()
        self.conv1 = _conv(dims, channels, channels)
        self.act = nn.ReLU(inplace=True)
        self.conv2 = _conv(dims, channels, channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # EDSR-style residual scaling keeps training stable without normalisation layers.
        return x + 0.1 * self.conv2(self.act(self.conv1(x)))


def space_to_depth(thin: torch.Tensor, k: int) -> torch.Tensor:
    """(B, P, M*k, *R) -> (B, P*k, M, *R): thin row ``m*k + i`` of plane ``p`` becomes channel ``p*k + i`` of thick
    row ``m`` (R: the in-plane axes, one for planes, two for blocks)."""
    b, p, n, *rest = thin.shape
    cells = thin.reshape(b, p, n // k, k, *rest).transpose(2, 3)
    return cells.reshape(b, p * k, n // k, *rest)


def depth_to_space(cells: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`space_to_depth`: (B, k, M, *R) -> (B, 1, M*k, *R)."""
    b, k, m, *rest = cells.shape
    return cells.transpose(1, 2).reshape(b, 1, m * k, *rest)


class PlanesNet(nn.Module):
    """``forward(thick, base, cond)``: thick (B, P, M, *R), base = cubic-dc (B, P, M*k, *R) for the plane and its
    ``cfg.context`` neighbours on each side (P = ``cfg.planes``, the plane itself in the middle), cond
    (B, COND_CHANNELS), all in model range; returns the middle plane's base + a learned residual, (B, 1, M*k, *R).
    R is one in-plane axis (W) for ``dims`` 2 and two (H, W) for ``dims`` 3."""

    def __init__(self, cfg: PlanesConfig) -> None:
        super().__init__()
        self.cfg = cfg
        c = cfg.channels
        d = cfg.dims
        self.heads_in = nn.ModuleDict({str(k): _conv(d, (1 + k) * cfg.planes + COND_CHANNELS, c)
                                       for k in cfg.factors})
        self.body = nn.Sequential(*[_ResBlock(c, d) for _ in range(cfg.num_blocks)])
        self.body_tail = _conv(d, c, c)
        heads_out = {str(k): _conv(d, c, k) for k in cfg.factors}
        for head in heads_out.values():
            nn.init.zeros_(head.weight)
            if head.bias is not None:
                nn.init.zeros_(head.bias)
        self.heads_out = nn.ModuleDict(heads_out)

    @property
    def factors(self) -> tuple[int, ...]:
        return tuple(int(k) for k in self.cfg.factors)

    def forward(self, thick: torch.Tensor, base: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        b, _, m, *rest = thick.shape
        k = base.shape[2] // m
        if base.shape[2] != m * k or str(k) not in self.heads_in:
            raise ValueError(f"base has {base.shape[2]} rows for {m} thick rows; supported factors {self.factors}")
        cells = space_to_depth(base, k)
        planes = cond.to(thick.dtype).reshape(b, -1, *([1] * (1 + len(rest)))).expand(b, cond.shape[1], m, *rest)
        features = self.heads_in[str(k)](torch.cat([thick, cells, planes], dim=1))
        features = features + self.body_tail(self.body(features))
        middle = self.cfg.context
        return base[:, middle: middle + 1] + depth_to_space(self.heads_out[str(k)](features))
