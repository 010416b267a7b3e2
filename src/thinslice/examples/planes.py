"""Training examples of the planes network, shared by ``train-planes`` and ``upsample --method planes --adapt``.

An example is a thin plane X (k thin rows per thick cell, ``width`` pixels) degraded as ``thick = A X`` and turned
into cubic-dc as ``base = B thick`` with the operators inference uses
(:func:`thinslice.degrade.operators.cell_operators`). Planes come from a volume's through-plane planes (coronal or
sagittal) or from axial slices with one in-plane axis playing the slice axis (SMORE / SR4ZCT self-supervision): the
only thin planes a thick input itself holds, which is what adaptation to an input trains on
(:mod:`thinslice.infer.planes_adapt`).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from thinslice.degrade.operators import cell_operators
from thinslice.degrade.profiles import PROFILE_FAMILY
from thinslice.errors import ThinsliceError
from thinslice.examples.base import ExampleSampler
from thinslice.io.prepare import training_volume
from thinslice.io.volume import Volume
from thinslice.models.intensity import AIR_THRESHOLD_HU, hu_int16, hu_to_model
from thinslice.models.planes import PlanesConfig, acquisition_vector
from thinslice.presets import DegradationConfig, PlaneSamplingConfig

_MIN_TISSUE = 0.3  # a plane with less than this fraction of non-air pixels is redrawn


class PlaneSampler(ExampleSampler):
    """Endless batches of training planes (one factor per batch, as each factor has its own head).

    Its one numpy generator is checkpointed (``state_dict``), so a resumed run draws the batches an uninterrupted one
    would have drawn.
    """

    def __init__(self, volumes: Sequence[Volume | str | Path], sampling: PlaneSamplingConfig,
                 degradation: DegradationConfig, network: PlanesConfig, batch_size: int, seed: int = 0,
                 acquisition: tuple[str, float] | None = None) -> None:
        """Examples for ``network``: its factors, its 2.5D ``context`` neighbouring planes on each side, and
        thick-grid blocks instead of planes for ``dims`` 3. ``acquisition`` (profile, thickness / spacing) fixes
        what is otherwise drawn per example (adaptation to one input)."""
        super().__init__(seed)
        self.context = int(network.context)
        self.dims = int(network.dims)
        factors = tuple(int(k) for k in network.factors)
        self.sources = [hu_int16(training_volume(v).slices_first()) for v in volumes]
        if not self.sources:
            raise ThinsliceError("no training volumes")
        self.cfg = sampling
        self.profiles = tuple(degradation.profiles)
        self.fixed = acquisition
        wanted = {int(round(f)) for f in degradation.factors}
        self.factors = tuple(k for k in factors if k in wanted) or tuple(factors)
        self.batch_size = int(batch_size)
        sizes = np.array([float(s.size) for s in self.sources])
        self.volume_p = np.sqrt(sizes) / np.sqrt(sizes).sum()  # big volumes more often, small ones still seen

    def next_batch(self) -> dict[str, torch.Tensor]:
        k = int(self.factors[int(self.rng.integers(len(self.factors)))])
        items = [self._example(k) for _ in range(self.batch_size)]
        stack = {key: torch.from_numpy(np.stack([it[key] for it in items])) for key in items[0]}
        return stack

    def _acquisition(self) -> tuple[str, float]:
        """A slice profile and thickness / spacing ratio (jittered, sometimes overlapping)."""
        if self.fixed is not None:
            return self.fixed
        cfg, rng = self.cfg, self.rng
        profile = str(self.profiles[int(rng.integers(len(self.profiles)))])
        if profile == "decimate":
            return profile, 1.0
        if rng.random() < cfg.overlap_fraction:
            ratio = rng.uniform(1.2, cfg.max_overlap)
        else:
            ratio = rng.uniform(1.0 - cfg.thickness_jitter, 1.0 + cfg.thickness_jitter)
        return profile, _quantised(ratio)

    def _true_slabs(self, declared: tuple[str, float]) -> tuple[str, float]:
        """The profile the slabs are really made with: the declared one, or (``profile_mismatch``) a member of the
        profile family with a FWHM of U(``mismatch_fwhm``) x the declared thickness."""
        profile, ratio = declared
        if profile == "decimate" or self.fixed is not None or self.rng.random() >= self.cfg.profile_mismatch:
            return declared
        shape = str(PROFILE_FAMILY[int(self.rng.integers(len(PROFILE_FAMILY)))])
        lo, hi = self.cfg.mismatch_fwhm
        return shape, _quantised(ratio * self.rng.uniform(lo, hi))

    def _example(self, k: int) -> dict[str, np.ndarray]:
        rows = self.cfg.rows
        profile, ratio = self._acquisition()
        true_profile, true_ratio = self._true_slabs((profile, ratio))
        a, _, pad = cell_operators(k, rows, true_ratio, true_profile)
        b = cell_operators(k, rows, ratio, profile)[1]
        # the slabs of the end cells reach `pad` rows beyond them
        x = self._plane(rows * k + 2 * pad, self.cfg.width) if self.dims == 2 else self._block(rows * k + 2 * pad)
        x = self._appearance(x)
        thick = np.moveaxis(np.tensordot(a, x, axes=([1], [1])), 0, 1)  # A along axis 1 of (P, n, *R)
        x = x[:, pad: pad + rows * k]
        if self.cfg.noise_hu > 0:
            thick = thick + self.rng.normal(0.0, self.rng.uniform(0, self.cfg.noise_hu), thick.shape)
        base = np.moveaxis(np.tensordot(b, thick, axes=([1], [1])), 0, 1)
        return {"thick": hu_to_model(thick).astype(np.float32),
                "base": hu_to_model(base).astype(np.float32),
                "hr": hu_to_model(x[self.context: self.context + 1]).astype(np.float32),
                "cond": np.asarray(acquisition_vector(ratio, profile), np.float32)}

    def _appearance(self, x: np.ndarray) -> np.ndarray:
        """Intensity and reconstruction-kernel variation of a thin example (P, n, *R), when the config asks for it."""
        cfg, rng = self.cfg, self.rng
        if cfg.intensity_jitter > 0:
            x = (x + 1024.0) * rng.uniform(1.0 - cfg.intensity_jitter, 1.0 + cfg.intensity_jitter) - 1024.0
        if cfg.kernel_sigma > 0:
            from scipy.ndimage import gaussian_filter1d

            x = x + rng.uniform(-0.5, 0.5) * (x - gaussian_filter1d(x, cfg.kernel_sigma, axis=-1, mode="nearest"))
        return x

    def _plane(self, n: int, w: int) -> np.ndarray:
        """Thin planes (P, n rows along the degraded axis, w pixels): the plane and its context neighbours, mostly
        tissue, randomly flipped."""
        best, best_tissue = None, -1.0
        for _ in range(10):
            src = self.sources[int(self.rng.choice(len(self.sources), p=self.volume_p))]
            x = self._crop(src, n, w)
            tissue = float((x[self.context] > AIR_THRESHOLD_HU).mean())
            if tissue > best_tissue:
                best, best_tissue = x, tissue
            if tissue >= _MIN_TISSUE:
                break
        assert best is not None
        for axis in (0, 1, 2):  # the order of the neighbours, the degraded axis, the pixels
            if self.rng.random() < 0.5:
                best = np.flip(best, axis)
        return np.ascontiguousarray(best, dtype=np.float32)

    def _block(self, n: int) -> np.ndarray:
        """A thin block (1, n rows along the degraded axis, block, block), mostly tissue, randomly flipped and with
        its in-plane axes randomly swapped: through-plane, or (``inplane_fraction``) with one in-plane axis as the
        degraded axis."""
        size, rng = self.cfg.block, self.rng
        best, best_tissue = None, -1.0
        for _ in range(10):
            hu = self.sources[int(rng.choice(len(self.sources), p=self.volume_p))]
            if hu.shape[0] < n or rng.random() < self.cfg.inplane_fraction:
                hu = hu.transpose(1, 0, 2) if rng.random() < 0.5 else hu.transpose(2, 0, 1)
            x = _crop_block(_pad_block(hu, n, size), n, size, rng)
            tissue = float((x > AIR_THRESHOLD_HU).mean())
            if tissue > best_tissue:
                best, best_tissue = x, tissue
            if tissue >= _MIN_TISSUE:
                break
        assert best is not None
        for axis in (0, 1, 2):
            if rng.random() < 0.5:
                best = np.flip(best, axis)
        if rng.random() < 0.5:
            best = best.transpose(0, 2, 1)
        return np.ascontiguousarray(best, dtype=np.float32)[None]

    def _crop(self, hu: np.ndarray, n: int, w: int) -> np.ndarray:
        """(P, n, w) from a volume (D, A, B): P neighbouring planes along the axis the planes are stacked on."""
        rng = self.rng
        depth = hu.shape[0]
        if depth < n or rng.random() < self.cfg.inplane_fraction:
            stack = hu[self._neighbours(int(rng.integers(depth)), depth)]  # axial slices (P, A, B)
            planes = stack.transpose(0, 2, 1) if rng.random() < 0.5 else stack
        elif rng.random() < 0.5:  # coronal: (D, P, B) -> (P, D, B)
            planes = hu[:, self._neighbours(int(rng.integers(hu.shape[1])), hu.shape[1]), :].transpose(1, 0, 2)
        else:  # sagittal: (D, A, P) -> (P, D, A)
            planes = hu[:, :, self._neighbours(int(rng.integers(hu.shape[2])), hu.shape[2])].transpose(2, 0, 1)
        planes = _pad_to(planes, n, w)
        r0 = int(rng.integers(planes.shape[1] - n + 1))
        c0 = int(rng.integers(planes.shape[2] - w + 1))
        return planes[:, r0:r0 + n, c0:c0 + w]

    def _neighbours(self, index: int, size: int) -> np.ndarray:
        """Indices of a plane and its context neighbours, clamped at the volume's edge."""
        return np.clip(np.arange(index - self.context, index + self.context + 1), 0, size - 1)


