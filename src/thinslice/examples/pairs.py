"""Training pairs made on the fly: (cubic-upsampled simulated thick patch, thin patch), shared by every trainer.

From a thin (HR) patch in HU, slices first, drawn a little deeper than the training depth by
:class:`~thinslice.examples.patches.PatchSampler`, each example gets its own degradation (factor, profile) from the
preset's :class:`~thinslice.presets.DegradationConfig`: the patch is degraded along the slice axis
(:func:`~thinslice.degrade.pairs.degrade_slices`, thin spacing 1), interpolated back onto the thin positions with
the cubic B-spline of :func:`~thinslice.degrade.interpolate.interpolate_slices` (what ``--method cubic`` does at
inference), and both are centre-cropped to the training depth. The crop drops the ends of the slab, where the thick
grid does not reach and the interpolation only extrapolates, so the network trains on what it sees inside a volume.

The thick grid starts at a random thin slice (its *phase*), so every alignment of thick slabs to the crop is seen:
at inference the sliding windows fall on the thick grid at any phase. All randomness (volume, corner, factor,
profile, phase and the per-batch noise seed the diffusion loss uses) comes from the sampler's one numpy generator,
whose state is checkpointed by the engine, so a resumed run draws exactly the batches of an uninterrupted one.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from thinslice.degrade.interpolate import interpolate_slices
from thinslice.degrade.pairs import degrade_slices, random_degradation
from thinslice.degrade.profiles import make_spec, thick_grid
from thinslice.errors import ThinsliceError
from thinslice.examples.patches import PatchInfo, PatchSampler
from thinslice.io.volume import Volume
from thinslice.models.intensity import hu_to_model
from thinslice.presets import DegradationConfig

# Validation pairs use one fixed, common degradation so that scores are comparable across steps and runs.
_SEED_HIGH = 2**62


def pair_margin(max_factor: float) -> int:
    """Thin slices dropped at each end of a drawn patch (extra depth per side).

    The interpolated slices are only trustworthy between the first and last thick centre: before the first one
    lie the phase (< factor) and half a slab; after the last one up to a partial slab plus half a slab.
    """
    return 2 * int(math.ceil(max_factor))


def make_pair(
    thin_hu: np.ndarray, factor: float, profile: str, depth: int, phase: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """``(hr, lr)`` HU arrays (depth, H, W) from a thin patch (N, H, W), thin spacing taken as 1.

    ``lr`` = the thick slices of ``thin_hu[phase:]`` (``factor``, ``profile``) cubic-interpolated back onto all
    thin positions; both are centre-cropped to ``depth`` slices.
    """
    n = thin_hu.shape[0]
    if depth > n:
        raise ThinsliceError(f"pair depth {depth} exceeds the patch depth {n}")
    degraded_part = thin_hu[phase:]
    thick = degrade_slices(degraded_part, factor, profile)
    # Nominal centres (where a real thick volume's header puts its slices), in thin-slice units.
    nominal, _sampling = thick_grid(degraded_part.shape[0], 1.0, make_spec(1.0, factor=factor, profile=profile))
    if thick.shape[0] < 2:
        raise ThinsliceError(f"patch of {n} slices is too short for factor {factor}: need at least two thick slices")
    lr = interpolate_slices(thick, nominal + phase, np.arange(n, dtype=np.float64), "cubic")
    start = (n - depth) // 2
    return (np.ascontiguousarray(thin_hu[start:start + depth], dtype=np.float32),
            np.ascontiguousarray(lr[start:start + depth], dtype=np.float32))


class PairSampler(PatchSampler):
    """Endless iterator of training batches ``{"hr", "lr": (B, 1, D, H, W) model range, "factor": (B,),
    "seed": int}`` (see the module docstring); ``seed`` seeds the loss's own noise (timesteps, CFG dropout).

    A :class:`PatchSampler` of patches ``2 * pair_margin`` slices deeper than the pairs (its ``patch_size``: the
    drawn depth, ``depth``: the pairs') whose transform makes the pair, so the patch, its degradation and the batch's
    seed come from the one generator: exact resume.
    """

    def __init__(
        self,
        volumes: Sequence[Volume | str | Path],
        patch_size: tuple[int, int, int],
        batch_size: int,
        degradation: DegradationConfig,
        seed: int = 0,
        max_air_fraction: float = 0.8,
    ) -> None:
        if not degradation.factors or not degradation.profiles:
            raise ThinsliceError("the preset's degradation needs at least one factor and one profile")
        if min(degradation.factors) < 1.0:
            raise ThinsliceError(f"degradation factors must be >= 1, got {degradation.factors}")
        self.degradation = degradation
        self.depth = int(patch_size[0])
        self.margin = pair_margin(max(degradation.factors))
        drawn = (self.depth + 2 * self.margin, int(patch_size[1]), int(patch_size[2]))
        super().__init__(volumes, drawn, batch_size, seed=seed, max_air_fraction=max_air_fraction,
                         transform=self._transform)

    def _transform(self, patch_hu: np.ndarray, info: PatchInfo, rng: np.random.Generator) -> dict[str, np.ndarray]:
        factor, profile = random_degradation(rng, self.degradation.factors, self.degradation.profiles)
        phase = int(rng.integers(int(math.ceil(factor))))
        hr, lr = make_pair(patch_hu, factor, profile, self.depth, phase)
        return {"hr": hu_to_model(hr)[None], "lr": hu_to_model(lr)[None], "factor": np.float32(factor)}

    def next_batch(self) -> dict[str, Any]:
        batch = super().next_batch()
        batch.pop("info", None)
        batch["seed"] = int(self.rng.integers(_SEED_HIGH))
        return batch
