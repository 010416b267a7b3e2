"""Latent cache: VAE latents of thin (HR) volumes and of their simulated thick counterparts, computed once.

Encoding a CT volume costs far more than a diffusion training step on its latent, so ``thinslice encode`` stores,
per source volume, one safetensors file with the HR latent and one per degradation (factor, profile) with the latent
of the thick volume cubic-upsampled back to the thin grid (``lr``) next to the latent of the thin target on exactly
that grid (``hr``; :func:`thinslice.degrade.pairs.simulate_pair` crops the thin volume to the upsampling grid).

Every file and the ``index.json`` record the VAE preset and weights hash, the degradation and the source's size,
mtime and sha256, so :meth:`LatentCache.load` refuses a stale cache (other VAE, changed source) with a clear message,
and :func:`build_latent_cache` re-encodes only what is stale.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from thinslice.errors import ThinsliceError
from thinslice.io.atomic import atomic_output, write_text_atomic
from thinslice.io.formats import is_volume_file_name, strip_volume_suffix
from thinslice.io.volume import Volume
from thinslice.models.tiling import DEFAULT_TILE, encode_volume
from thinslice.models.vae import AutoencoderKL3D

INDEX_NAME = "index.json"
CACHE_FORMAT = "1"

# (thin volume, factor, profile) -> (thick volume upsampled to the target grid, thin target on that grid)
PairFn = Callable[[Volume, float, str], tuple[Volume, Volume]]


def default_pair(thin: Volume, factor: float, profile: str) -> tuple[Volume, Volume]:
    """Simulated thick volume, cubic-upsampled back to the thin spacing, and the thin target on the same grid."""
    from thinslice.degrade.pairs import simulate_pair
    from thinslice.infer.upsample import upsample

    thick, target = simulate_pair(thin, factor=factor, profile=profile)
    lr = upsample(thick, thin.slice_spacing, "cubic")
    n = min(lr.num_slices, target.num_slices)
    if lr.num_slices != target.num_slices:
        lr = lr.with_slices(lr.slices_first()[:n], lr.slice_spacing, 0.0, lr.slice_thickness)
        target = target.with_slices(target.slices_first()[:n], target.slice_spacing, 0.0, target.slice_thickness)
    return lr, target


@dataclass
class SourceId:
    """What identifies a source volume's content."""

    path: str
    size: int
    mtime_ns: int
    sha256: str

    @classmethod
    def of_file(cls, path: Path) -> SourceId:
        st = path.stat()
        h = hashlib.sha256()
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
        return cls(str(path.resolve()), st.st_size, st.st_mtime_ns, h.hexdigest()[:16])

    @classmethod
    def of_volume(cls, name: str, vol: Volume) -> SourceId:
        digest = hashlib.sha256(np.ascontiguousarray(vol.array).tobytes()).hexdigest()[:16]
        return cls(name, int(vol.array.nbytes), 0, digest)

    def changed(self, path: Path) -> bool:
        """True when the file at ``path`` no longer has this content (mtime/size first, hash only if needed)."""
        if not path.is_file():
            return True
        st = path.stat()
        if st.st_size != self.size:
            return True
        if st.st_mtime_ns == self.mtime_ns:
            return False
        return SourceId.of_file(path).sha256 != self.sha256


@dataclass
class CacheEntry:
    name: str  # source stem
    file: str  # file name inside the cache folder
    kind: str  # "hr" or "pair"
    factor: float | None
    profile: str | None
    source: SourceId
    hr_shape: tuple[int, int, int]  # thin HU shape (slices first) the latent was made from


def _stem(path: Path) -> str:
    return strip_volume_suffix(path.name) if is_volume_file_name(path) else path.stem


def _pair_file(stem: str, factor: float, profile: str) -> str:
    return f"{stem}__x{factor:g}_{profile}.safetensors"


