"""Networks from a preset (name, JSON path or :class:`~thinslice.presets.Preset`) or from a kind's own config.

:func:`build_model` builds any network kind through its row in :mod:`thinslice.models.kinds` (loading rebuilds a
network there from its weights file's record, so the architecture always comes from one code path); the
``build_*`` helpers are the preset-name conveniences the trainers and tests use.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import nn

from thinslice.models.baseline import ResidualCNN3D
from thinslice.models.denoiser import LatentDenoiser, denoiser_from_preset
from thinslice.models.kinds import network_kind
from thinslice.models.planes import PlanesNet
from thinslice.models.vae import AutoencoderKL3D
from thinslice.models.wavelet import HaarFirstStage, WaveletConfig
from thinslice.presets import LatentConfig, Preset, load_preset


def build_model(kind: str, source: str | Path | Preset | Any) -> nn.Module:
    """Network of ``kind`` (a row of the kinds table) for a preset, or for the kind's own config dataclass (a
    plug-in kind whose config is not a preset section)."""
    row = network_kind(kind)
    if isinstance(source, (str, Path, Preset)):
        return row.build(row.config_of(load_preset(source)))
    return row.build(source)


def build_vae(preset: str | Path | Preset) -> AutoencoderKL3D:
    return AutoencoderKL3D(load_preset(preset).vae)


def build_first_stage(preset: str | Path | Preset) -> HaarFirstStage | None:
    """The parameter-free first stage of ``preset.latent`` (the Haar transform), or None when it is the trained
    VAE (loaded from its weights file instead)."""
    latent = load_preset(preset).latent
    if latent.first_stage == "haar":
        return build_haar(latent)
    return None


def build_haar(latent: LatentConfig) -> HaarFirstStage:
    """The parameter-free Haar first stage of a preset's ``latent`` section."""
    d, h, w = (int(s) for s in latent.wavelet_strides)
    return HaarFirstStage(WaveletConfig(strides=(d, h, w)))


def build_baseline(preset: str | Path | Preset) -> ResidualCNN3D:
    """CNN baseline ``ResidualCNN3D(preset.baseline)``."""
    return ResidualCNN3D(load_preset(preset).baseline)


def build_denoiser(preset: str | Path | Preset) -> LatentDenoiser:
    """The whole latent denoiser of ``preset`` (see :func:`~thinslice.models.denoiser.denoiser_from_preset`)."""
    return denoiser_from_preset(load_preset(preset))


def build_planes(preset: str | Path | Preset) -> PlanesNet:
    """Through-plane 2D network ``PlanesNet(preset.planes)`` (``--method planes``)."""
    return PlanesNet(load_preset(preset).planes)
