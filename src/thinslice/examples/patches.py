"""Random 3D training patches from a set of CT volumes, shared by all trainers.

:class:`PatchSampler` keeps every volume in memory once, slices first, as int16 HU (a 512x512x300 CT takes 150 MB),
and draws patches with the one seeded ``numpy.random.Generator`` of :class:`~thinslice.examples.base.ExampleSampler`,
whose state is part of the training checkpoint, so a resumed run draws exactly the patches the uninterrupted run
would have drawn. Patches that are mostly air are rejected (training on the body, not on the room). A per-patch
``transform(patch_hu, info, rng)`` hook lets the pair samplers degrade patches on the fly with the same generator.

The sampler runs in the training process (no DataLoader workers): drawing a patch is a memory copy, cheap next to a
3D network step, and it keeps resume exact.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from thinslice.errors import ThinsliceError
from thinslice.examples.base import ExampleSampler
from thinslice.io.prepare import training_volume
from thinslice.io.volume import Volume
from thinslice.models.intensity import AIR_THRESHOLD_HU, hu_int16


@dataclass
class PatchInfo:
    """Where a patch came from: its volume, corner (slices first) and the volume's spacing."""

    volume_index: int
    name: str
    corner: tuple[int, int, int]
    slice_spacing_mm: float
    inplane_spacing_mm: tuple[float, float]


@dataclass
class _Source:
    name: str
    hu: np.ndarray  # int16, slices first
    slice_spacing_mm: float
    inplane_spacing_mm: tuple[float, float]


Transform = Callable[[np.ndarray, PatchInfo, np.random.Generator], dict[str, np.ndarray]]


def default_transform(patch_hu: np.ndarray, info: PatchInfo, rng: np.random.Generator) -> dict[str, np.ndarray]:
    return {"hu": patch_hu[None]}  # (1, D, H, W): channel axis for the network


def _source_from(item: Volume | str | Path, index: int) -> _Source:
    vol = training_volume(item)
    name = Path(item).name if not isinstance(item, Volume) else f"volume{index}"
    axis = vol.slice_axis
    row, col = (float(s) for i, s in enumerate(vol.spacing) if i != axis)
    return _Source(name, hu_int16(vol.slices_first()), float(vol.slice_spacing), (row, col))


class PatchSampler(ExampleSampler):
    """Endless iterator of patch batches: dicts of stacked ``transform`` outputs as float32 tensors + ``info`` list.

    Volumes smaller than the patch are padded with air. Each volume is drawn with probability proportional to its
    voxel count (every voxel equally likely), then a corner uniformly; a patch with more than ``max_air_fraction``
    air is redrawn (up to ``max_tries`` times, then the least-air candidate is kept).
    """

    def __init__(
        self,
        volumes: Sequence[Volume | str | Path],
        patch_size: tuple[int, int, int],
        batch_size: int,
        seed: int = 0,
        max_air_fraction: float = 0.8,
        max_tries: int = 20,
        transform: Transform | None = None,
    ) -> None:
        if not volumes:
            raise ThinsliceError("PatchSampler needs at least one volume")
        super().__init__(seed)
        self.patch_size = tuple(int(p) for p in patch_size)
        self.batch_size = int(batch_size)
        self.max_air_fraction = float(max_air_fraction)
        self.max_tries = int(max_tries)
        self.transform = transform or default_transform
        self.sources = [_source_from(v, i) for i, v in enumerate(volumes)]
        sizes = np.array([s.hu.size for s in self.sources], dtype=np.float64)
        self.weights = sizes / sizes.sum()

    # ------------------------------------------------------------------------------------------- drawing
    def _crop(self, src: _Source, corner: tuple[int, int, int]) -> np.ndarray:
        sl = tuple(slice(c, c + p) for c, p in zip(corner, self.patch_size, strict=True))
        patch = src.hu[sl].astype(np.float32)
        if patch.shape != self.patch_size:
            pad = [(0, p - n) for n, p in zip(patch.shape, self.patch_size, strict=True)]
            patch = np.pad(patch, pad, constant_values=-1024.0)
        return patch

    def draw_patch(self) -> tuple[np.ndarray, PatchInfo]:
        """One patch in HU (float32, slices first) and where it came from."""
        vi = int(self.rng.choice(len(self.sources), p=self.weights))
        src = self.sources[vi]
        best: tuple[float, np.ndarray, tuple[int, int, int]] | None = None
        for _ in range(self.max_tries):
            d, h, w = (int(self.rng.integers(0, max(1, n - p + 1)))
                       for n, p in zip(src.hu.shape, self.patch_size, strict=True))
            corner = (d, h, w)
            patch = self._crop(src, corner)
            air = float(np.mean(patch < AIR_THRESHOLD_HU))
            if best is None or air < best[0]:
                best = (air, patch, corner)
            if air <= self.max_air_fraction:
                break
        assert best is not None
        info = PatchInfo(vi, src.name, best[2], src.slice_spacing_mm, src.inplane_spacing_mm)
        return best[1], info

    def next_batch(self) -> dict[str, Any]:
        items, infos = [], []
        for _ in range(self.batch_size):
            patch, info = self.draw_patch()
            items.append(self.transform(patch, info, self.rng))
            infos.append(info)
        batch: dict[str, Any] = {k: torch.from_numpy(np.stack([it[k] for it in items]).astype(np.float32))
                                 for k in items[0]}
        batch["info"] = infos
        return batch
