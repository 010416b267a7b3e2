"""The one table of network kinds: for each network that a weights file can hold, its file name in a bundle, the
config it is built from, the builder, what its weights file records and the command that trains it.

The checkpoint layer (file names, locating, saving, loading, the architecture check and the "train them with ..."
hint) and :func:`thinslice.models.factory.build_model` read this table and nothing else, so a new network kind is one
:class:`NetworkKind` row passed to :func:`register_kind` (plus its model module and its pipeline). It lives in
``models/`` because the builders do (the layers run io -> models -> checkpoints -> infer).

What a file records (its ``preset_config``): the kind's own config sections (``sections``; the architecture,
checked against ``--preset``) and the facts inference reads from the loaded network's preset (``needs``: whole
sections or ``section.field``), not the whole preset; anything not recorded reads as its default. Files written
before this (format 1) carry the whole preset and load as they are.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from thinslice.errors import ThinsliceError
from thinslice.models.baseline import ResidualCNN3D
from thinslice.models.denoiser import LatentDenoiser, denoiser_from_preset
from thinslice.models.planes import PlanesNet
from thinslice.models.vae import AutoencoderKL3D
from thinslice.presets import Preset

# Sections a preset has; a plug-in kind's own section (config_type) is recorded beside them, outside the Preset.
PRESET_SECTIONS = frozenset(f.name for f in dataclasses.fields(Preset)) - {"name"}


# Limits on what a weights file's record may ask for, checked before its network is built: the record is plain
# text that anyone can edit, and 200,000 channels would make the builder try to allocate a terabyte. Each integer of
# an architecture field (lists element by element) must lie in 0..limit; the limits are far above every preset
# (the paper preset has 256 channels and 8 blocks at most). A field not listed gets FIELD_LIMIT.
FIELD_LIMITS: Mapping[str, int] = {
    "channels": 1024, "base_channels": 512, "in_channels": 16, "latent_channels": 64, "num_blocks": 64,
    "num_res_blocks": 8, "channel_mult": 16, "num_head_channels": 1024, "attention_head_channels": 1024,
    "norm_num_groups": 512, "attention_levels": 8, "strides": 4, "factors": 16, "context": 8,
    "attention_window": 512, "dims": 3,
}
FIELD_LIMIT = 4096
# Parameters a network of a file's record may have (counted on the meta device, without allocating): 200 M, some
# 30 times the paper denoiser.
MAX_PARAMETERS = 200_000_000


@dataclass(frozen=True)
class Saving:
    """How a network describes itself when saved: the preset as it records it (its own configs in place), the
    variant file it goes to in a bundle (None: the kind's main file) and extra metadata strings."""

    preset: Preset
    variant: int | None = None
    metadata: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class NetworkKind:
    """One row of the table. ``build`` takes the kind's config: its section's dataclass when it has one section,
    the whole :class:`Preset` when it has several (the denoiser). ``variant`` is the file name pattern of numbered
    variants beside the main file, ``{}`` standing for the number (planes-x4, denoiser-4step). ``config_type`` is
    set for a kind whose config is not a preset section (a plug-in): its section is then recorded from the
    network's own ``config``. ``describe`` overrides how a network of several sections records itself."""

    name: str
    sections: tuple[str, ...]
    build: Callable[[Any], nn.Module]
    train_command: str
    needs: tuple[str, ...] = ()
    variant: str | None = None
    config_type: type | None = None
    describe: Callable[[nn.Module, Preset], Saving] | None = None
    limits: Mapping[str, int] = field(default_factory=dict)  # per-field overrides of FIELD_LIMITS
    max_parameters: int = MAX_PARAMETERS

    @property
    def file(self) -> str:
        """The main file's name in a bundle."""
        return f"{self.name}.safetensors"

    @property
    def hint(self) -> str:
        """The command that makes this kind's weights, for error messages."""
        return f"thinslice {self.train_command} ..."

    def file_name(self, variant: int | None = None) -> str:
        """The main file (None) or the file of numbered variant ``variant``."""
        if variant is None:
            return self.file
        if self.variant is None:
            raise ThinsliceError(f"'{self.name}' weights have no numbered variants (asked for {variant})")
        return self.variant.format(int(variant))

    def variant_number(self, file_name: str) -> int | None:
        """The number of a variant file name of this kind (None: not one)."""
        if self.variant is None:
            return None
        before, _, after = self.variant.partition("{}")
        found = re.fullmatch(re.escape(before) + r"(\d+)" + re.escape(after), file_name)
        return int(found.group(1)) if found else None

    def owns(self, file_name: str) -> bool:
        """Whether ``file_name`` is this kind's main file or one of its variants."""
        return file_name == self.file or self.variant_number(file_name) is not None

    def variants_in(self, folder: str | Path) -> tuple[int, ...]:
        """Numbers of the variant files in ``folder`` (e.g. the factors that have a planes-x<k> of their own)."""
        if self.variant is None:
            return ()
        numbers = (self.variant_number(p.name) for p in Path(folder).glob(self.variant.replace("{}", "*")))
        return tuple(sorted(n for n in numbers if n is not None))

    def config_of(self, preset: Preset, record: Mapping[str, Any] | None = None) -> Any:
        """What ``build`` takes, from a preset (and, for a plug-in kind, the file's record of its section)."""
        if len(self.sections) > 1:
            return preset
        section = self.sections[0]
        if self.config_type is None:
            return getattr(preset, section)
        if record is None or section not in record:
            raise ThinsliceError(f"the '{self.name}' network's config is not a preset section; pass its "
                                 f"{self.config_type.__name__} instead of a preset")
        return self.config_type(**{k: _tuples(v) for k, v in record[section].items()})

    def check_record(self, record: Mapping[str, Any], source: str) -> None:
        """Refuse, in one line, a file record whose architecture fields lie outside this kind's limits (see
        :data:`FIELD_LIMITS`), before anything is built from it."""
        for section in self.sections:
            values = record.get(section, {})
            if not isinstance(values, Mapping):
                raise ThinsliceError(f"{source}: its record's '{section}' is not a section; the file is damaged")
            for key, value in values.items():
                limit = self.limits.get(key, FIELD_LIMITS.get(key, FIELD_LIMIT))
                bad = next((v for v in _numbers(value) if not _within(v, limit)), None)
                if bad is not None:
                    raise ThinsliceError(
                        f"{source} asks for {section}.{key} = {bad}, outside 0..{limit} for a '{self.name}' network; "
                        "the file is damaged or was not saved by thinslice"
                    )

    def check_size(self, config: Any, source: str) -> None:
        """Refuse a network of more than ``max_parameters`` parameters, counted on the meta device (no memory)."""
        try:
            with torch.device("meta"):
                count = sum(p.numel() for p in self.build(config).parameters())
        except (ValueError, TypeError, RuntimeError) as exc:
            raise ThinsliceError(f"{source}: its record does not describe a buildable '{self.name}' network "
                                 f"({str(exc).strip()[:100]}); the file is damaged") from exc
        if count > self.max_parameters:
            raise ThinsliceError(f"{source} describes a '{self.name}' network of {count:,} parameters, above the "
                                 f"limit of {self.max_parameters:,}; the file is damaged or was not saved by thinslice")

    def record(self, model: nn.Module | Mapping[str, Any], preset: Preset) -> tuple[dict[str, Any], Saving]:
        """What a file of this kind records (the JSON ``preset_config``) and how the network is saved."""
        if self.describe is not None and isinstance(model, nn.Module):
            saving = self.describe(model, preset)
        else:
            saving = Saving(self._with_own_config(model, preset))
        full = saving.preset.to_dict()
        out: dict[str, Any] = {"name": saving.preset.name}
        for section in self.sections:
            out[section] = full[section] if section in full else dataclasses.asdict(_own_config(model, self.name))
        for need in self.needs:
            section, _, key = need.partition(".")
            if key:
                out.setdefault(section, {})[key] = full[section][key]
            else:
                out[section] = full[section]
        return out, saving

    def _with_own_config(self, model: nn.Module | Mapping[str, Any], preset: Preset) -> Preset:
        """``preset`` with the network's own config (e.g. a VAE's fitted latent scaling factor) in its section."""
        own: Any = getattr(model, "config", None) or getattr(model, "cfg", None)
        section = self.sections[0]
        if len(self.sections) == 1 and section in PRESET_SECTIONS and dataclasses.is_dataclass(own):
            changes: dict[str, Any] = {section: own}
            return dataclasses.replace(preset, **changes)
        return preset


def _own_config(model: Any, kind: str) -> Any:
    own = getattr(model, "config", None)
    if not dataclasses.is_dataclass(own):
        raise ThinsliceError(f"a '{kind}' network must carry its config dataclass as .config to be saved")
    return own


def _numbers(value: Any) -> list[int | float]:
    """The numbers in a record field (lists flattened; booleans, strings and None are not numbers here)."""
    if isinstance(value, (list, tuple)):
        return [n for v in value for n in _numbers(v)]
    return [value] if isinstance(value, (int, float)) and not isinstance(value, bool) else []


def _within(value: int | float, limit: int) -> bool:
    if isinstance(value, float):
        return math.isfinite(value)  # scales and factors: any finite value builds a network of the same size
    return 0 <= value <= limit


def _tuples(value: Any) -> Any:
    """JSON lists back to the tuples config dataclasses use."""
    return tuple(_tuples(v) for v in value) if isinstance(value, list) else value


def _describe_denoiser(denoiser: nn.Module, preset: Preset) -> Saving:
    """The denoiser records its own unet/control/diffusion configs (so the file rebuilds exactly this network), goes
    to ``denoiser-<T>step`` when its ResShift steps differ from the preset's, and notes steps and sampler."""
    assert isinstance(denoiser, LatentDenoiser)
    control = denoiser.control.cfg if denoiser.control is not None else dataclasses.replace(
        preset.control, enabled=False)
    recorded = dataclasses.replace(preset, unet=denoiser.unet.cfg, control=control, diffusion=denoiser.cfg)
    steps = None if denoiser.cfg.num_steps == preset.diffusion.num_steps else denoiser.cfg.num_steps
    return Saving(recorded, steps, {"steps": str(denoiser.cfg.num_steps), "sampler": denoiser.cfg.method})


_KINDS: dict[str, NetworkKind] = {}


def register_kind(kind: NetworkKind) -> NetworkKind:
    """Add a row to the table (a plug-in network is one call); the same row again is a no-op, another row under a
    taken name is refused."""
    have = _KINDS.get(kind.name)
    if have is not None and have != kind:
        raise ThinsliceError(f"network kind '{kind.name}' is registered already; choose another name")
    _KINDS[kind.name] = kind
    return kind


def network_kind(name: str) -> NetworkKind:
    """The row of ``name``, or a one-line error naming the kinds there are."""
    if name not in _KINDS:
        raise ThinsliceError(f"unknown network kind '{name}': use one of {', '.join(_KINDS)}")
    return _KINDS[name]


def network_kinds() -> tuple[NetworkKind, ...]:
    """Every row, built-in kinds first."""
    return tuple(_KINDS.values())


# What inference reads from a loaded network's preset (see module docstring): the denoiser its latent space, the
# factors it was trained on (a warning outside them), its training patch (sampling windows) and the VAE's latent
# channels (its input width); the CNN its training patch and batch (windows, adaptation); planes its plane sampling
# (adaptation).
for _row in (
    NetworkKind("vae", ("vae",), AutoencoderKL3D, "train-vae"),
    NetworkKind("denoiser", ("unet", "control"), denoiser_from_preset, "train",
                needs=("diffusion", "latent", "vae.latent_channels", "degradation.factors",
                       "train_diffusion.patch_size"),
                variant="denoiser-{}step.safetensors", describe=_describe_denoiser),
    NetworkKind("baseline", ("baseline",), ResidualCNN3D, "train-baseline",
                needs=("train_baseline.patch_size", "train_baseline.batch_size")),
    NetworkKind("planes", ("planes",), PlanesNet, "train-planes", needs=("planes_data",),
                variant="planes-x{}.safetensors"),
):
    register_kind(_row)
