"""3D latent UNet with anisotropic (per-axis) down-sampling, timestep + degradation-factor conditioning.

Written here rather than using ``monai.networks.nets.DiffusionModelUNet``: MONAI's UNet down-samples every axis by 2
at every level, while thick-slice CT latents are much shorter along the slice axis (D) than in-plane, so each level
needs its own stride per axis (``(1, 2, 2)`` keeps the slice axis). The building blocks are MONAI's
(``DiffusionUNetResnetBlock`` with time-embedding injection, ``SpatialAttentionBlock``, ``get_timestep_embedding``).

Tensors are (B, C, D, H, W), D the slice axis. The network input is the ResShift-scaled noisy latent concatenated
with the LR latent (``2 * latent_channels`` channels); the output has ``latent_channels`` channels.
"""

from __future__ import annotations

import math
from typing import cast

import torch
import torch.nn.functional as F
from monai.networks.blocks import SpatialAttentionBlock
from monai.networks.nets.diffusion_model_unet import DiffusionUNetResnetBlock, get_timestep_embedding
from torch import nn
from torch.utils.checkpoint import checkpoint

from thinslice.presets import UNetConfig  # noqa: F401 (configured by it; re-exported)


def zero_module(module: nn.Module) -> nn.Module:
    """Zero all parameters so that the module's output starts at 0 (residual/control branches start as no-ops)."""
    for p in module.parameters():
        nn.init.zeros_(p)
    return module


def size_multiple(cfg: UNetConfig) -> tuple[int, int, int]:
    """(d, h, w) that every latent spatial size must be a multiple of (product of the strides per axis)."""
    d, h, w = (math.prod(s[axis] for s in cfg.strides) for axis in range(3))
    return d, h, w


class ConditionEmbedding(nn.Module):
    """Timestep embedding (sinusoidal + MLP) plus, optionally, the degradation-factor embedding (same form)."""

    def __init__(self, cfg: UNetConfig) -> None:
        super().__init__()
        self.base = cfg.base_channels
        self.dim = cfg.base_channels * 4
        self.factor_scale = cfg.factor_embed_scale
        self.time_mlp = nn.Sequential(nn.Linear(self.base, self.dim), nn.SiLU(), nn.Linear(self.dim, self.dim))
        self.factor_mlp = (
            nn.Sequential(nn.Linear(self.base, self.dim), nn.SiLU(), nn.Linear(self.dim, self.dim))
            if cfg.factor_conditioning
            else None
        )

    def forward(self, t: torch.Tensor, factor: torch.Tensor | float | None, batch: int) -> torch.Tensor:
        weight = cast(nn.Linear, self.time_mlp[0]).weight
        t = _as_batch(t, batch, torch.long, device=weight.device)
        emb = self.time_mlp(get_timestep_embedding(t, self.base).to(weight.dtype))
        if self.factor_mlp is not None:
            if factor is None:
                raise ValueError("this network is conditioned on the degradation factor: pass factor=")
            f = _as_batch(factor, batch, torch.float32, device=weight.device)
            emb = emb + self.factor_mlp(get_timestep_embedding(f * self.factor_scale, self.base).to(weight.dtype))
        return emb


def _as_batch(value: torch.Tensor | float, batch: int, dtype: torch.dtype, device=None) -> torch.Tensor:
    """A (B,) tensor from a scalar, 0-d or (B,) tensor."""
    tensor = torch.as_tensor(value).to(device=device, dtype=dtype)
    if tensor.ndim == 0:
        tensor = tensor.expand(batch)
    if tensor.shape != (batch,):
        raise ValueError(f"expected a scalar or a ({batch},) tensor, got shape {tuple(tensor.shape)}")
    return tensor


