"""The slab operator of a thick stack and the data-consistency step written as matrices.

The thick input is modelled as ``y = A x`` along the slice axis, ``A`` (M thick x N thin) being the profile matrix of
:mod:`thinslice.degrade.profiles`, extended beyond the thin grid where the slabs reach (:class:`SlabOperator`). The
consistency step replaces a thin estimate by the nearest volume that reproduces the thick input, an orthogonal
projection onto ``{x : A x = y}``::

    x' = x + A^T (A A^T)^{-1} (y - A x)      (= x + A^+ (y - A x), computed with the pseudo-inverse A^+)

The correction lies in the row space of ``A``, so detail the model added in the null space of ``A`` (what thick slices
cannot see) is kept untouched. Written here because it is a small dense linear-algebra step that no imaging library
offers in this form.

Overlapping slices (thickness well above the spacing, the usual clinical reconstruction) make ``A`` ill-conditioned:
its smallest singular values approach zero and the exact projection amplifies whatever the model ``A`` gets wrong
(the ends of the stack, the true profile) by ``1/sigma``. There the pseudo-inverse is replaced by a Tikhonov-filtered
one, ``sigma / (sigma^2 + lambda)`` with ``lambda = (0.05 sigma_max)^2``, chosen from the operator's own spectrum
(docs/reliability.md and docs/design/benchmark.md have the overlap cases behind these two numbers).

In degrade/ (beside the profiles) rather than in infer/ because training examples are built from the same matrices
(:func:`cell_operators`: the planes network's thick input and cubic-dc base), and training examples import no
inference code. :mod:`thinslice.infer.consistency` applies the step to volumes.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import numpy as np

from thinslice.degrade.grid import thin_positions
from thinslice.degrade.interpolate import interpolate_slices
from thinslice.degrade.profiles import (
    ThickSliceSpec,
    check_profile,
    profile_half_width,
    profile_matrix,
    thick_grid,
)
from thinslice.errors import ThinsliceError
from thinslice.io.volume import Volume

# The exact projection is used while the smallest singular value of A is at least this fraction of the largest
# (every non-overlapping profile: 0.5-1.0); below it, the Tikhonov filter with lambda = (TIKHONOV_ALPHA sigma_max)^2.
WELL_CONDITIONED = 0.1
# Slice thickness / spacing above this is refused as implausible (clinical overlap is at most about 3-5x).
MAX_THICKNESS_RATIO = 6.0
TIKHONOV_ALPHA = 0.05


@dataclass(frozen=True)
class SlabOperator:
    """The slice-profile operator of a thick stack over its thin grid extended by ``pad`` slices at each end.

    Slabs near the ends of the stack reach beyond the thin grid (Gaussian tails, overlapping slices). The tissue
    there is real, so the projection treats those ``pad`` slices as free unknowns (cropped afterwards) instead of
    renormalising the profile onto the grid: a renormalised profile is wrong by up to hundreds of HU in the end
    slabs, and with overlapping slices the ill-conditioned inverse spreads that error through the whole column.
    """

    extended: np.ndarray  # M x (N + 2 pad), rows sum to 1
    pad: int

    @property
    def shape(self) -> tuple[int, int]:
        """(M thick slices, N thin slices on the grid)."""
        return self.extended.shape[0], self.extended.shape[1] - 2 * self.pad

    @property
    def inside_rows(self) -> np.ndarray:
        """Thick slices whose profile lies entirely on the grid: the ones an output can be checked against."""
        n = self.extended.shape[1]
        outside = self.extended[:, : self.pad].any(axis=1) | self.extended[:, n - self.pad:].any(axis=1)
        return np.flatnonzero(~outside)

    @property
    def inside(self) -> np.ndarray:
        """``A`` restricted to :attr:`inside_rows` and the grid's own slices."""
        return self.extended[self.inside_rows][:, self.pad: self.extended.shape[1] - self.pad]


def thick_profile_operator(thick: Volume, spacing_mm: float, profile: str = "gaussian",
                           thickness_mm: float | None = None) -> SlabOperator:
    """The operator mapping the thin grid of ``thin_grid(thick, spacing_mm)`` (extended, see :class:`SlabOperator`)
    to ``thick``'s slices.

    The slice thickness is ``thickness_mm``, else the input's recorded slice thickness, else its slice spacing.
    For ``decimate`` the sampling centres follow :func:`thinslice.degrade.profiles.thick_grid` (nearest thin slice,
    ties to the lower one), so a volume degraded by thinslice is reproduced exactly.
    """
    check_profile(profile)
    thickness = plausible_thickness(thick, thickness_mm)
    # A slab cannot be resolved more finely than the output grid: a thinner one acts as a sample of one slice.
    thickness = max(thickness, float(spacing_mm))
    centres = thick.slice_positions_mm()
    if profile == "decimate":
        # Offset sampling centre - nominal centre, from the same rule the simulation uses.
        spec = ThickSliceSpec(max(thickness, float(spacing_mm)), thick.slice_spacing, profile)
        n_probe = int(math.ceil(spec.thickness_mm / float(spacing_mm))) + 1
        nominal, sampling = thick_grid(n_probe, float(spacing_mm), spec)
        centres = centres + (sampling[0] - nominal[0])
        return SlabOperator(profile_matrix(thin_positions(thick, spacing_mm), centres, thickness, profile), 0)
    s = float(spacing_mm)
    grid = thin_positions(thick, s)
    reach = profile_half_width(profile, thickness)
    beyond = max(grid[0] - (centres[0] - reach), (centres[-1] + reach) - grid[-1], 0.0)
    pad = int(math.ceil(beyond / s - 1e-6))
    extended = grid[0] + s * np.arange(-pad, grid.size + pad)
    return SlabOperator(profile_matrix(extended, centres, thickness, profile), pad)


