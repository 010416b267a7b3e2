"""3D AutoencoderKL for CT with per-axis down-sampling.

MONAI's ``AutoencoderKL`` down-samples every spatial axis alike (stride 2 everywhere), which would halve the slice
axis at every level. Thick/thin CT needs control per axis (in-plane only ``(1, 2, 2)`` vs isotropic ``(2, 2, 2)``),
so the encoder/decoder are written here with per-level stride tuples: strided convolution to go down, nearest
up-sampling with a ``scale_factor`` tuple + convolution to go up. The building blocks are MONAI's
(``AEKLResBlock``, ``SpatialAttentionBlock``, ``Convolution``).

Module names deliberately mirror the diffusers ``AutoencoderKL`` layout (``down_blocks.N.resnets.M``,
``mid_block.attentions.0``, ``conv_norm_out``, ``quant_conv``, ...), so that pretrained 2D weights map onto this model
by name (see :mod:`thinslice.models.pretrained`).

Tensors are (B, C, D, H, W) with D the slice axis, values in model range (``hu_to_model``: HU -> [-1, 1]).
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from typing import cast

import torch
import torch.nn.functional as F
from monai.networks.blocks import Convolution, SpatialAttentionBlock
from monai.networks.nets.autoencoderkl import AEKLResBlock
from torch import nn
from torch.utils.checkpoint import checkpoint

from thinslice.errors import ThinsliceError
from thinslice.presets import VAEConfig  # noqa: F401 (configured by it; re-exported)

# Fields of VAEConfig that do not change the architecture (weights of two configs differing only here are
# interchangeable).
NON_ARCHITECTURE_FIELDS = ("scaling_factor", "gradient_checkpointing")


def _conv(cin: int, cout: int, kernel: int, stride: int | tuple[int, ...] = 1, padding: int = 0) -> Convolution:
    return Convolution(spatial_dims=3, in_channels=cin, out_channels=cout, strides=stride, kernel_size=kernel,
                       padding=padding, conv_only=True)


class Downsample(nn.Module):
    """Strided 3x3x3 convolution with a per-axis stride.

    Padding follows diffusers' ``Downsample2D``: (0, 1) on strided axes (so that pretrained 2D kernels give the same
    result), symmetric (1, 1) on axes with stride 1.
    """

    def __init__(self, channels: int, stride: tuple[int, int, int]) -> None:
        super().__init__()
        self.stride = tuple(stride)
        pads: list[int] = []
        for s in reversed(self.stride):  # F.pad takes the last axis first
            pads += [0, 1] if s == 2 else [1, 1]
        self.pads = tuple(pads)
        self.conv = _conv(channels, channels, 3, stride=self.stride, padding=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, self.pads, mode="constant", value=0.0))


class Upsample(nn.Module):
    """Nearest up-sampling by a per-axis factor, then a 3x3x3 convolution (diffusers' ``Upsample2D`` in 3D)."""

    def __init__(self, channels: int, stride: tuple[int, int, int]) -> None:
        super().__init__()
        self.stride = tuple(float(s) for s in stride)
        self.conv = _conv(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # nearest interpolation is not implemented for bf16 on every backend: up-sample in float32.
        dtype = x.dtype
        x = F.interpolate(x.float(), scale_factor=self.stride, mode="nearest").to(dtype)
        return self.conv(x)


class _Level(nn.Module):
    """Resnets of one resolution level, then an optional resampler (``downsamplers``/``upsamplers`` as in diffusers)."""

    def __init__(self, resnets: Sequence[nn.Module], sampler_name: str | None = None,
                 sampler: nn.Module | None = None) -> None:
        super().__init__()
        self.resnets = nn.ModuleList(resnets)
        self.sampler_name = sampler_name
        if sampler_name and sampler is not None:
            self.add_module(sampler_name, nn.ModuleList([sampler]))

    def resampler(self) -> nn.Module | None:
        """The level's down- or up-sampler (held under its diffusers name), or None at the last level."""
        if not self.sampler_name:
            return None
        return cast(nn.ModuleList, getattr(self, self.sampler_name))[0]


def _levels(blocks: nn.ModuleList) -> Iterator[_Level]:
    """The levels of an encoder or decoder, typed (iterating a ModuleList yields plain Modules)."""
    return cast(Iterator[_Level], iter(blocks))


class MidBlock(nn.Module):
    """Resnet, optional self-attention, resnet at the lowest resolution."""

    def __init__(self, channels: int, cfg: VAEConfig) -> None:
        super().__init__()
        self.resnets = nn.ModuleList([_resnet(channels, channels, cfg), _resnet(channels, channels, cfg)])
        self.attentions = nn.ModuleList()
        if cfg.attention_at_lowest:
            head = cfg.attention_head_channels or None
            self.attentions.append(SpatialAttentionBlock(
                spatial_dims=3, num_channels=channels, num_head_channels=head, norm_num_groups=cfg.norm_num_groups,
                norm_eps=cfg.norm_eps, use_flash_attention=True))


def _resnet(cin: int, cout: int, cfg: VAEConfig) -> AEKLResBlock:
    return AEKLResBlock(spatial_dims=3, in_channels=cin, norm_num_groups=cfg.norm_num_groups, norm_eps=cfg.norm_eps,
                        out_channels=cout)


def _run(module: nn.Module, x: torch.Tensor, use_checkpoint: bool) -> torch.Tensor:
    if use_checkpoint and torch.is_grad_enabled():
        return checkpoint(module, x, use_reentrant=False)
    return module(x)


class Encoder3D(nn.Module):
    def __init__(self, cfg: VAEConfig) -> None:
        super().__init__()
        self.cfg = cfg
        ch = cfg.channels
        self.conv_in = _conv(cfg.in_channels, ch[0], 3, padding=1)
        self.down_blocks = nn.ModuleList()
        prev = ch[0]
        for level, out in enumerate(ch):
            resnets = [_resnet(prev if i == 0 else out, out, cfg) for i in range(cfg.num_res_blocks)]
            last = level == len(ch) - 1
            self.down_blocks.append(_Level(resnets, None if last else "downsamplers",
                                           None if last else Downsample(out, cfg.strides[level])))
            prev = out
        self.mid_block = MidBlock(ch[-1], cfg)
        self.conv_norm_out = nn.GroupNorm(cfg.norm_num_groups, ch[-1], eps=cfg.norm_eps)
        self.conv_out = _conv(ch[-1], 2 * cfg.latent_channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ckpt = self.cfg.gradient_checkpointing and self.training
        h = self.conv_in(x)
        for block in _levels(self.down_blocks):
            for resnet in block.resnets:
                h = _run(resnet, h, ckpt)
            sampler = block.resampler()
            if sampler is not None:
                h = _run(sampler, h, ckpt)
        h = _run(self.mid_block.resnets[0], h, ckpt)
        for attn in self.mid_block.attentions:
            h = _run(attn, h, ckpt)
        h = _run(self.mid_block.resnets[1], h, ckpt)
        return self.conv_out(F.silu(self.conv_norm_out(h)))


class Decoder3D(nn.Module):
    def __init__(self, cfg: VAEConfig) -> None:
        super().__init__()
        self.cfg = cfg
        rev = list(reversed(cfg.channels))
        rev_strides = list(reversed(cfg.strides))
        self.conv_in = _conv(cfg.latent_channels, rev[0], 3, padding=1)
        self.mid_block = MidBlock(rev[0], cfg)
        self.up_blocks = nn.ModuleList()
        prev = rev[0]
        for level, out in enumerate(rev):
            resnets = [_resnet(prev if i == 0 else out, out, cfg) for i in range(cfg.num_res_blocks + 1)]
            last = level == len(rev) - 1
            self.up_blocks.append(_Level(resnets, None if last else "upsamplers",
                                         None if last else Upsample(out, rev_strides[level])))
            prev = out
        self.conv_norm_out = nn.GroupNorm(cfg.norm_num_groups, rev[-1], eps=cfg.norm_eps)
        self.conv_out = _conv(rev[-1], cfg.in_channels, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        ckpt = self.cfg.gradient_checkpointing and self.training
        h = self.conv_in(z)
        h = _run(self.mid_block.resnets[0], h, ckpt)
        for attn in self.mid_block.attentions:
            h = _run(attn, h, ckpt)
        h = _run(self.mid_block.resnets[1], h, ckpt)
        for block in _levels(self.up_blocks):
            for resnet in block.resnets:
                h = _run(resnet, h, ckpt)
            sampler = block.resampler()
            if sampler is not None:
                h = _run(sampler, h, ckpt)
        return self.conv_out(F.silu(self.conv_norm_out(h)))


class AutoencoderKL3D(nn.Module):
    """KL-regularised 3D autoencoder: image (model range) <-> latent with ``latent_channels`` channels.

    ``encode``/``decode`` work on raw latents; ``encode_latent``/``decode_latent`` apply ``config.scaling_factor``
    (what the diffusion model sees: roughly unit variance).
    """

    def __init__(self, config: VAEConfig) -> None:
        super().__init__()
        self.config = config
        self.encoder = Encoder3D(config)
        self.decoder = Decoder3D(config)
        lc = config.latent_channels
        self.quant_conv = _conv(2 * lc, 2 * lc, 1)
        self.post_quant_conv = _conv(lc, lc, 1)

    # ------------------------------------------------------------------------------------------------ shapes
    @property
    def total_stride(self) -> tuple[int, int, int]:
        return self.config.total_stride

    def latent_shape(self, spatial: tuple[int, int, int]) -> tuple[int, int, int]:
        """Latent spatial shape for an input of ``spatial`` (d, h, w), which must be divisible by the total stride."""
        self.check_input_shape(spatial)
        (d, h, w), (sd, sh, sw) = spatial, self.total_stride
        return d // sd, h // sh, w // sw

    def check_input_shape(self, spatial: tuple[int, ...]) -> None:
        bad = [n for n, s in zip(spatial, self.total_stride, strict=True) if n % s]
        if bad:
            raise ThinsliceError(
                f"VAE input of spatial shape {tuple(spatial)} is not divisible by the total stride "
                f"{self.total_stride}; pad it (thinslice.models.tiling pads with air automatically)"
            )

    # ------------------------------------------------------------------------------------------------- model
    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Posterior (mean, logvar) of the diagonal Gaussian, each (B, latent_channels, d', h', w')."""
        self.check_input_shape(tuple(x.shape[2:]))
        moments = self.quant_conv(self.encoder(x))
        mean, logvar = torch.chunk(moments, 2, dim=1)
        return mean, torch.clamp(logvar, -30.0, 20.0)

    @staticmethod
    def sample(mean: torch.Tensor, logvar: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Reparameterised sample of the posterior."""
        noise = torch.randn(mean.shape, generator=generator, device=mean.device, dtype=mean.dtype)
        return mean + torch.exp(0.5 * logvar) * noise

    @staticmethod
    def kl_loss(mean: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
        """KL(posterior || N(0, I)) summed over latent voxels, averaged over the batch."""
        kl = 0.5 * (mean.float().pow(2) + logvar.float().exp() - 1.0 - logvar.float())
        return kl.flatten(1).sum(1).mean()

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.post_quant_conv(z))

    def forward(
        self, x: torch.Tensor, sample_posterior: bool = True
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(reconstruction, mean, logvar)."""
        mean, logvar = self.encode(x)
        z = self.sample(mean, logvar) if sample_posterior else mean
        return self.decode(z), mean, logvar

    # ----------------------------------------------------------------------------------------- scaled latents
    @property
    def scaling_factor(self) -> float:
        return float(self.config.scaling_factor)

    def set_scaling_factor(self, value: float) -> None:
        if not math.isfinite(value) or value <= 0:
            raise ThinsliceError(f"latent scaling factor must be positive and finite, got {value}")
        self.config.scaling_factor = float(value)

    def encode_latent(self, x: torch.Tensor) -> torch.Tensor:
        """Posterior mean times the scaling factor: the latent the diffusion model works on."""
        return self.encode(x)[0] * self.scaling_factor

    def decode_latent(self, z: torch.Tensor) -> torch.Tensor:
        """Inverse of :meth:`encode_latent`: model-range image from a scaled latent."""
        return self.decode(z / self.scaling_factor)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
