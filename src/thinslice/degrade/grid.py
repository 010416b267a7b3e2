"""The thin-slice grid an upsampler writes: what a thin scan of the same extent as the thick stack would have.

The thick stack covers ``[c0 - S/2, c_last + S/2]`` (S = thick spacing); thin slices of spacing ``s`` tile that
extent from its lower edge: centres ``c0 - S/2 + s/2 + j*s`` for ``j < floor(M*S/s)``. With the slab conventions of
:mod:`thinslice.degrade.profiles`, ``degrade(thin, factor=k)`` followed by upsampling at the thin spacing lands
exactly on the original thin slices, so outputs can be scored without resampling.
"""

from __future__ import annotations

import math

import numpy as np

from thinslice.errors import ThinsliceError
from thinslice.io.volume import Volume

_EPS = 1e-6
# A requested spacing within this fraction of a divisor S/k of the slice spacing S is taken as S/k exactly: "1.667"
# for 5/3 mm would otherwise give a thin grid one slice short of the thick extent and a factor that is not whole.
SNAP_TOLERANCE = 0.005


def snap_spacing(thick: Volume, spacing_mm: float) -> float:
    """``spacing_mm``, or the divisor of the slice spacing it stands for (within :data:`SNAP_TOLERANCE`), so that
    the rounded spacing a message suggests is one every method accepts."""
    s = float(spacing_mm)
    if not (math.isfinite(s) and s > 0):
        raise ThinsliceError(f"output slice spacing must be a positive number of mm, got {spacing_mm}")
    big = thick.slice_spacing
    k = round(big / s)
    if k >= 1 and abs(big / k - s) <= SNAP_TOLERANCE * s:
        return big / k
    return s


def thin_grid(thick: Volume, spacing_mm: float) -> tuple[int, float]:
    """``(n_slices, first_offset_mm)`` of the thin grid; the offset is relative to the thick first slice centre."""
    s = float(spacing_mm)
    big = thick.slice_spacing
    if not (math.isfinite(s) and s > 0):
        raise ThinsliceError(f"output slice spacing must be a positive number of mm, got {spacing_mm}")
    if s > big * (1 + _EPS):
        raise ThinsliceError(
            f"output spacing {s:.4g} mm is coarser than the input slice spacing {big:.4g} mm: choose a spacing "
            f"below {big:.4g} mm"
        )
    n = int(math.floor(thick.num_slices * big / s + _EPS))
    check_output_size(n, thick.array.size // thick.num_slices, s)
    return n, -big / 2 + s / 2


# Working copies of the output held at once by the upsampling paths (float32 output, float64 blocks, interpolation).
_OUTPUT_COPIES = 3


def check_output_size(n_slices: int, voxels_per_slice: int, spacing_mm: float) -> None:
    """Refuse, before any work, an output grid that cannot fit in this machine's available memory."""
    import psutil

    need = n_slices * voxels_per_slice * 4 * _OUTPUT_COPIES
    available = psutil.virtual_memory().available
    if need > available:
        raise ThinsliceError(
            f"the output would have {n_slices} slices ({n_slices * voxels_per_slice * 4 / 2**30:.1f} GB as float32, "
            f"about {need / 2**30:.1f} GB while computing) but {available / 2**30:.1f} GB of memory is available: "
            f"choose a coarser --spacing than {spacing_mm:.4g} mm or crop the input")


def thin_positions(thick: Volume, spacing_mm: float) -> np.ndarray:
    """Positions (mm, same frame as ``thick.slice_positions_mm()``) of the thin grid's slice centres."""
    n, offset = thin_grid(thick, spacing_mm)
    return thick.slice_positions_mm()[0] + offset + np.arange(n) * float(spacing_mm)


def target_grid_volume(thick: Volume, spacing_mm: float) -> Volume:
    """An all-zero volume on the thin grid (in-plane grid and orientation of ``thick``), to fill in."""
    n, offset = thin_grid(thick, spacing_mm)
    rows, cols = thick.slices_first().shape[1:]
    return thick.with_slices(np.zeros((n, rows, cols), np.float32), float(spacing_mm), offset,
                             slice_thickness=float(spacing_mm))