def _save_atomic(path: Path, tensors: dict[str, torch.Tensor], meta: dict[str, str]) -> None:
    with atomic_output(path) as tmp:
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp), metadata=meta)


class LatentCache:
    """A folder of cached latents for one VAE (see the module docstring)."""

    def __init__(self, folder: Path, index: dict) -> None:
        self.folder = Path(folder)
        self.index = index
        self.entries = [CacheEntry(**{**e, "source": SourceId(**e["source"]), "hr_shape": tuple(e["hr_shape"])})
                        for e in index["entries"]]

    @property
    def vae_hash(self) -> str:
        return self.index["vae_hash"]

    @property
    def scaling_factor(self) -> float:
        return float(self.index["scaling_factor"])

    @classmethod
    def load(cls, folder: str | Path, vae_hash: str, check_sources: bool = True) -> LatentCache:
        """Open a cache made with the VAE whose weights hash is ``vae_hash``; refuse a stale one."""
        folder = Path(folder)
        index_path = folder / INDEX_NAME
        if not index_path.is_file():
            raise ThinsliceError(f"no latent cache in {folder} ({INDEX_NAME} missing); create it with thinslice encode")
        index = json.loads(index_path.read_text())
        if index.get("vae_hash") != vae_hash:
            raise ThinsliceError(
                f"latent cache {folder} was made with VAE weights {index.get('vae_hash')} (preset "
                f"'{index.get('preset')}'), but VAE {vae_hash} is in use; rebuild it with thinslice encode --vae "
                "<these weights> --out <cache> (stale entries are re-encoded)"
            )
        cache = cls(folder, index)
        if check_sources:
            stale = cache.stale_entries()
            if stale:
                raise ThinsliceError(
                    f"latent cache {folder} is stale: {len(stale)} entries come from source files that changed or "
                    f"disappeared (e.g. {stale[0].source.path}); rebuild it with thinslice encode"
                )
        return cache

    def stale_entries(self) -> list[CacheEntry]:
        out = []
        for e in self.entries:
            missing = not (self.folder / e.file).is_file()
            changed = bool(e.source.mtime_ns) and e.source.changed(Path(e.source.path))
            if missing or changed:
                out.append(e)
        return out

    def pairs(self, factor: float | None = None, profile: str | None = None) -> list[CacheEntry]:
        return [e for e in self.entries if e.kind == "pair" and (factor is None or e.factor == factor)
                and (profile is None or e.profile == profile)]

    def hr(self) -> list[CacheEntry]:
        return [e for e in self.entries if e.kind == "hr"]

    def read(self, entry: CacheEntry) -> dict[str, torch.Tensor]:
        """Tensors of one entry: ``{'hr': (C, d, h, w)}`` or ``{'hr': ..., 'lr': ...}`` (scaled latents)."""
        with safe_open(str(self.folder / entry.file), framework="pt") as f:
            return {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open has no __iter__)


@dataclass(frozen=True)
class CacheSpec:
    """What a latent cache holds: an HR entry per source plus one pair entry per factor x profile, encoded in
    ``tile``-sized pieces; ``pair_fn`` makes the pairs, ``read_fn`` reads files, ``progress`` reports lines."""

    factors: Sequence[float] = ()
    profiles: Sequence[str] = ("gaussian",)
    preset_name: str = ""
    tile: tuple[int, int, int] = DEFAULT_TILE
    pair_fn: PairFn | None = None
    read_fn: Callable[[Path], Volume] | None = None
    progress: Callable[[str], None] | None = print