class WindowedSelfAttention(nn.Module):
    """MONAI ``SpatialAttentionBlock``, optionally restricted to non-overlapping windows.

    With ``window=None`` (or a window covering the whole tensor) this is exactly ``SpatialAttentionBlock``. With a
    window, the group norm still sees the whole tensor; the tokens are cut into windows (zero-padded at the far
    borders, with the padding masked out of the keys) and attended within each window.
    """

    def __init__(self, channels: int, num_head_channels: int, norm_num_groups: int, window) -> None:
        super().__init__()
        head = min(num_head_channels, channels)
        if channels % head:
            raise ValueError(f"unet.num_head_channels ({num_head_channels}) must divide the channels ({channels})")
        self.block = SpatialAttentionBlock(
            spatial_dims=3,
            num_channels=channels,
            num_head_channels=head,
            norm_num_groups=norm_num_groups,
            use_flash_attention=True,  # torch scaled_dot_product_attention: memory-efficient kernels
        )
        self.window = tuple(window) if window is not None else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        spatial = x.shape[2:]
        if self.window is None or all(w >= s for w, s in zip(self.window, spatial, strict=True)):
            return self.block(x)
        win = [min(w, s) for w, s in zip(self.window, spatial, strict=True)]
        pads = [(-s) % w for s, w in zip(spatial, win, strict=True)]
        h = self.block.norm(x)
        mask = None
        if any(pads):
            h = F.pad(h, (0, pads[2], 0, pads[1], 0, pads[0]))
            valid = torch.ones((1, 1, *spatial), dtype=h.dtype, device=h.device)
            valid = F.pad(valid, (0, pads[2], 0, pads[1], 0, pads[0]))
            mask = _to_windows(valid, win)[..., 0] > 0.5  # (B'*nw, N) with B' = 1
            mask = mask.repeat(x.shape[0], 1)[:, None, None, :]  # keys only; broadcast over heads and queries
        b, c = h.shape[:2]
        padded = h.shape[2:]
        tokens = _to_windows(h, win)
        out = self.block.attn(tokens, attn_mask=mask)
        out = _from_windows(out, win, b, c, padded)
        out = out[:, :, : spatial[0], : spatial[1], : spatial[2]]
        return x + out


