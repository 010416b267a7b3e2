"""The one place that builds networks from a preset (name, JSON path or :class:`~thinslice.presets.Preset`).

Weights files record the preset they were trained with (see :mod:`thinslice.checkpoints.files`), and loading rebuilds
the network here from that record, so the architecture always comes from one code path.
"""

from __future__ import annotations

from pathlib import Path

from torch import nn

from thinslice.errors import ThinsliceError
from thinslice.models.vae import AutoencoderKL3D
from thinslice.presets import Preset, load_preset

# kind -> preset section holding that network's architecture.
# Kind of network -> the preset sections that describe its architecture (checked when weights are loaded).
MODEL_KINDS: dict[str, tuple[str, ...]] = {
    "vae": ("vae",), "unet": ("unet",), "control": ("control",), "baseline": ("baseline",),
    "denoiser": ("unet", "control"), "planes": ("planes",),
}


def build_vae(preset: str | Path | Preset) -> AutoencoderKL3D:
    return AutoencoderKL3D(load_preset(preset).vae)


def build_first_stage(preset: str | Path | Preset) -> nn.Module | None:
    """The parameter-free first stage of ``preset.latent`` (the Haar transform), or None when it is the trained
    VAE (loaded from its weights file instead)."""
    from thinslice.models.wavelet import HaarFirstStage, WaveletConfig

    latent = load_preset(preset).latent
    if latent.first_stage == "haar":
        return HaarFirstStage(WaveletConfig(strides=tuple(latent.wavelet_strides)))  # type: ignore[arg-type]
    return None


def build_unet(preset: str | Path | Preset) -> nn.Module:
    """``LatentUNet3D`` for ``preset.unet``, with as many latent channels as the preset's VAE makes."""
    import dataclasses

    from thinslice.models.unet import LatentUNet3D

    p = load_preset(preset)
    return LatentUNet3D(dataclasses.replace(p.unet, latent_channels=p.latent_channels))


def build_control(preset: str | Path | Preset) -> nn.Module:
    """A freshly initialised ``IRControlNet`` for ``preset.unet``/``preset.control``."""
    import dataclasses

    from thinslice.models.control import IRControlNet

    p = load_preset(preset)
    return IRControlNet(dataclasses.replace(p.unet, latent_channels=p.latent_channels), p.control)


def build_baseline(preset: str | Path | Preset) -> nn.Module:
    """CNN baseline ``ResidualCNN3D(preset.baseline)``."""
    from thinslice.models.baseline import ResidualCNN3D

    return ResidualCNN3D(load_preset(preset).baseline)


def build_denoiser(preset: str | Path | Preset) -> nn.Module:
    """The whole latent denoiser: UNet + IRControlNet (when ``control.enabled``) + null condition.

    The control net starts as a copy of the UNet encoder when ``control.init_from_unet`` (DiffBIR), else randomly.
    """
    from thinslice.models.control import IRControlNet
    from thinslice.models.denoiser import LatentDenoiser

    p = load_preset(preset)
    unet = build_unet(p)
    control = None
    if p.control.enabled:
        control = IRControlNet.from_unet(unet, p.control) if p.control.init_from_unet else IRControlNet(
            unet.cfg, p.control)
    return LatentDenoiser(unet, control, p.diffusion)


def build_planes(preset: str | Path | Preset) -> nn.Module:
    """Through-plane 2D network ``PlanesNet(preset.planes)`` (``--method planes``)."""
    from thinslice.models.planes import PlanesNet

    return PlanesNet(load_preset(preset).planes)


_BUILDERS = {"vae": build_vae, "unet": build_unet, "control": build_control, "baseline": build_baseline,
             "planes": build_planes}


def build_model(kind: str, preset: str | Path | Preset) -> nn.Module:
    """Network of ``kind`` ('vae', 'unet', 'control', 'baseline', 'planes', 'denoiser') for ``preset``."""
    if kind == "denoiser":
        return build_denoiser(preset)
    if kind not in _BUILDERS:
        raise ThinsliceError(f"unknown model kind '{kind}': use one of {', '.join(_BUILDERS)}")
    return _BUILDERS[kind](preset)
