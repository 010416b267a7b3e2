"""Model bundles: one folder holding every network an upsampling method needs (the checkpoint layer below
train/ and infer/: the one locator, the one load and the one save function, the manifest).

File names come from the network kinds table (:mod:`thinslice.models.kinds`), so that a folder is all the user
passes (``--checkpoint DIR``)::

    vae.safetensors                 AutoencoderKL3D
    denoiser.safetensors            LatentDenoiser (UNet + optional IRControlNet + null condition), one state dict
    denoiser-<T>step.safetensors    optional fast schedule (e.g. denoiser-4step), picked with --steps T
    baseline.safetensors            ResidualCNN3D
    planes.safetensors              PlanesNet (--method planes), every factor it was trained for
    planes-x<k>.safetensors         optional PlanesNet trained for factor k alone, used for that factor

Every file carries its network's record (see :mod:`thinslice.checkpoints.files`), so the networks are rebuilt from
the file alone. The denoiser also records the content hash of the VAE whose latents it was trained on; pairing it
with another VAE is refused. Shipped weights live in the package folder ``thinslice/weights`` with the same layout.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import cast

import torch
from torch import nn

from thinslice.checkpoints.files import (
    WeightsRecord,
    check_architecture,
    load_state_strict,
    read_metadata,
    read_weights,
    remember,
    write_weights,
)
from thinslice.device import resolve_device
from thinslice.errors import ThinsliceError
from thinslice.models.baseline import ResidualCNN3D
from thinslice.models.denoiser import LatentDenoiser
from thinslice.models.kinds import PRESET_SECTIONS, NetworkKind, network_kind, network_kinds
from thinslice.models.planes import PlanesNet
from thinslice.models.vae import AutoencoderKL3D
from thinslice.presets import PRESET_NAMES, Preset, load_preset, preset_from_dict

log = logging.getLogger(__name__)
DEFAULT_BUNDLE_DIR = Path(__file__).resolve().parents[1] / "weights"  # thinslice/weights in the package
Source = str | Path | None


# --------------------------------------------------------------------------------------------------- locating
def locate_weights(source: Source, kinds: str | Sequence[str], label: str | None = None) -> Path:
    """The one locator: the folder holding the weights of ``kinds`` (e.g. ('denoiser',)).

    ``source`` is a weights file of a known kind (its folder), a folder (it, its ``final/`` or its ``best/``: a
    training run), a preset name (the shipped folder, when its files were trained with that preset; any text that
    does not look like a path is a name, see :func:`is_bare_name`) or None (the shipped folder). Every failure is
    one ThinsliceError line that names ``label`` (the method; default the kinds)
    and says how to get the weights (the kind's training command).
    """
    rows = [network_kind(k) for k in ((kinds,) if isinstance(kinds, str) else kinds)]
    label = label or "/".join(r.name for r in rows)
    if source is None:
        return _holding((DEFAULT_BUNDLE_DIR,), rows, label)
    if is_bare_name(source):
        return _shipped_for_preset(_shipped_name(str(source)), rows)
    path = Path(source).expanduser()
    needed = ", ".join(r.file for r in rows)
    if path.is_file():
        if not any(row.owns(path.name) for row in network_kinds()):
            raise ThinsliceError(f"--checkpoint {path} is a file; pass the folder holding {needed}")
        path = path.parent
    if not path.is_dir():
        raise ThinsliceError(f"weights not found: {path} does not exist; pass a folder holding {needed}, a "
                             f".safetensors file or a preset name ({', '.join(PRESET_NAMES)})")
    return _holding((path, path / "final", path / "best"), rows, label)


def is_bare_name(source: Source) -> bool:
    """Whether ``source`` names shipped weights by its form alone (text with no path separator, not starting with
    ``.`` or ``~``, not a ``.safetensors`` file name), whatever the current folder holds: ``--checkpoint small`` must
    not mean a folder ``./small`` that happens to be there (``./small`` does). A :class:`~pathlib.Path` is a path."""
    if not isinstance(source, str):
        return False
    return not ("/" in source or "\\" in source or source.startswith((".", "~")) or source.endswith(".safetensors"))


def _shipped_name(name: str) -> str:
    """``name`` when it is a shipped (preset) name, else one line saying so, suggesting ``./name`` when there is
    such a folder or file here; a folder here under a shipped name is mentioned, not used."""
    here = Path(name).exists()
    if name not in PRESET_NAMES:
        if here:
            raise ThinsliceError(f"--checkpoint {name} is not a shipped name ({', '.join(PRESET_NAMES)}); for the "
                                 f"'{name}' here pass a path: --checkpoint ./{name}")
        raise ThinsliceError(f"--checkpoint {name} is neither a shipped name ({', '.join(PRESET_NAMES)}) nor a path; "
                             f"pass a folder or .safetensors file as a path (e.g. ./{name} or /data/runs/{name})")
    if here:
        log.warning("--checkpoint %s means the shipped '%s' weights; for the '%s' here pass --checkpoint ./%s",
                    name, name, name, name)
    return name


def _holding(folders: tuple[Path, ...], rows: list[NetworkKind], label: str) -> Path:
    """The first of ``folders`` holding every row's file, else the one-line error for the first folder."""
    for folder in folders:
        if all((folder / r.file).is_file() for r in rows):
            return folder
    missing = [r for r in rows if not (folders[0] / r.file).is_file()]
    raise ThinsliceError(
        f"no trained weights for '{label}' found in {folders[0]} (missing {', '.join(r.file for r in missing)}); "
        f"train them with `{missing[0].hint}` or pass --checkpoint DIR holding {', '.join(r.file for r in rows)}"
    )


def _shipped_for_preset(name: str, rows: list[NetworkKind]) -> Path:
    """The shipped folder when each of ``rows``' files there was trained with preset ``name``."""
    for row in rows:
        shipped = DEFAULT_BUNDLE_DIR / row.file
        if not (shipped.is_file() and read_metadata(shipped).get("preset") == name):
            raise ThinsliceError(
                f"no shipped {row.name} weights for preset '{name}'; train them (e.g. thinslice {row.train_command} "
                f"--preset {name}) and pass the .safetensors file instead"
            )
    return DEFAULT_BUNDLE_DIR


def weights_path(source: Source, kind: str, variant: int | None = None) -> Path:
    """The file of ``kind`` (its numbered ``variant``, e.g. planes-x4): ``source`` itself when it is a file, else
    that file in the folder :func:`locate_weights` finds."""
    if source is not None and not is_bare_name(source) and Path(source).expanduser().is_file():
        return Path(source).expanduser()
    return locate_weights(source, kind) / network_kind(kind).file_name(variant)


def has_weights(kinds: str | Sequence[str], bundle: Source = None) -> bool:
    """Whether :func:`locate_weights` finds weights of every one of ``kinds`` in ``bundle`` (None: the shipped
    folder), by the same rules (a run folder's ``final/`` counts)."""
    try:
        locate_weights(bundle, kinds)
    except ThinsliceError:
        return False
    return True


# Written next to the shipped weights by whoever trains and benchmarks them: {"default_method": ..., "why": ...}.
MANIFEST_FILE = "manifest.json"


def read_manifest(bundle: str | Path | None = None) -> dict:
    """The bundle's manifest (benchmark summary and recommended default), or {} when there is none."""
    path = (DEFAULT_BUNDLE_DIR if bundle is None else Path(bundle)) / MANIFEST_FILE
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise ThinsliceError(f"cannot read {path}: {err}; fix or delete it") from err
    return data if isinstance(data, dict) else {}


# ---------------------------------------------------------------------------------------------------- loading
def load_model(kind: str, source: Source, preset: str | Path | Preset | None = None,
               device: str | torch.device = "cpu", variant: int | None = None) -> nn.Module:
    """The one load function: the network of ``kind`` from its self-describing weights file (found by
    :func:`weights_path`), in eval mode on ``device``.

    The network is rebuilt from the file's own record. If ``preset`` is given (what the user asked for), the file
    must have its architecture, else a one-line ThinsliceError names the preset to pass.
    """
    path = weights_path(source, kind, variant)
    meta = read_metadata(path)
    file_kind = meta.get("thinslice_kind")
    if file_kind is None or "preset_config" not in meta:
        raise ThinsliceError(f"{path} has no thinslice metadata (kind/preset); it was not saved by thinslice")
    if file_kind != kind:
        raise ThinsliceError(f"{path} holds '{file_kind}' weights, but '{kind}' weights were expected")
    row = network_kind(kind)
    record, file_preset = _read_record(row, path, meta)
    if preset is not None:
        check_architecture(row.sections, path, file_preset, load_preset(preset))
    config = row.config_of(file_preset, record)
    row.check_size(config, str(path))
    model = row.build(config)
    load_state_strict(model, read_weights(path, meta), str(path))
    model = model.to(device).eval()
    return remember(model, WeightsRecord(kind, path, file_preset, meta.get("content_hash", ""), meta))


def _read_record(row: NetworkKind, path: Path, meta: dict[str, str]) -> tuple[dict, Preset]:
    """A file's record and the preset it describes, checked against its kind's limits before anything is built."""
    try:
        record = json.loads(meta["preset_config"])
        if not isinstance(record, dict):
            raise ValueError("not a JSON object")
        row.check_record(record, str(path))
        preset = preset_from_dict({k: v for k, v in record.items() if k == "name" or k in PRESET_SECTIONS})
    except (ValueError, TypeError, AttributeError) as exc:  # bad JSON or a field of the wrong type
        raise ThinsliceError(f"{path} has a damaged record of its network ({str(exc).strip()[:100]}); copy it "
                             "again or retrain it") from exc
    return record, preset


def load_vae(bundle: str | Path, device: str | torch.device | None = "cpu",
             preset: str | Path | Preset | None = None) -> AutoencoderKL3D:
    """The bundle's VAE (scaling factor from the file's record), in eval mode on ``device``."""
    return cast(AutoencoderKL3D, load_model("vae", bundle, preset, resolve_device(device)))


def load_baseline(bundle: str | Path, device: str | torch.device | None = "cpu",
                  preset: str | Path | Preset | None = None) -> ResidualCNN3D:
    return cast(ResidualCNN3D, load_model("baseline", bundle, preset, resolve_device(device)))


def load_planes(bundle: str | Path, device: str | torch.device | None = "cpu",
                preset: str | Path | Preset | None = None, factor: int | None = None) -> PlanesNet:
    """The all-factor planes network, or with ``factor`` the one trained for that factor alone (its own
    architecture record: ``preset`` is not checked against it)."""
    if factor is not None:
        return cast(PlanesNet, load_model("planes", bundle, None, resolve_device(device), variant=factor))
    return cast(PlanesNet, load_model("planes", bundle, preset, resolve_device(device)))


def load_denoiser(bundle: str | Path, device: str | torch.device | None = "cpu", steps: int | None = None,
                  preset: str | Path | Preset | None = None) -> LatentDenoiser:
    """The denoiser that samples with ``steps`` (None: the default ``denoiser.safetensors``).

    A ResShift model samples with exactly the steps it was trained with; ``steps`` different from the default
    model's picks ``denoiser-<steps>step.safetensors`` (e.g. the 4-step model). DDIM models take any ``steps``.
    """
    row, folder, variant = network_kind("denoiser"), Path(bundle), None
    if steps is not None:
        steps = int(steps)
        if steps < 1:
            raise ThinsliceError(f"--steps must be a positive number, got {steps}")
        diffusion = _file_record(folder / row.file).get("diffusion", {})
        same = diffusion.get("method", "resshift") == "ddim" or int(diffusion.get("num_steps", -1)) == steps
        if not same:
            if not (folder / row.file_name(steps)).is_file():
                available = [str(diffusion.get("num_steps", "?")), *map(str, row.variants_in(folder))]
                raise ThinsliceError(
                    f"no denoiser for {steps} steps in {folder}: this bundle samples with {', '.join(available)} "
                    "steps; pass one of these to --steps (or leave it out)"
                )
            variant = steps
    return cast(LatentDenoiser, load_model("denoiser", folder, preset, resolve_device(device), variant))


def _file_record(path: Path) -> dict:
    meta = read_metadata(path)
    if "preset_config" not in meta:
        raise ThinsliceError(f"{path} has no thinslice metadata (kind/preset); it was not saved by thinslice")
    return json.loads(meta["preset_config"])


# ---------------------------------------------------------------------------------------------------- saving
def save_model(model: nn.Module | dict[str, torch.Tensor], kind: str, preset: str | Path | Preset,
               target: str | Path, extra_metadata: dict[str, str] | None = None) -> str:
    """The one save function: ``model``'s weights with its kind's record (its own config sections and what
    inference reads, see :mod:`thinslice.models.kinds`); returns the content hash.

    ``target`` is a ``.safetensors`` file or a bundle folder (then the kind's file name, or the variant the network
    describes itself as, e.g. ``denoiser-<T>step`` for a denoiser whose steps differ from the preset's).
    ``extra_metadata`` (strings) is stored too, e.g. ``{"vae_hash": record_of(vae).content_hash}``.
    """
    row = network_kind(kind)
    record, saving = row.record(model, load_preset(preset))
    path = Path(target)
    if path.is_dir() or path.suffix != ".safetensors":
        path = path / row.file_name(saving.variant)
    meta = {**saving.metadata, **(extra_metadata or {})}
    return write_weights(path, model, kind, saving.preset.name, record, meta)
