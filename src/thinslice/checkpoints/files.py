"""Model weights as safetensors files that describe themselves (the checkpoint layer's file format).

Metadata (all strings, as safetensors requires) holds: ``thinslice_kind`` ('vae', 'unet', 'control', 'baseline'),
``preset`` (name), ``preset_config`` (the whole preset as JSON, so the network can be rebuilt exactly, including a
VAE's latent ``scaling_factor``), ``content_hash`` (sha256 of the tensors, used to tie latent caches and diffusion
models to one VAE) and ``format`` (version). A file whose architecture differs from the one requested is refused with
a message that names the right preset.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from thinslice.errors import ThinsliceError
from thinslice.io.atomic import atomic_output
from thinslice.models.factory import MODEL_KINDS, build_model
from thinslice.presets import CONFIG_DIR, PRESET_NAMES, Preset, load_preset, preset_from_dict

FORMAT_VERSION = "1"
BUNDLED_DIR = CONFIG_DIR.parent / "weights"  # shipped weights (see bundle.py)
# Config fields that may differ between a file and a request without changing the architecture.
_NON_ARCH = {"scaling_factor", "gradient_checkpointing", "init_from_unet", "scale"}


@dataclass(frozen=True)
class WeightsRecord:
    """Where a loaded network's weights came from: kept beside the module (see :func:`record_of`) rather than as
    attributes patched onto it, so the module stays a plain ``nn.Module`` and callers get typed fields."""

    kind: str
    path: Path
    preset: Preset
    content_hash: str
    metadata: dict[str, str]


_RECORDS: weakref.WeakKeyDictionary[nn.Module, WeightsRecord] = weakref.WeakKeyDictionary()


def record_of(model: nn.Module) -> WeightsRecord | None:
    """The record of the file ``model`` was loaded from (None: built or trained here, never loaded)."""
    return _RECORDS.get(model)


def loaded_preset(model: nn.Module) -> Preset | None:
    """The preset ``model``'s weights file was trained with (None: not loaded from a file)."""
    record = record_of(model)
    return None if record is None else record.preset


def weights_label(model: nn.Module) -> str:
    """Short provenance for reports: the content hash of the loaded weights, or '?'."""
    record = record_of(model)
    return record.content_hash if record is not None and record.content_hash else "?"


def keep_record(source: nn.Module, target: nn.Module) -> nn.Module:
    """Give ``target`` (e.g. an adapted copy of ``source``) the record of ``source``; returns ``target``."""
    record = record_of(source)
    if record is not None:
        _RECORDS[target] = record
    return target


def tensors_hash(tensors: dict[str, torch.Tensor]) -> str:
    """sha256 over names, dtypes, shapes and bytes of all tensors (order-independent); first 16 hex digits."""
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().to("cpu").contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()[:16]