def _quantised(ratio: float) -> float:
    """Thickness / spacing on a 0.05 lattice: the cell operators are cached per ratio."""
    return round(float(ratio) * 20) / 20


def _pad_to(planes: np.ndarray, n: int, w: int) -> np.ndarray:
    """Pad planes (P, rows, pixels) with air to at least (n, w) (small volumes, tiny tests)."""
    pad = (max(0, n - planes.shape[1]), max(0, w - planes.shape[2]))
    if pad == (0, 0):
        return planes
    return np.pad(planes, ((0, 0), (0, pad[0]), (0, pad[1])), constant_values=-1024)


def _pad_block(hu: np.ndarray, n: int, size: int) -> np.ndarray:
    """Extend a volume (n', a, b) to at least (n, size, size) by repeating its edges (a 20-slice slab as a block's
    in-plane axis); air padding would put an artificial body outline inside the block."""
    pad = [(0, max(0, want - have)) for want, have in zip((n, size, size), hu.shape, strict=True)]
    return hu if not any(p[1] for p in pad) else np.pad(hu, pad, mode="edge")


def _crop_block(hu: np.ndarray, n: int, size: int, rng: np.random.Generator) -> np.ndarray:
    starts = [int(rng.integers(have - want + 1)) for want, have in zip((n, size, size), hu.shape, strict=True)]
    return hu[starts[0]:starts[0] + n, starts[1]:starts[1] + size, starts[2]:starts[2] + size]