def build_latent_cache(sources: Sequence[str | Path | tuple[str, Volume]], vae: AutoencoderKL3D, vae_hash: str,
                       out_dir: str | Path, spec: CacheSpec | None = None, **fields: Any) -> LatentCache:
    """Encode ``sources`` (files or (name, Volume)) into ``out_dir``; reuse entries that are still valid.
    ``spec`` (or its fields as keywords) says what to encode."""
    spec = dataclasses.replace(spec or CacheSpec(), **fields)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    old = _reusable_entries(out, vae_hash, spec)
    entries: list[CacheEntry] = []
    for src in sources:
        path: Path | None = None
        if isinstance(src, tuple):
            stem, vol = src
            sid = SourceId.of_volume(stem, vol)
        else:
            path = Path(src)
            sid, stem, vol = SourceId.of_file(path), _stem(path), None
        wanted: list[tuple[str, str, float | None, str | None]] = [(f"{stem}__hr.safetensors", "hr", None, None)]
        wanted += [(_pair_file(stem, float(f), p), "pair", float(f), p) for f in spec.factors for p in spec.profiles]
        for file, kind, factor, profile in wanted:
            prev_entry = old.get(file)
            if prev_entry is not None and prev_entry.source.sha256 == sid.sha256 and (out / file).is_file():
                entries.append(prev_entry)
                continue
            if vol is None:
                assert path is not None  # only a file source starts without its volume
                vol = _read(spec, path)
            shape = _encode_entry(vae, vae_hash, vol, sid, out / file, (kind, factor, profile), spec)
            entries.append(CacheEntry(stem, file, kind, factor, profile, sid, shape))
    index = {"format": CACHE_FORMAT, "preset": spec.preset_name, "vae_hash": vae_hash,
             "scaling_factor": vae.scaling_factor, "tile": list(spec.tile),
             "entries": [{**asdict(e), "hr_shape": list(e.hr_shape)} for e in entries]}
    write_text_atomic(out / INDEX_NAME, json.dumps(index, indent=1))
    return LatentCache(out, index)


def _read(spec: CacheSpec, path: Path) -> Volume:
    if spec.read_fn is not None:
        return spec.read_fn(path)
    from thinslice.io import read_volume

    return read_volume(path)


def _reusable_entries(out: Path, vae_hash: str, spec: CacheSpec) -> dict[str, CacheEntry]:
    """Entries of an existing cache made with the same VAE (file name -> entry); none for another VAE."""
    index_path = out / INDEX_NAME
    if not index_path.is_file():
        return {}
    prev = json.loads(index_path.read_text())
    if prev.get("vae_hash") == vae_hash:
        return {e.file: e for e in LatentCache(out, prev).entries}
    if spec.progress:
        spec.progress(f"encode: cache {out} was made with another VAE ({prev.get('vae_hash')}); re-encoding all")
    return {}


def _encode_entry(vae: AutoencoderKL3D, vae_hash: str, vol: Volume, sid: SourceId, path: Path,
                  what: tuple[str, float | None, str | None], spec: CacheSpec) -> tuple[int, int, int]:
    """Encode one entry (``what`` = kind, factor, profile) into ``path``; returns the thin volume's shape."""
    kind, factor, profile = what
    thin_hu = vol.slices_first()
    meta = {"format": CACHE_FORMAT, "preset": spec.preset_name, "vae_hash": vae_hash,
            "scaling_factor": repr(vae.scaling_factor), "source": json.dumps(asdict(sid)), "kind": kind,
            "hr_shape": json.dumps(list(thin_hu.shape))}
    if kind == "hr":
        tensors = {"hr": encode_volume(vae, thin_hu, tile=spec.tile)}
    else:
        assert factor is not None and profile is not None  # a pair entry names both
        lr, target = (spec.pair_fn or default_pair)(vol, factor, profile)
        meta.update({"factor": repr(factor), "profile": str(profile),
                     "pair_shape": json.dumps(list(target.slices_first().shape))})
        tensors = {"hr": encode_volume(vae, target.slices_first(), tile=spec.tile),
                   "lr": encode_volume(vae, lr.slices_first(), tile=spec.tile)}
    _save_atomic(path, tensors, meta)
    if spec.progress:
        spec.progress(f"encode: {path.name}")
    d, h, w = thin_hu.shape
    return int(d), int(h), int(w)