def _to_windows(x: torch.Tensor, win: list[int]) -> torch.Tensor:
    """(B, C, D, H, W) -> (B * n_windows, wd * wh * ww, C)."""
    b, c, d, h, w = x.shape
    x = x.reshape(b, c, d // win[0], win[0], h // win[1], win[1], w // win[2], win[2])
    x = x.permute(0, 2, 4, 6, 3, 5, 7, 1)
    return x.reshape(-1, win[0] * win[1] * win[2], c)


def _from_windows(tokens: torch.Tensor, win: list[int], b: int, c: int, spatial) -> torch.Tensor:
    d, h, w = spatial
    x = tokens.reshape(b, d // win[0], h // win[1], w // win[2], win[0], win[1], win[2], c)
    x = x.permute(0, 7, 1, 4, 2, 5, 3, 6)
    return x.reshape(b, c, d, h, w)


class Downsample(nn.Module):
    """Strided 3x3x3 convolution with a per-axis stride."""

    def __init__(self, channels: int, stride: tuple[int, int, int]) -> None:
        super().__init__()
        self.conv = nn.Conv3d(channels, channels, kernel_size=3, stride=stride, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


class Upsample(nn.Module):
    """Nearest up-sampling by a per-axis factor, then a 3x3x3 convolution."""

    def __init__(self, channels: int, stride: tuple[int, int, int]) -> None:
        super().__init__()
        self.scale = tuple(float(s) for s in stride)
        self.conv = nn.Conv3d(channels, channels, kernel_size=3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=self.scale, mode="nearest"))


class _Checkpointed(nn.Module):
    """Mixin: run a sub-module with activation checkpointing when enabled and gradients are being recorded."""

    gradient_checkpointing: bool = False

    def _run(self, module: nn.Module, *args: torch.Tensor) -> torch.Tensor:
        if self.gradient_checkpointing and torch.is_grad_enabled():
            return checkpoint(module, *args, use_reentrant=False)
        return module(*args)


def _res_block(cfg: UNetConfig, cin: int, cout: int, temb: int) -> DiffusionUNetResnetBlock:
    return DiffusionUNetResnetBlock(
        spatial_dims=3, in_channels=cin, out_channels=cout, temb_channels=temb, norm_num_groups=cfg.norm_num_groups
    )


def _attention(cfg: UNetConfig, channels: int) -> WindowedSelfAttention:
    return WindowedSelfAttention(channels, cfg.num_head_channels, cfg.norm_num_groups, cfg.attention_window)


class UNetEncoder(_Checkpointed):
    """Input convolution, down-sampling levels and middle block; shared by the UNet and the IRControlNet."""

    def __init__(self, cfg: UNetConfig, in_channels: int) -> None:
        super().__init__()
        temb = cfg.base_channels * 4
        levels = len(cfg.channel_mult)
        first_attn_level = levels - cfg.attention_levels
        self.conv_in = nn.Conv3d(in_channels, cfg.base_channels, kernel_size=3, padding=1)
        self.res_blocks = nn.ModuleList()
        self.attn_blocks = nn.ModuleList()  # nn.Identity where a level has no attention
        self.downsamplers = nn.ModuleList()
        self.skip_channels = [cfg.base_channels]
        ch = cfg.base_channels
        for level, mult in enumerate(cfg.channel_mult):
            out = cfg.base_channels * mult
            for _ in range(cfg.num_res_blocks):
                self.res_blocks.append(_res_block(cfg, ch, out, temb))
                self.attn_blocks.append(_attention(cfg, out) if level >= first_attn_level else nn.Identity())
                ch = out
                self.skip_channels.append(ch)
            if level < levels - 1:
                self.downsamplers.append(Downsample(ch, cfg.strides[level]))
                self.skip_channels.append(ch)
        self.num_res_blocks = cfg.num_res_blocks
        self.mid_channels = ch
        self.mid_res1 = _res_block(cfg, ch, ch, temb)
        self.mid_attn = _attention(cfg, ch) if cfg.attention_levels > 0 else nn.Identity()
        self.mid_res2 = _res_block(cfg, ch, ch, temb)

    def forward(
        self, x: torch.Tensor, emb: torch.Tensor, hint: torch.Tensor | None = None
    ) -> tuple[list[torch.Tensor], torch.Tensor]:
        """(skip tensors, middle output). ``hint`` is added after the input convolution (control condition)."""
        h = self.conv_in(x)
        if hint is not None:
            h = h + hint
        skips = [h]
        block = 0
        for level in range(len(self.downsamplers) + 1):
            for _ in range(self.num_res_blocks):
                h = self._run(self.res_blocks[block], h, emb)
                h = self._run(self.attn_blocks[block], h)
                block += 1
                skips.append(h)
            if level < len(self.downsamplers):
                h = self.downsamplers[level](h)
                skips.append(h)
        h = self._run(self.mid_res1, h, emb)
        h = self._run(self.mid_attn, h)
        h = self._run(self.mid_res2, h, emb)
        return skips, h


class UNetDecoder(_Checkpointed):
    """Up-sampling levels consuming the encoder's skips (num_res_blocks + 1 blocks per level) and output head."""

    def __init__(self, cfg: UNetConfig, skip_channels: list[int], mid_channels: int) -> None:
        super().__init__()
        temb = cfg.base_channels * 4
        levels = len(cfg.channel_mult)
        first_attn_level = levels - cfg.attention_levels
        skips = list(skip_channels)
        self.res_blocks = nn.ModuleList()
        self.attn_blocks = nn.ModuleList()
        self.upsamplers = nn.ModuleList()
        self.blocks_per_level = cfg.num_res_blocks + 1
        ch = mid_channels
        for level in reversed(range(levels)):
            out = cfg.base_channels * cfg.channel_mult[level]
            for _ in range(self.blocks_per_level):
                self.res_blocks.append(_res_block(cfg, ch + skips.pop(), out, temb))
                self.attn_blocks.append(_attention(cfg, out) if level >= first_attn_level else nn.Identity())
                ch = out
            if level > 0:
                self.upsamplers.append(Upsample(ch, cfg.strides[level - 1]))
        self.out = nn.Sequential(
            nn.GroupNorm(cfg.norm_num_groups, ch, eps=1e-6),
            nn.SiLU(),
            zero_module(nn.Conv3d(ch, cfg.latent_channels, kernel_size=3, padding=1)),
        )

    def forward(self, h: torch.Tensor, skips: list[torch.Tensor], emb: torch.Tensor) -> torch.Tensor:
        skips = list(skips)
        block = 0
        for level in range(len(self.upsamplers) + 1):
            for _ in range(self.blocks_per_level):
                h = torch.cat([h, skips.pop()], dim=1)
                h = self._run(self.res_blocks[block], h, emb)
                h = self._run(self.attn_blocks[block], h)
                block += 1
            if level < len(self.upsamplers):
                h = self.upsamplers[level](h)
        return self.out(h)


class LatentUNet3D(nn.Module):
    """The latent denoiser: ``forward(x_t_scaled, t, y_latent, factor, control_residuals) -> prediction``.

    ``control_residuals`` (from :class:`thinslice.models.control.IRControlNet`) has one tensor per skip connection
    plus one for the middle block output, added as in DiffBIR's ControlledUnetModel.
    Every spatial size must be a multiple of :attr:`size_multiple` (product of the per-level strides per axis).
    """

    def __init__(self, cfg: UNetConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.embedding = ConditionEmbedding(cfg)
        self.encoder = UNetEncoder(cfg, in_channels=2 * cfg.latent_channels)
        self.decoder = UNetDecoder(cfg, self.encoder.skip_channels, self.encoder.mid_channels)
        self.set_gradient_checkpointing(cfg.gradient_checkpointing)

    @property
    def size_multiple(self) -> tuple[int, int, int]:
        return size_multiple(self.cfg)

    @property
    def num_control_residuals(self) -> int:
        return len(self.encoder.skip_channels) + 1

    def set_gradient_checkpointing(self, enabled: bool) -> None:
        """Trade compute for memory: recompute res/attention blocks in the backward pass."""
        self.encoder.gradient_checkpointing = enabled
        self.decoder.gradient_checkpointing = enabled

    def check_input(self, x_t: torch.Tensor, y_latent: torch.Tensor) -> None:
        c = self.cfg.latent_channels
        if x_t.ndim != 5 or x_t.shape[1] != c or y_latent.shape != x_t.shape:
            raise ValueError(
                f"expected x_t and y_latent of the same shape (B, {c}, D, H, W), got {tuple(x_t.shape)} "
                f"and {tuple(y_latent.shape)}"
            )
        mult = self.size_multiple
        if any(s % m for s, m in zip(x_t.shape[2:], mult, strict=True)):
            raise ValueError(f"latent size {tuple(x_t.shape[2:])} must be a multiple of {mult} (d, h, w)")

    def forward(
        self,
        x_t: torch.Tensor,
        t: torch.Tensor,
        y_latent: torch.Tensor,
        factor: torch.Tensor | float | None = None,
        control_residuals: list[torch.Tensor] | None = None,
    ) -> torch.Tensor:
        self.check_input(x_t, y_latent)
        emb = self.embedding(t, factor, x_t.shape[0])
        skips, h = self.encoder(torch.cat([x_t, y_latent], dim=1), emb)
        if control_residuals is not None:
            if len(control_residuals) != len(skips) + 1:
                raise ValueError(f"expected {len(skips) + 1} control residuals, got {len(control_residuals)}")
            h = h + control_residuals[-1]
            skips = [s + r for s, r in zip(skips, control_residuals[:-1], strict=True)]
        return self.decoder(h, skips, emb)


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())
