"""Sheared slice stacks (gantry tilt) resampled onto an orthogonal grid.

A CT acquired with a tilted gantry has slices that are parallel but shifted sideways from one to the next: the
DICOM positions (or a NIfTI sform, as dcm2niix writes one for uncorrected tilt) describe a sheared grid. Every
downstream step (the slice axis, thick-slice simulation, the thin grid, NIfTI/DICOM output) assumes an orthogonal
grid, so the stack is resampled here once: each slice keeps its plane and its position along the slice normal and is
shifted in-plane by its own lateral offset (linear interpolation, as dcm2niix's tilt correction does). The in-plane
grid grows so that every input voxel stays inside it. World positions of the tissue are unchanged; nothing is
approximated beyond the in-plane interpolation.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np

from thinslice.errors import ThinsliceError

log = logging.getLogger(__name__)

# Lateral slice shifts below this fraction of a pixel are rounding noise in the headers, not shear.
_SHIFT_TOL_PX = 0.01
# Cosine between the two in-plane axes above which they are not perpendicular (an in-plane shear: refused).
_PERPENDICULAR_TOL = 1e-3


@dataclass
class Stack:
    """An orthogonal stack: numpy array (nk, nj, ni), spacing (si, sj, sk), origin and direction (columns i j k)."""

    array: np.ndarray
    spacing: tuple[float, float, float]
    origin: np.ndarray
    direction: np.ndarray
    tilt_deg: float = 0.0


def stack_from_offsets(array: np.ndarray, spacing_ij: tuple[float, float], axes_ij: np.ndarray,
                       origin: np.ndarray, offsets: np.ndarray, fill: float, source: object = "the image") -> Stack:
    """The orthogonal stack equivalent to slices ``array[k]`` whose first voxel lies at ``origin + offsets[k]``.

    ``axes_ij`` holds the in-plane unit vectors as columns (3 x 2); ``offsets`` (nk x 3, mm) are the slice positions
    relative to slice 0 (even spacing along the normal is the caller's check). Voxels outside the sheared input get
    ``fill``. ``source`` names the file in a refusal.
    """
    di, dj = axes_ij[:, 0], axes_ij[:, 1]
    if abs(float(np.dot(di, dj))) > _PERPENDICULAR_TOL:
        raise ThinsliceError(f"{source}: the in-plane axes of the image are not perpendicular (an in-plane shear); "
                             "resample it to an orthogonal grid with the tool that made it, then pass the result")
    normal = np.cross(di, dj)
    normal /= np.linalg.norm(normal)
    along = offsets @ normal
    if along[-1] < 0:  # slices stacked against the normal: index k runs the way the slices go
        normal, along = -normal, -along
    si, sj = (float(s) for s in spacing_ij)
    shift_i, shift_j = _shifts_px(spacing_ij, axes_ij, offsets)
    n = len(along)
    sk = float((along[-1] - along[0]) / (n - 1)) if n > 1 else 1.0
    direction = np.column_stack([di, dj, normal])
    if not is_sheared(spacing_ij, axes_ij, offsets):
        return Stack(array, (si, sj, sk), np.asarray(origin, float), direction)
    lateral = np.hypot(shift_i[-1] * si, shift_j[-1] * sj)
    tilt = float(np.degrees(np.arctan2(lateral, abs(along[-1] - along[0]))))
    i0, ni = _covering_range(shift_i, array.shape[2])
    j0, nj = _covering_range(shift_j, array.shape[1])
    out = _shift_slices(array, shift_i - i0, shift_j - j0, (nj, ni), fill)
    new_origin = np.asarray(origin, float) + i0 * si * di + j0 * sj * dj + along[0] * normal
    return Stack(out, (si, sj, sk), new_origin, direction, tilt)


def _shifts_px(spacing_ij: tuple[float, float], axes_ij: np.ndarray, offsets: np.ndarray
               ) -> tuple[np.ndarray, np.ndarray]:
    """The in-plane offset of each slice from slice 0, in pixels along i and along j."""
    return (offsets @ axes_ij[:, 0]) / float(spacing_ij[0]), (offsets @ axes_ij[:, 1]) / float(spacing_ij[1])


def is_sheared(spacing_ij: tuple[float, float], axes_ij: np.ndarray, offsets: np.ndarray) -> bool:
    """True when some slice lies sideways of slice 0 by a measurable part of a pixel (cheap: no voxels)."""
    shift_i, shift_j = _shifts_px(spacing_ij, np.asarray(axes_ij, dtype=np.float64), np.asarray(offsets, float))
    return bool(max(np.abs(shift_i).max(), np.abs(shift_j).max()) >= _SHIFT_TOL_PX)


def _covering_range(shifts: np.ndarray, size: int) -> tuple[int, int]:
    """(first index, size) of an output axis that holds every shifted slice: pixel p of slice k lands at p + s_k."""
    low = int(np.floor(min(0.0, float(shifts.min())) + 1e-6))
    high = int(np.ceil(size - 1 + max(0.0, float(shifts.max())) - 1e-6))
    return low, high - low + 1


def _shift_slices(array: np.ndarray, shift_i: np.ndarray, shift_j: np.ndarray, shape: tuple[int, int],
                  fill: float) -> np.ndarray:
    """Each slice moved by its own (shift_j, shift_i) pixels into an output of in-plane ``shape``, linearly."""
    from scipy import ndimage

    out = np.empty((array.shape[0], *shape), np.float32)
    for k in range(array.shape[0]):
        # affine_transform: out[o] = in[o + offset]; pixel p of the input lands at p + shift.
        ndimage.affine_transform(array[k].astype(np.float32, copy=False), np.eye(2),
                                 offset=(-shift_j[k], -shift_i[k]), output_shape=shape, output=out[k], order=1,
                                 mode="constant", cval=fill)
    return out


def describe_tilt(stack: Stack, source: object) -> str:
    """The one-line note a user gets when a sheared stack was resampled."""
    return (f"{source}: slices are sheared by {stack.tilt_deg:.1f} degrees (gantry tilt); resampled onto an "
            f"orthogonal grid (each slice shifted in-plane, linear interpolation, as dcm2niix's tilt correction), "
            f"{stack.array.shape[2]}x{stack.array.shape[1]} pixels")
