"""Presets: one JSON file per preset in ``configs/`` (tiny, small, paper) -> typed dataclasses.

This is the one place that turns a preset name or file into model and training settings; model construction from
a preset lives in :mod:`thinslice.models.factory`.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, get_type_hints

from thinslice.errors import ThinsliceError
from thinslice.models.baseline import BaselineConfig
from thinslice.models.control import ControlConfig
from thinslice.models.planes import PlanesConfig
from thinslice.models.unet import UNetConfig
from thinslice.models.vae import VAEConfig

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
    def fast(cls, **overrides: object) -> ResShiftConfig:
        """The 4-step schedule of the paper (T = 4, min_noise = 0.2)."""
        values: dict[str, object] = {"num_steps": 4, "min_noise": 0.2}
        values.update(overrides)
        return cls(**values)  # type: ignore[arg-type]


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


@dataclass
class Preset:
    name: str
    vae: VAEConfig = field(default_factory=VAEConfig)
    unet: UNetConfig = field(default_factory=UNetConfig)
    control: ControlConfig = field(default_factory=ControlConfig)
    diffusion: ResShiftConfig = field(default_factory=ResShiftConfig)
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
        if dataclasses.is_dataclass(hint):
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
