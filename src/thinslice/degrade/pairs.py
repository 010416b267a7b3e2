"""Training and evaluation pairs: (simulated thick volume, thin target on the upsampling grid).

Volume-level pairs (:func:`simulate_pair`) are for evaluation: the target is cropped to exactly the grid every
upsampler produces for the thick volume, so scores need no resampling. Array-level helpers (:func:`degrade_slices`,
:func:`degrade_slices_torch`) make pairs on the fly from training patches, with thin spacing normalised to 1 and
the same slab conventions as :func:`thinslice.degrade.profiles.degrade`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np

from thinslice.degrade.grid import thin_grid, whole_extent
from thinslice.degrade.profiles import (
    ThickSliceSpec,
    apply_profile,
    apply_profile_torch,
    check_profile,
    degrade,
    make_spec,
    profile_matrix,
    thick_grid,
)
from thinslice.errors import ThinsliceError
from thinslice.io.volume import Volume

if TYPE_CHECKING:
    import torch


def simulate_pair(
    thin: Volume,
    *,
    factor: float | None = None,
    thickness: float | None = None,
    spacing: float | None = None,
    profile: str = "gaussian",
) -> tuple[Volume, Volume]:
    """``(thick, target)``: a simulated thick volume and the thin volume cropped to its upsampling grid.

    The target holds exactly the thin slices of ``thin_grid(thick, thin spacing)``; thin slices beyond the last
    complete thick slab are dropped. The thin grid is centred on the thick stack, so it lies on the thin slices only
    when the stack's extent is a whole number of them: at a non-integer factor (2.5) trailing thick slices are
    dropped until it is (19 slabs of 2.5 -> 18, 45 targets).
    """
    thick = degrade(thin, factor=factor, thickness=thickness, spacing=spacing, profile=profile)
    s = thin.slice_spacing
    thick = whole_extent(thick, s)
    n, first_offset = thin_grid(thick, s)
    # Offset of the grid's first slice from the thin volume's first slice, in thin slices.
    start_mm = float(thick.slice_positions_mm()[0] - thin.slice_positions_mm()[0]) + first_offset
    start = start_mm / s
    if abs(start - round(start)) > 1e-3:
        raise ThinsliceError(
            f"the {thick.slice_spacing:.4g} mm thick grid is not aligned with the {s:.4g} mm thin slices "
            f"(offset {start_mm:.4g} mm); use a thickness and spacing for which (thickness - spacing) / 2 is a "
            "multiple of the thin spacing"
        )
    start_i = int(round(start))
    stop_i = min(start_i + n, thin.num_slices)
    target = thin.with_slices(thin.slices_first()[start_i:stop_i], s, start_i * s, thin.slice_thickness)
    return thick, target


def degrade_slices(thin_slices_first: np.ndarray, factor: float, profile: str = "gaussian") -> np.ndarray:
    """Thick slices (M, ...) from thin slices (N, ...) with thin spacing 1 and thickness = spacing = ``factor``.

    Thick slice ``m`` covers thin slices ``[m*factor, (m+1)*factor)`` (its nominal extent), so an upsampled
    output of ``floor(M*factor)`` slices lines up with ``thin_slices_first[:floor(M*factor)]``.
    """
    weights = _array_weights(thin_slices_first.shape[0], factor, profile)
    return apply_profile(np.asarray(thin_slices_first), weights)


def degrade_slices_torch(thin: torch.Tensor, factor: float, profile: str = "gaussian", dim: int = 2) -> torch.Tensor:
    """Torch version of :func:`degrade_slices` along ``dim`` (default: D of a (B, C, D, H, W) batch)."""
    weights = _array_weights(thin.shape[dim], factor, profile)
    return apply_profile_torch(thin, weights, dim)


def thick_weights(n_thin: int, factor: float, profile: str = "gaussian") -> np.ndarray:
    """The (M, N) profile matrix used by :func:`degrade_slices` (for data consistency at inference)."""
    return _array_weights(n_thin, factor, profile)


def _array_weights(n_thin: int, factor: float, profile: str) -> np.ndarray:
    check_profile(profile)
    spec = make_spec(1.0, factor=float(factor), profile=profile)
    _, sampling = thick_grid(n_thin, 1.0, spec)
    return profile_matrix(np.arange(n_thin, dtype=np.float64), sampling, spec.thickness_mm, profile)


def random_degradation(
    rng: np.random.Generator, factors: Sequence[float], profiles: Sequence[str]
) -> tuple[float, str]:
    """Sample a (factor, profile) for one training example, uniformly from the preset's lists."""
    if not factors or not profiles:
        raise ThinsliceError("the degradation settings need at least one factor and one profile")
    factor = float(factors[int(rng.integers(len(factors)))])
    profile = check_profile(str(profiles[int(rng.integers(len(profiles)))]))
    return factor, profile


__all__ = [
    "ThickSliceSpec",
    "degrade_slices",
    "degrade_slices_torch",
    "random_degradation",
    "simulate_pair",
    "thick_weights",
]
