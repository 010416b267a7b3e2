"""Data consistency: make an upsampled volume reproduce the thick input exactly under the slice-profile operator.

The thick input is modelled as ``y = A x`` along the slice axis, ``A`` (M thick x N thin) being the profile matrix of
:mod:`thinslice.degrade.profiles`. A generated thin volume ``x`` rarely satisfies this; :func:`enforce_consistency`
replaces it by the nearest volume that does (orthogonal projection onto ``{x : A x = y}``, done independently for
every in-plane voxel column)::

    x' = x + A^T (A A^T)^{-1} (y - A x)      (= x + A^+ (y - A x), computed with the pseudo-inverse A^+)

The correction lies in the row space of ``A``, so detail the model added in the null space of ``A`` (what thick slices
cannot see) is kept untouched. Written here because it is a small dense linear-algebra step that no imaging library
offers in this form.
"""

from __future__ import annotations

import math

import numpy as np

from thinslice.degrade.profiles import ThickSliceSpec, check_profile, profile_matrix, thick_grid
from thinslice.errors import ThinsliceError
from thinslice.infer.grid import thin_positions
from thinslice.io.volume import Volume

# Singular values below this fraction of the largest are treated as zero: dependent rows (heavily overlapping thick
# slices) then give the least-squares projection instead of an unstable inverse.
DEFAULT_RCOND = 1e-10
_CHUNK_ROWS = 32


def thick_profile_operator(thick: Volume, spacing_mm: float, profile: str = "gaussian",
                           thickness_mm: float | None = None) -> np.ndarray:
    """``A`` (M x N float64) mapping the thin grid of ``thin_grid(thick, spacing_mm)`` to ``thick``'s slices.

    The slice thickness is ``thickness_mm``, else the input's recorded slice thickness, else its slice spacing.
    For ``decimate`` the sampling centres follow :func:`thinslice.degrade.profiles.thick_grid` (nearest thin slice,
    ties to the lower one), so a volume degraded by thinslice is reproduced exactly.
    """
    check_profile(profile)
    thickness = float(thickness_mm or thick.slice_thickness or thick.slice_spacing)
    if not (math.isfinite(thickness) and thickness > 0):
        raise ThinsliceError(f"slice thickness must be a positive number of mm, got {thickness}")
    centres = thick.slice_positions_mm()
    if profile == "decimate":
        # Offset sampling centre - nominal centre, from the same rule the simulation uses.
        spec = ThickSliceSpec(max(thickness, float(spacing_mm)), thick.slice_spacing, profile)
        n_probe = int(math.ceil(spec.thickness_mm / float(spacing_mm))) + 1
        nominal, sampling = thick_grid(n_probe, float(spacing_mm), spec)
        centres = centres + (sampling[0] - nominal[0])
    return profile_matrix(thin_positions(thick, spacing_mm), centres, thickness, profile)


def _projector(weights: np.ndarray, rcond: float) -> np.ndarray:
    """``A^+`` (N x M, float64): equals ``A^T (A A^T)^{-1}`` for full row rank.

    The pseudo-inverse (SVD) rather than a ridge-regularised solve: a ridge of 1e-6 already leaves residuals of
    ~1e-2 HU for Gaussian profiles, while the SVD is exact and M is at most a few hundred slices.
    """
    return np.linalg.pinv(np.asarray(weights, dtype=np.float64), rcond=rcond)


def _check(thin: np.ndarray, thick: np.ndarray, weights: np.ndarray) -> None:
    if weights.ndim != 2 or weights.shape != (thick.shape[0], thin.shape[0]):
        raise ThinsliceError(
            f"profile matrix of shape {weights.shape} does not map {thin.shape[0]} thin slices to "
            f"{thick.shape[0]} thick slices"
        )
    if thin.shape[1:] != thick.shape[1:]:
        raise ThinsliceError(f"thin and thick volumes differ in-plane: {thin.shape[1:]} vs {thick.shape[1:]}")


def enforce_consistency(
    thin_hu_slices_first: np.ndarray,
    thick_hu_slices_first: np.ndarray,
    weights: np.ndarray,
    rcond: float = DEFAULT_RCOND,
) -> np.ndarray:
    """The volume closest to ``thin`` (N, a, b) whose profile-weighted slices ``A x`` equal ``thick`` (M, a, b).

    Returns a new float32 array; works on blocks of rows in float64 so memory stays near the output size.
    """
    x = np.asarray(thin_hu_slices_first)
    y = np.asarray(thick_hu_slices_first)
    a = np.asarray(weights, dtype=np.float64)
    _check(x, y, a)
    proj = _projector(a, rcond)
    out = np.empty(x.shape, dtype=np.float32)
    n, m = x.shape[0], y.shape[0]
    for r0 in range(0, x.shape[1], _CHUNK_ROWS):
        xb = np.asarray(x[:, r0:r0 + _CHUNK_ROWS], dtype=np.float64)
        rest = xb.shape[1:]
        xb = xb.reshape(n, -1)
        yb = np.asarray(y[:, r0:r0 + _CHUNK_ROWS], dtype=np.float64).reshape(m, -1)
        xb += proj @ (yb - a @ xb)
        out[:, r0:r0 + _CHUNK_ROWS] = xb.reshape(n, *rest)
    return out


def consistency_residual_hu(
    thin_hu_slices_first: np.ndarray, thick_hu_slices_first: np.ndarray, weights: np.ndarray
) -> dict[str, float]:
    """How far ``A x`` is from the thick input: mean and max absolute difference in HU."""
    x = np.asarray(thin_hu_slices_first)
    y = np.asarray(thick_hu_slices_first)
    a = np.asarray(weights, dtype=np.float64)
    _check(x, y, a)
    total, peak, count = 0.0, 0.0, 0
    n, m = x.shape[0], y.shape[0]
    for r0 in range(0, x.shape[1], _CHUNK_ROWS):
        xb = np.asarray(x[:, r0:r0 + _CHUNK_ROWS], dtype=np.float64).reshape(n, -1)
        yb = np.asarray(y[:, r0:r0 + _CHUNK_ROWS], dtype=np.float64).reshape(m, -1)
        diff = np.abs(a @ xb - yb)
        total += float(diff.sum())
        peak = max(peak, float(diff.max()) if diff.size else 0.0)
        count += diff.size
    return {"mean_abs": total / max(count, 1), "max_abs": peak}


def make_consistent(thin: Volume, thick: Volume, profile: str = "gaussian",
                    thickness_mm: float | None = None) -> tuple[Volume, dict[str, float]]:
    """``thin`` (on ``thin_grid(thick, ...)``) projected onto consistency with ``thick``; plus residuals in HU.

    The returned dict holds ``before_mean_abs``, ``before_max_abs``, ``after_mean_abs``, ``after_max_abs``.
    """
    weights = thick_profile_operator(thick, thin.slice_spacing, profile, thickness_mm)
    x = thin.slices_first()
    y = thick.slices_first()
    before = consistency_residual_hu(x, y, weights)
    corrected = enforce_consistency(x, y, weights)
    after = consistency_residual_hu(corrected, y, weights)
    out = thin.with_slices(corrected, thin.slice_spacing, 0.0, thin.slice_thickness)
    report = {f"before_{k}": v for k, v in before.items()} | {f"after_{k}": v for k, v in after.items()}
    return out, report
