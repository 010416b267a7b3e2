"""Data consistency: make an upsampled volume reproduce the thick input exactly under the slice-profile operator.

:func:`enforce_consistency` replaces a generated thin volume ``x`` by the nearest volume whose profile-weighted slices
``A x`` equal the thick input ``y`` (done independently for every in-plane voxel column, in blocks of rows), and
:func:`consistency_residual_hu` measures how far an output is from that. The operator ``A`` and the projection as one
matrix (exact, or Tikhonov-filtered for overlapping slices) are built in :mod:`thinslice.degrade.operators`, which
training examples share; this module applies them to volumes.
"""

from __future__ import annotations

import numpy as np

from thinslice.degrade.operators import SlabOperator, _as_operator, consistency_matrix, thick_profile_operator
from thinslice.errors import ThinsliceError
from thinslice.io.volume import Volume

_CHUNK_ROWS = 32


def _check(thin: np.ndarray, thick: np.ndarray, op: SlabOperator) -> None:
    if op.extended.ndim != 2 or op.shape != (thick.shape[0], thin.shape[0]):
        raise ThinsliceError(
            f"profile matrix of shape {op.shape} does not map {thin.shape[0]} thin slices to "
            f"{thick.shape[0]} thick slices"
        )
    if thin.shape[1:] != thick.shape[1:]:
        raise ThinsliceError(f"thin and thick volumes differ in-plane: {thin.shape[1:]} vs {thick.shape[1:]}")


def enforce_consistency(
    thin_hu_slices_first: np.ndarray,
    thick_hu_slices_first: np.ndarray,
    weights: np.ndarray | SlabOperator,
) -> np.ndarray:
    """The volume closest to ``thin`` (N, a, b) whose profile-weighted slices ``A x`` equal ``thick`` (M, a, b)
    (regularised where ``A`` is ill-conditioned; with a :class:`SlabOperator`, on its extended grid).

    Returns a new float32 array; works on blocks of rows in float64 so memory stays near the output size.
    """
    x = np.asarray(thin_hu_slices_first)
    y = np.asarray(thick_hu_slices_first)
    op = _as_operator(weights)
    _check(x, y, op)
    both = consistency_matrix(op)
    out = np.empty(x.shape, dtype=np.float32)
    n, m = x.shape[0], y.shape[0]
    for r0 in range(0, x.shape[1], _CHUNK_ROWS):
        xb = np.asarray(x[:, r0:r0 + _CHUNK_ROWS], dtype=np.float64)
        rest = xb.shape[1:]
        yb = np.asarray(y[:, r0:r0 + _CHUNK_ROWS], dtype=np.float64).reshape(m, -1)
        fixed = both[:, :n] @ xb.reshape(n, -1) + both[:, n:] @ yb
        out[:, r0:r0 + _CHUNK_ROWS] = fixed.reshape(n, *rest)
    return out


def consistency_residual_hu(
    thin_hu_slices_first: np.ndarray, thick_hu_slices_first: np.ndarray, weights: np.ndarray | SlabOperator
) -> dict[str, float]:
    """How far ``A x`` is from the thick input: mean and max absolute difference in HU, over the thick slices whose
    profile lies on the grid (with a :class:`SlabOperator`; the end slabs also weigh tissue the output lacks)."""
    x = np.asarray(thin_hu_slices_first)
    op = _as_operator(weights)
    _check(x, np.asarray(thick_hu_slices_first), op)
    y = np.asarray(thick_hu_slices_first)[op.inside_rows]
    a = op.inside
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