def plausible_thickness(thick: Volume, thickness_mm: float | None) -> float:
    """The slice thickness to model: ``thickness_mm``, else the file's, else the slice spacing; implausible values
    are refused. (A given value far from the file's own is reported once per call, by ``upsample``.)"""
    recorded = thick.slice_thickness
    thickness = float(thickness_mm or recorded or thick.slice_spacing)
    if not (math.isfinite(thickness) and thickness > 0):
        raise ThinsliceError(f"slice thickness must be a positive number of mm, got {thickness}")
    if thickness > MAX_THICKNESS_RATIO * thick.slice_spacing:
        raise ThinsliceError(
            f"slice thickness {thickness:.4g} mm is more than {MAX_THICKNESS_RATIO:g}x the slice spacing "
            f"{thick.slice_spacing:.4g} mm, which no CT reconstruction uses; check --thickness"
            + (f" (the file records {recorded:.4g} mm)" if recorded else ""))
    return thickness


def _as_operator(weights: np.ndarray | SlabOperator) -> SlabOperator:
    """A plain matrix is an operator without extension (its rows renormalised onto the grid)."""
    if isinstance(weights, SlabOperator):
        return weights
    return SlabOperator(np.asarray(weights, dtype=np.float64), 0)


def consistency_projector(weights: np.ndarray) -> np.ndarray:
    """``P`` (N x M, float64) so that ``x + P (y - A x)`` is the (regularised) consistent volume.

    ``A^+ = A^T (A A^T)^{-1}`` (exact, via the SVD) when ``A`` is well conditioned; for heavily overlapping slices the
    Tikhonov-filtered inverse ``V diag(s / (s^2 + lambda)) U^T``, which stays close to the input where the thick
    slices barely constrain it. M is at most a few hundred slices, so the SVD costs nothing.
    """
    u, sv, vt = np.linalg.svd(np.asarray(weights, dtype=np.float64), full_matrices=False)
    if sv.size == 0 or sv[0] <= 0:
        raise ThinsliceError("the slice-profile operator is zero; check the slice thickness and positions")
    ridge = 0.0 if sv[-1] >= WELL_CONDITIONED * sv[0] else (TIKHONOV_ALPHA * sv[0]) ** 2
    return (vt.T * (sv / (sv**2 + ridge))) @ u.T


def consistency_matrix(weights: np.ndarray | SlabOperator) -> np.ndarray:
    """The whole consistency step as one matrix ``[G | H]`` (N x (N + M)): the consistent volume is ``G x + H y``.

    ``x`` is continued into the pad slices by its end slices (E), projected on the extended grid and cropped:
    ``crop(E x + P (y - A E x))``, i.e. ``G = crop(E - P A E)`` and ``H = crop(P)``.
    """
    op = _as_operator(weights)
    a, pad = op.extended, op.pad
    n = a.shape[1] - 2 * pad
    edge = np.zeros((n + 2 * pad, n))
    edge[np.arange(n + 2 * pad), np.clip(np.arange(n + 2 * pad) - pad, 0, n - 1)] = 1.0
    proj = consistency_projector(a)
    g = (edge - proj @ (a @ edge))[pad: pad + n]
    h = proj[pad: pad + n]
    return np.concatenate([g, h], axis=1)


def _unit_thick_volume(m: int, k: int, thickness_ratio: float) -> Volume:
    """m thick slices of spacing k (thin spacing 1) and thickness ``thickness_ratio * k``: the cell geometry."""
    return Volume(np.zeros((m, 1, 1), np.float32), (1.0, 1.0, float(k)), slice_thickness=thickness_ratio * k)


@functools.lru_cache(maxsize=1024)  # per factor x rows x ratio x profile (training draws many)
def cell_operators(k: int, m: int, thickness_ratio: float, profile: str) -> tuple[np.ndarray, np.ndarray, int]:
    """``(A, B, pad)`` for m thick cells of k thin rows: ``thick = A @ thin`` with A (m x (mk + 2 pad)) over the
    cells' rows and ``pad`` rows beyond each end (where the slabs reach), and ``cubic_dc = B @ thick`` (mk x m).

    Built from the very functions inference uses (``thick_profile_operator``, ``interpolate_slices``, the
    consistency projection) on a unit geometry, so training inputs equal what ``cubic-dc`` gives at inference.
    """
    vol = _unit_thick_volume(m, k, thickness_ratio)
    op = thick_profile_operator(vol, 1.0, profile, thickness_ratio * k)
    c = interpolate_slices(np.eye(m, dtype=np.float32)[:, :, None], vol.slice_positions_mm(),
                           thin_positions(vol, 1.0), method="cubic")[:, :, 0].astype(np.float64)
    both = consistency_matrix(op)
    b = both[:, : m * k] @ c + both[:, m * k:]
    return op.extended.astype(np.float32), b.astype(np.float32), op.pad