def _state_tensors(model: nn.Module | dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    sd = model.state_dict() if isinstance(model, nn.Module) else model
    # safetensors refuses shared/non-contiguous storage: store independent contiguous copies.
    return {k: v.detach().to("cpu").contiguous().clone() for k, v in sd.items()}


def _write_atomic(path: Path, tensors: dict[str, torch.Tensor], meta: dict[str, str]) -> None:
    with atomic_output(path) as tmp:
        save_file(tensors, str(tmp), metadata=meta)


def save_weights(
    path: str | Path,
    model: nn.Module | dict[str, torch.Tensor],
    kind: str,
    preset: str | Path | Preset,
    extra_metadata: dict[str, str] | None = None,
) -> str:
    """Write ``model``'s weights + preset record atomically; returns the content hash.

    For a VAE, the model's current ``config`` (with its latent scaling factor) replaces the preset's 'vae' section.
    """
    if kind not in MODEL_KINDS:
        raise ThinsliceError(f"unknown model kind '{kind}'")
    preset_obj = load_preset(preset)
    record = preset_obj.to_dict()
    config = getattr(model, "config", None)
    sections = MODEL_KINDS[kind]
    if len(sections) == 1 and config is not None and dataclasses.is_dataclass(config):
        record[sections[0]] = dataclasses.asdict(config)
    tensors = _state_tensors(model)
    digest = tensors_hash(tensors)
    meta = {"thinslice_kind": kind, "preset": preset_obj.name, "preset_config": json.dumps(record),
            "content_hash": digest, "format": FORMAT_VERSION}
    meta.update(extra_metadata or {})
    _write_atomic(Path(path), tensors, meta)
    return digest


def convert_weights(src: str | Path, dst: str | Path, dtype: torch.dtype = torch.float16,
                    metadata: dict[str, str] | None = None) -> str:
    """Copy a weights file with its floating-point tensors cast to ``dtype`` (fp16 halves the size of shipped
    weights; loading casts back to the model's float32). Metadata is kept, ``metadata`` entries replace or add keys,
    and the content hash is recomputed. Returns the new hash."""
    src, dst = Path(src), Path(dst)
    if src.resolve() == dst.resolve():
        raise ThinsliceError(f"convert_weights would overwrite its input {src}; write to another file")
    meta = read_metadata(src)
    if "content_hash" not in meta:
        raise ThinsliceError(f"{src} has no thinslice metadata; save weights with thinslice (save_weights)")
    tensors = {k: (v.to(dtype) if v.is_floating_point() else v) for k, v in load_file(str(src)).items()}
    digest = tensors_hash(tensors)
    meta = {**meta, **(metadata or {}), "content_hash": digest}
    _write_atomic(dst, tensors, meta)
    return digest


def read_metadata(path: str | Path) -> dict[str, str]:
    """Metadata of a weights file (cheap: reads only the header)."""
    path = Path(path)
    if not path.is_file():
        raise ThinsliceError(f"weights file not found: {path}")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
    except Exception as exc:  # safetensors raises its own error types
        raise ThinsliceError(f"{path} is not a safetensors weights file ({exc})") from exc
    return dict(meta)


def weights_hash(path: str | Path) -> str:
    meta = read_metadata(path)
    if "content_hash" not in meta:
        raise ThinsliceError(f"{path} has no thinslice metadata; save weights with thinslice (save_weights)")
    return meta["content_hash"]


def _arch(section: dict[str, Any]) -> dict[str, Any]:
    return {k: _jsonable(v) for k, v in section.items() if k not in _NON_ARCH}


def _jsonable(value: Any) -> Any:
    return json.loads(json.dumps(value))


def _describe(section: dict[str, Any]) -> str:
    keys = [k for k in ("channels", "base_channels", "num_res_blocks", "strides", "num_blocks") if k in section]
    return ", ".join(f"{k} {_jsonable(section[k])}" for k in keys)


def resolve_weights_path(path_or_preset: str | Path, kind: str) -> Path:
    """A weights file from a path, or a preset name -> the shipped ``weights/<kind>.safetensors`` when it was
    trained with that preset (the one layout of the shipped folder, see :mod:`thinslice.checkpoints.bundle`)."""
    text = str(path_or_preset)
    if text in PRESET_NAMES:
        bundled = BUNDLED_DIR / f"{kind}.safetensors"
        if not (bundled.is_file() and read_metadata(bundled).get("preset") == text):
            command = {"denoiser": "train", "baseline": "train-baseline", "planes": "train-planes"}.get(
                kind, "train-vae")
            raise ThinsliceError(
                f"no shipped {kind} weights for preset '{text}'; train them (e.g. thinslice {command} --preset "
                f"{text}) and pass the .safetensors file instead"
            )
        return bundled
    path = Path(path_or_preset)
    if path.is_dir():
        candidates = [path / "final" / f"{kind}.safetensors", path / "best" / f"{kind}.safetensors",
                      path / f"{kind}.safetensors"]
        for cand in candidates:
            if cand.is_file():
                return cand
        raise ThinsliceError(f"no {kind}.safetensors in {path} (looked in final/, best/ and the folder itself)")
    if not path.is_file():
        raise ThinsliceError(f"weights file not found: {path}; pass a .safetensors file or one of {PRESET_NAMES}")
    return path


def load_model(
    kind: str,
    path_or_preset: str | Path,
    preset: str | Path | Preset | None = None,
    device: str | torch.device = "cpu",
) -> nn.Module:
    """Network of ``kind`` with weights from a file (or a bundled preset), in eval mode.

    The architecture comes from the file's own preset record. If ``preset`` is given (what the user asked for), the
    file must match its architecture, else a ThinsliceError tells which preset to pass.
    """
    path = resolve_weights_path(path_or_preset, kind)
    meta = read_metadata(path)
    file_kind = meta.get("thinslice_kind")
    if file_kind is None or "preset_config" not in meta:
        raise ThinsliceError(f"{path} has no thinslice metadata (kind/preset); it was not saved by thinslice")
    if file_kind != kind:
        raise ThinsliceError(f"{path} holds '{file_kind}' weights, but '{kind}' weights were expected")
    record = json.loads(meta["preset_config"])
    file_preset = preset_from_dict(record)
    if preset is not None:
        wanted = load_preset(preset)
        for section in MODEL_KINDS[kind]:
            # Both sides as the current dataclass (a file saved before a field existed gets its default), so a
            # newer option that the file's network does not use is not a different architecture.
            have = dataclasses.asdict(getattr(file_preset, section))
            want = dataclasses.asdict(getattr(wanted, section))
            if _arch(have) != _arch(want):
                fields = ", ".join(k for k in _arch(want) if _arch(have).get(k) != _arch(want)[k])
                raise ThinsliceError(
                    f"checkpoint {path.name} is for preset '{file_preset.name}' ({section}: {_describe(have)}), but "
                    f"preset '{wanted.name}' ({_describe(want)}) was requested (they differ in {fields}); pass "
                    f"--preset {file_preset.name}"
                )
    model = build_model(kind, file_preset)
    state = load_file(str(path), device="cpu")
    load_state_strict(model, state, str(path))
    model = model.to(device).eval()
    _RECORDS[model] = WeightsRecord(kind, path, file_preset, meta.get("content_hash", ""), meta)
    return model


def load_state_strict(model: nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    """``load_state_dict(strict=True)`` with a one-line ThinsliceError instead of a long RuntimeError."""
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    wrong = sorted(k for k in set(own) & set(state) if tuple(own[k].shape) != tuple(state[k].shape))
    if missing or unexpected or wrong:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing (e.g. {missing[0]})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected (e.g. {unexpected[0]})")
        if wrong:
            k = wrong[0]
            parts.append(f"{len(wrong)} of other shape (e.g. {k}: {tuple(state[k].shape)} vs {tuple(own[k].shape)})")
        raise ThinsliceError(f"weights in {source} do not fit the network: {'; '.join(parts)}; "
                             "use the preset the weights were trained with")
    model.load_state_dict(state, strict=True)


def state_dict_numpy(model: nn.Module) -> dict[str, np.ndarray]:
    """Weights as numpy arrays (comparisons in tests and tools)."""
    return {k: v.detach().cpu().numpy() for k, v in model.state_dict().items()}
