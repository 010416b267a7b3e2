"""Presets: one JSON file per preset in ``configs/`` (tiny, small, paper) -> typed dataclasses.

This is the one place that turns a preset name or file into model and training settings; model construction from
a preset lives in :mod:`thinslice.models.factory`.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, get_type_hints

from thinslice.errors import ThinsliceError

CONFIG_DIR = Path(__file__).resolve().parent / "configs"
PRESET_NAMES = ("tiny", "small", "paper")
DEFAULT_PRESET = "small"


# The diffusion settings live here, with the other sections of a preset, so that the denoiser network (models/) and
# the schedules (diffusion/) share them without importing each other.
PREDICTIONS = ("x0", "residual", "noise")
METHODS = ("resshift", "ddim")


@dataclass
class ResShiftConfig:
    """Paper defaults (Yue et al., ResShift): T = 15, kappa = 2, p = 0.3, min_noise = 0.04.

    ``method`` picks what the diffusion model is *trained* for: ``resshift`` (:mod:`thinslice.diffusion.resshift`)
    or ``ddim`` (a standard DDPM noise schedule with the LR latent concatenated, sampled with DDIM; see
    :mod:`thinslice.diffusion.ddim`). A network trained for one cannot be sampled with the other.
    """

    num_steps: int = 15
    kappa: float = 2.0
    power: float = 0.3
    min_noise: float = 0.04
    eta_max_sqrt: float = 0.99
    prediction: str = "x0"  # "x0" | "residual" | "noise"
    cfg_dropout: float = 0.1
    # Classifier-free guidance scale used at sampling time (1 = plain conditional, no extra network pass).
    guidance_scale: float = 1.0
    method: str = "resshift"  # "resshift" | "ddim"
    # DDPM/DDIM option (method == "ddim").
    ddim_train_steps: int = 1000
    ddim_schedule: str = "scaled_linear_beta"  # MONAI schedule name: "linear_beta" | "scaled_linear_beta" | ...
    ddim_prediction: str = "epsilon"  # "epsilon" | "v_prediction"
    ddim_sample_steps: int = 50

    def __post_init__(self) -> None:
        if self.prediction not in PREDICTIONS:
            raise ValueError(f"diffusion.prediction must be one of {PREDICTIONS}, got {self.prediction!r}")
        if self.method not in METHODS:
            raise ValueError(f"diffusion.method must be one of {METHODS}, got {self.method!r}")
        if self.num_steps < 2:
            raise ValueError("diffusion.num_steps must be at least 2")

    @classmethod
    def fast(cls, **overrides: Any) -> ResShiftConfig:
        """The 4-step schedule of the paper (T = 4, min_noise = 0.2)."""
        return dataclasses.replace(cls(num_steps=4, min_noise=0.2), **overrides)


# The networks' configurations: here, in the base layer, so that models/ and diffusion/ import them and this
# module imports neither (no cycle); each network's module re-exports its own.
@dataclass
class VAEConfig:
    """Shape of the 3D VAE. Tensors are (B, C, D, H, W) with D the slice axis."""

    in_channels: int = 1
    latent_channels: int = 4
    channels: tuple[int, ...] = (16, 32, 64)
    num_res_blocks: int = 1
    # One stride per down-sampling step (len(channels) - 1 entries), (d, h, w): (1, 2, 2) keeps the slice axis.
    strides: tuple[tuple[int, int, int], ...] = ((1, 2, 2), (2, 2, 2))
    attention_at_lowest: bool = False
    norm_num_groups: int = 8
    # Multiplies latents so that they have roughly unit variance for the diffusion model (set after training).
    scaling_factor: float = 1.0
    norm_eps: float = 1e-6
    # Channels per attention head at the lowest level; 0 = one head (as in the diffusers/SD VAE).
    attention_head_channels: int = 0
    # Recompute activations in the backward pass (less memory, ~30% slower); training only.
    gradient_checkpointing: bool = False

    def __post_init__(self) -> None:
        self.channels = tuple(int(c) for c in self.channels)
        strides = [tuple(int(s) for s in st) for st in self.strides]
        if len(strides) != len(self.channels) - 1:
            raise ThinsliceError(
                f"VAE config: {len(self.channels)} channel levels need {len(self.channels) - 1} strides, got "
                f"{len(strides)}; fix the 'vae' section of the preset"
            )
        for st in strides:
            if len(st) != 3 or any(s not in (1, 2) for s in st):
                raise ThinsliceError(f"VAE config: strides must be (d, h, w) tuples of 1 or 2, got {st}")
        self.strides = tuple((st[0], st[1], st[2]) for st in strides)
        for c in self.channels:
            if c % self.norm_num_groups:
                raise ThinsliceError(
                    f"VAE config: channels {self.channels} must be divisible by norm_num_groups={self.norm_num_groups}"
                )

    @property
    def total_stride(self) -> tuple[int, int, int]:
        """Down-sampling factor image -> latent per axis (d, h, w)."""
        d, h, w = (math.prod(st[a] for st in self.strides) for a in range(3))
        return d, h, w


@dataclass
class UNetConfig:
    """Shape of the latent denoiser. Input = noisy latent concatenated with the LR latent."""

    latent_channels: int = 4
    base_channels: int = 32
    channel_mult: tuple[int, ...] = (1, 2, 4)
    num_res_blocks: int = 1
    # One stride per down-sampling step (d, h, w); (1, 2, 2) where the slice axis must not shrink.
    strides: tuple[tuple[int, int, int], ...] = ((1, 2, 2), (2, 2, 2))
    # Self-attention at the coarsest ``attention_levels`` levels (2 = the two coarsest) and in the middle block.
    attention_levels: int = 2
    num_head_channels: int = 32
    norm_num_groups: int = 8
    gradient_checkpointing: bool = False
    # Condition on the degradation factor (thick/thin spacing ratio, e.g. 2..6), added to the time embedding.
    factor_conditioning: bool = True
    # The factor is multiplied by this before its sinusoidal embedding (factor 2..6 -> 200..600 "timesteps").
    factor_embed_scale: float = 100.0
    # Self-attention within non-overlapping (d, h, w) windows of latent voxels at each attention level (None =
    # global). Global attention over a whole-volume latent is quadratic in the number of voxels, so presets that
    # run on full volumes set a window about the size of the training patch at that level.
    attention_window: tuple[int, int, int] | None = None

    def __post_init__(self) -> None:
        if len(self.strides) != len(self.channel_mult) - 1:
            raise ValueError(
                f"unet.strides needs one (d, h, w) stride per down-sampling step: {len(self.channel_mult) - 1} "
                f"for channel_mult {self.channel_mult}, got {len(self.strides)}"
            )
        if any(len(s) != 3 or min(s) < 1 for s in self.strides):
            raise ValueError(f"unet.strides must be positive (d, h, w) triples, got {self.strides}")
        for mult in self.channel_mult:
            if (self.base_channels * mult) % self.norm_num_groups:
                raise ValueError("unet.norm_num_groups must divide base_channels * every channel_mult")


@dataclass
class ControlConfig:
    enabled: bool = True
    scale: float = 1.0
    # Start from the UNet's encoder weights (DiffBIR) rather than a random initialisation.
    init_from_unet: bool = True


FIRST_STAGES = ("vae", "haar")
LATENT_PRIORS = ("cubic", "cubic-dc", "planes")


@dataclass
class LatentConfig:
    """What the latent diffusion model works on: its first stage and the estimate that ResShift starts from.

    ``first_stage``: ``vae`` (the trained AutoencoderKL3D, ``vae.safetensors``) or ``haar`` (the lossless wavelet
    transform, :mod:`thinslice.models.wavelet`; no weights). ``prior``: the estimate the model refines (``planes``
    needs ``planes.safetensors`` in the bundle). ``residual_scale`` > 0 switches to residual latents: the model
    diffuses ``s * (E(truth) - E(prior))`` from zero, conditioned on ``E(prior)``, so that kappa's noise meets a
    residual of unit size (the planes prior leaves about 40 HU RMS, 0.02 in model range, that ResShift's noise would
    swamp); training sets ``s`` = 1 / RMS of that residual from the data and records it with the weights.
    """

    first_stage: str = "vae"
    wavelet_strides: tuple[int, int, int] = (2, 2, 2)
    prior: str = "cubic"
    residual_scale: float = 0.0

    def __post_init__(self) -> None:
        if self.first_stage not in FIRST_STAGES:
            raise ValueError(f"latent.first_stage must be one of {FIRST_STAGES}, got {self.first_stage!r}")
        if self.prior not in LATENT_PRIORS:
            raise ValueError(f"latent.prior must be one of {LATENT_PRIORS}, got {self.prior!r}")


@dataclass
class BaselineConfig:
    channels: int = 32
    num_blocks: int = 6


@dataclass
class PlanesConfig:
    channels: int = 48
    num_blocks: int = 6
    factors: tuple[int, ...] = (2, 3, 4, 5, 6)
    # Neighbouring planes on each side given as extra input channels (2.5D); 0 = the plane alone.
    context: int = 0
    # 2: planes (coronal and sagittal, averaged); 3: thick-grid blocks with 3x3x3 convolutions, one pass that sees
    # both in-plane axes at once (a learned fusion of the orientations).
    dims: int = 2

    def __post_init__(self) -> None:
        if self.dims not in (2, 3):
            raise ValueError(f"planes dims must be 2 or 3, not {self.dims}")
        if self.dims == 3 and self.context:
            raise ValueError("planes context (2.5D neighbours) applies to dims 2 only")

    @property
    def planes(self) -> int:
        return 1 + 2 * int(self.context)


@dataclass
class TrainConfig:
    """Settings shared by every trainer (VAE, diffusion, CNN baseline). Patch sizes are (d, h, w) voxels."""

    patch_size: tuple[int, int, int] = (32, 64, 64)
    batch_size: int = 2
    lr: float = 2e-4
    weight_decay: float = 0.0
    max_steps: int = 2000
    warmup_steps: int = 100
    ema_decay: float = 0.999
    val_every: int = 200
    checkpoint_every: int = 200
    log_every: int = 20
    seed: int = 0


@dataclass
class DegradationConfig:
    """Which thick-slice simulations a model is trained on (sampled per example)."""

    factors: tuple[float, ...] = (2.0, 3.0, 4.0, 5.0, 6.0)
    profiles: tuple[str, ...] = ("gaussian", "box", "decimate")


@dataclass
class PlaneSamplingConfig:
    """Training planes for ``train-planes``: ``rows`` thick rows x ``width`` pixels, drawn from the through-plane
    planes of thin volumes and, with probability ``inplane_fraction``, from axial slices degraded along one in-plane
    axis (SMORE/SR4ZCT self-supervision); a 3D network gets ``rows`` x ``block`` x ``block`` blocks instead, the
    in-plane examples with one in-plane axis as the slice axis. Gaussian/box thickness = spacing x U(1 - jitter,
    1 + jitter), or with probability ``overlap_fraction`` x U(1.2, ``max_overlap``) (overlapping slices)."""

    rows: int = 12
    width: int = 96
    block: int = 32  # in-plane size of the thick-grid blocks of a 3D (``planes.dims`` 3) network
    inplane_fraction: float = 0.5
    thickness_jitter: float = 0.15
    overlap_fraction: float = 0.25
    max_overlap: float = 2.2
    noise_hu: float = 0.0
    # Real scans (docs/design/clinical.md): with probability ``profile_mismatch`` the slabs are made with a profile
    # drawn from the family (degrade.PROFILE_FAMILY) and a FWHM of U(``mismatch_fwhm``) x the declared thickness,
    # while the network and the consistency step are told the declared one, as a user who does not know the
    # scanner's slice sensitivity profile would tell them.
    profile_mismatch: float = 0.0
    mismatch_fwhm: tuple[float, float] = (0.8, 1.6)
    # Intensity augmentation: HU above air scaled by U(1 - j, 1 + j) (contrast phases, calibration).
    intensity_jitter: float = 0.0
    # Reconstruction kernels: the thin plane sharpened or smoothed along its pixel axis by an unsharp mask of this
    # sigma (pixels) and an amount U(-0.5, 0.5) (0: off).
    kernel_sigma: float = 0.0


@dataclass
class Preset:
    name: str
    vae: VAEConfig = field(default_factory=VAEConfig)
    unet: UNetConfig = field(default_factory=UNetConfig)
    control: ControlConfig = field(default_factory=ControlConfig)
    diffusion: ResShiftConfig = field(default_factory=ResShiftConfig)
    latent: LatentConfig = field(default_factory=LatentConfig)
    baseline: BaselineConfig = field(default_factory=BaselineConfig)
    planes: PlanesConfig = field(default_factory=PlanesConfig)
    planes_data: PlaneSamplingConfig = field(default_factory=PlaneSamplingConfig)
    degradation: DegradationConfig = field(default_factory=DegradationConfig)
    train_vae: TrainConfig = field(default_factory=TrainConfig)
    train_diffusion: TrainConfig = field(default_factory=TrainConfig)
    train_baseline: TrainConfig = field(default_factory=TrainConfig)
    train_planes: TrainConfig = field(default_factory=TrainConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @property
    def latent_channels(self) -> int:
        """Channels of the first stage's latent (the denoiser's input and output)."""
        if self.latent.first_stage == "haar":
            return math.prod(self.latent.wavelet_strides)
        return self.vae.latent_channels


def _build(cls: type, data: dict[str, Any], where: str) -> Any:
    """Dataclass from a dict, converting lists to tuples (JSON has no tuples) and rejecting unknown keys."""
    hints = get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = set(data) - names
    if unknown:
        raise ThinsliceError(f"unknown preset keys in {where}: {sorted(unknown)}")
    kwargs: dict[str, Any] = {}
    for key, value in data.items():
        hint = hints[key]
        if isinstance(hint, type) and dataclasses.is_dataclass(hint):
            kwargs[key] = _build(hint, value, f"{where}.{key}")
        else:
            kwargs[key] = _tupleize(value)
    return cls(**kwargs)


def _tupleize(value: Any) -> Any:
    if isinstance(value, list):
        return tuple(_tupleize(v) for v in value)
    return value


def preset_from_dict(data: dict[str, Any]) -> Preset:
    if "name" not in data:
        raise ThinsliceError("preset has no 'name'")
    return _build(Preset, data, data["name"])


def load_preset(name_or_path: str | Path | Preset = DEFAULT_PRESET) -> Preset:
    """A preset by name (tiny, small, paper) or from a JSON file."""
    if isinstance(name_or_path, Preset):
        return name_or_path
    path = Path(name_or_path)
    if str(name_or_path) in PRESET_NAMES:
        path = CONFIG_DIR / f"{name_or_path}.json"
    elif path.suffix != ".json" or not path.is_file():
        raise ThinsliceError(
            f"unknown preset '{name_or_path}': use one of {', '.join(PRESET_NAMES)} or a path to a preset .json file"
        )
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ThinsliceError(f"cannot read preset file {path}: {exc}") from exc
    return preset_from_dict(data)
