"""Model weights as safetensors files that describe themselves (the checkpoint layer's file format; locating,
loading and saving by kind are in :mod:`thinslice.checkpoints.bundle`).

Metadata (all strings, as safetensors requires) holds: ``thinslice_kind`` (a row of
:mod:`thinslice.models.kinds`), ``preset`` (name), ``preset_config`` (the record the network is rebuilt from: its
kind's config sections plus what inference reads, JSON; format 1 files carry the whole preset), ``content_hash``
(sha256 of the tensors, used to tie latent caches and diffusion models to one VAE) and ``format`` (version). A file
whose architecture differs from the one requested is refused with a message that names the right preset.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from thinslice.errors import ThinsliceError
from thinslice.io.atomic import atomic_output
from thinslice.presets import Preset

log = logging.getLogger(__name__)

# 1: the whole preset recorded; 2: the kind's own sections and what inference reads (both load).
FORMAT_VERSION = "2"
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


def write_weights(path: str | Path, model: nn.Module | dict[str, torch.Tensor], kind: str, preset_name: str,
                  record: dict[str, Any], extra_metadata: dict[str, str] | None = None) -> str:
    """Write ``model``'s weights with their ``record`` (see :meth:`NetworkKind.record`) atomically; returns the
    content hash. Called by :func:`thinslice.checkpoints.bundle.save_model`, which composes the record."""
    tensors = _state_tensors(model)
    digest = tensors_hash(tensors)
    meta = {"thinslice_kind": kind, "preset": preset_name, "preset_config": json.dumps(record),
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
        raise ThinsliceError(f"{src} has no thinslice metadata; save weights with thinslice (save_model)")
    tensors = {k: (v.to(dtype) if v.is_floating_point() else v) for k, v in read_weights(src, meta).items()}
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


def read_weights(path: str | Path, meta: dict[str, str] | None = None) -> dict[str, torch.Tensor]:
    """The tensors of a weights file (on the CPU), checked against the content hash its metadata records: a file
    changed after saving (flipped bits, a bad copy, tampering) is refused in one line instead of running as a
    network that silently gives wrong volumes. A file without a hash (saved before files recorded one) loads with a
    debug note."""
    path = Path(path)
    meta = read_metadata(path) if meta is None else meta
    try:
        tensors = load_file(str(path), device="cpu")
    except Exception as exc:  # safetensors raises its own error types for a damaged header or short data
        raise ThinsliceError(f"{path} is damaged ({str(exc).strip()[:100] or type(exc).__name__}); copy it again "
                             "or retrain it") from exc
    recorded = meta.get("content_hash")
    if not recorded:
        log.debug("%s records no content hash (saved by an older thinslice); its tensors are not checked", path)
    elif tensors_hash(tensors) != recorded:
        raise ThinsliceError(f"{path} is damaged (content hash mismatch: its tensors changed after it was saved); "
                             "copy it again, reinstall thinslice for shipped weights, or retrain it")
    return tensors


def weights_hash(path: str | Path) -> str:
    meta = read_metadata(path)
    if "content_hash" not in meta:
        raise ThinsliceError(f"{path} has no thinslice metadata; save weights with thinslice (save_model)")
    return meta["content_hash"]


def _arch(section: dict[str, Any]) -> dict[str, Any]:
    return {k: _jsonable(v) for k, v in section.items() if k not in _NON_ARCH}


def _jsonable(value: Any) -> Any:
    return json.loads(json.dumps(value))


def _describe(section: dict[str, Any]) -> str:
    keys = [k for k in ("channels", "base_channels", "num_res_blocks", "strides", "num_blocks") if k in section]
    return ", ".join(f"{k} {_jsonable(section[k])}" for k in keys)


def check_architecture(sections: tuple[str, ...], path: Path, have: Preset, wanted: Preset) -> None:
    """Refuse, in one line that names the preset to pass, a file whose ``sections`` (its kind's architecture) differ
    from those of the requested preset. Both sides are the current dataclasses (a file saved before a field existed
    gets its default), so a newer option that the file's network does not use is not a different architecture."""
    for section in sections:
        if not hasattr(wanted, section):
            continue  # a plug-in kind's own section: nothing in a preset to check it against
        mine = _arch(dataclasses.asdict(getattr(have, section)))
        want = _arch(dataclasses.asdict(getattr(wanted, section)))
        if mine != want:
            fields = ", ".join(k for k in want if mine.get(k) != want[k])
            raise ThinsliceError(
                f"checkpoint {path.name} is for preset '{have.name}' ({section}: {_describe(mine)}), but "
                f"preset '{wanted.name}' ({_describe(want)}) was requested (they differ in {fields}); pass "
                f"--preset {have.name}"
            )


def remember(model: nn.Module, record: WeightsRecord) -> nn.Module:
    """Keep ``record`` beside the freshly loaded ``model`` (see :func:`record_of`); returns ``model``."""
    _RECORDS[model] = record
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

