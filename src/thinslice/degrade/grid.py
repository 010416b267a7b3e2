"""The thin-slice grid an upsampler writes: what a thin scan of the same extent as the thick stack would have.

The thick stack covers ``[c0 - S/2, c_last + S/2]`` (S = thick spacing, M slices, extent ``L = M*S``); the grid
has ``n = floor(L/s)`` thin slices of spacing ``s`` (counted with a tolerance, so that a spacing stored in float32
does not drop a slice), centred on the stack: the part of the extent ``n*s`` does not fill is split equally between
both ends. When ``s`` divides the extent (``degrade(thin, factor=k)`` for whole ``k``, or any ``M*S/s`` whole) the
grid tiles the extent from its lower edge, centres ``c0 - S/2 + s/2 + j*s``: with the slab conventions of
:mod:`thinslice.degrade.profiles` upsampling at the thin spacing then lands exactly on the original thin slices, so
outputs can be scored without resampling.
"""

from __future__ import annotations

import math

import numpy as np

from thinslice.errors import ThinsliceError
from thinslice.io.volume import Volume
from thinslice.memory import available_memory

_EPS = 1e-6
# A requested spacing within this fraction of a divisor S/k of the slice spacing S is taken as S/k exactly: "1.667"
# for 5/3 mm would otherwise give a thin grid one slice short of the thick extent and a factor that is not whole.
SNAP_TOLERANCE = 0.005
# Share of a thin slice by which the extent may fall short of a whole count and still give that count: spacings read
# from files are float32 (relative error ~6e-8, so ~1e-3 of a slice over 10^4 slices); a real remainder this small
# would only put the outer slice centres 0.005 slice beyond the extent.
_COUNT_TOLERANCE = 0.01
# No CT is reconstructed at a finer slice spacing than this (the finest detectors give ~0.25 mm); below it a
# --spacing is a typo (0.001 for 1) that would ask for millions of slices.
MIN_SPACING_MM = 0.05


def check_spacing_value(spacing_mm: float) -> float:
    """``spacing_mm`` as a float, refused in one line when it is not a plausible CT slice spacing."""
    s = float(spacing_mm)
    if not (math.isfinite(s) and s > 0):
        raise ThinsliceError(f"output slice spacing must be a positive number of mm, got {spacing_mm}")
    if s < MIN_SPACING_MM:
        raise ThinsliceError(f"output slice spacing {s:g} mm is finer than any CT reconstruction (at least "
                             f"{MIN_SPACING_MM:g} mm); give the spacing in mm, e.g. --spacing 1")
    return s


def snap_spacing(thick: Volume, spacing_mm: float) -> float:
    """``spacing_mm``, or the divisor of the slice spacing it stands for (within :data:`SNAP_TOLERANCE`), so that
    the rounded spacing a message suggests is one every method accepts."""
    s = check_spacing_value(spacing_mm)
    big = thick.slice_spacing
    k = round(big / s)
    if k >= 1 and abs(big / k - s) <= SNAP_TOLERANCE * s:
        return big / k
    return s


def thin_grid(thick: Volume, spacing_mm: float) -> tuple[int, float]:
    """``(n_slices, first_offset_mm)`` of the thin grid; the offset is relative to the thick first slice centre."""
    s = check_spacing_value(spacing_mm)
    big = thick.slice_spacing
    if s > big * (1 + _EPS):
        raise ThinsliceError(
            f"output spacing {s:.4g} mm is coarser than the input slice spacing {big:.4g} mm: choose a spacing "
            f"below {big:.4g} mm"
        )
    n = thin_count(thick.num_slices * big, s)
    check_output_size(n, thick.array.size // thick.num_slices, s)
    return n, -big / 2 + s / 2 + thin_margin(thick.num_slices * big, s)


def thin_count(extent_mm: float, spacing_mm: float) -> int:
    """Slices of ``spacing_mm`` that fit in ``extent_mm`` (a count a hair short of whole is taken as whole)."""
    return max(int(math.floor(extent_mm / spacing_mm + _COUNT_TOLERANCE)), 1)


def thin_margin(extent_mm: float, spacing_mm: float) -> float:
    """Half of what ``thin_count`` slices leave of the extent: the grid's shift from the lower edge, so that it is
    centred on the stack (exactly 0 when the slices fill the extent, the grid of the divisor case)."""
    rest = extent_mm - thin_count(extent_mm, spacing_mm) * spacing_mm
    return 0.0 if abs(rest) <= _COUNT_TOLERANCE * spacing_mm else rest / 2


# Working copies of the output held at once by the upsampling paths (float32 output, float64 blocks, interpolation).
_OUTPUT_COPIES = 3


def check_output_size(n_slices: int, voxels_per_slice: int, spacing_mm: float) -> None:
    """Refuse, before any work, an output grid that cannot fit in this machine's available memory."""
    need = n_slices * voxels_per_slice * 4 * _OUTPUT_COPIES
    available = available_memory()
    if need > available:
        raise ThinsliceError(
            f"the output would have {n_slices} slices ({n_slices * voxels_per_slice * 4 / 2**30:.1f} GB as float32, "
            f"about {need / 2**30:.1f} GB while computing) but {available / 2**30:.1f} GB of memory is available: "
            f"choose a coarser --spacing than {spacing_mm:.4g} mm or crop the input")


def thin_positions(thick: Volume, spacing_mm: float) -> np.ndarray:
    """Positions (mm, same frame as ``thick.slice_positions_mm()``) of the thin grid's slice centres."""
    n, offset = thin_grid(thick, spacing_mm)
    return thick.slice_positions_mm()[0] + offset + np.arange(n) * float(spacing_mm)


def fills_extent(thick: Volume, spacing_mm: float) -> bool:
    """True when the thin grid at ``spacing_mm`` tiles the stack's extent from its lower edge (no centring margin):
    the grid that lies on the thin slices a simulated stack was made from."""
    return thin_margin(thick.num_slices * thick.slice_spacing, float(spacing_mm)) == 0.0


def target_grid_volume(thick: Volume, spacing_mm: float) -> Volume:
    """An all-zero volume on the thin grid (in-plane grid and orientation of ``thick``), to fill in."""
    n, offset = thin_grid(thick, spacing_mm)
    rows, cols = thick.slices_first().shape[1:]
    return thick.with_slices(np.zeros((n, rows, cols), np.float32), float(spacing_mm), offset,
                             slice_thickness=float(spacing_mm))


# Trailing thick slices :func:`whole_extent` may drop: at least this many, and up to a quarter of the stack (a factor
# p/q needs a multiple of q slabs: 5 mm from 0.7 mm is 50/7, from 0.9765625 mm 128/25).
_MAX_DROPPED = 8


def whole_extent(thick: Volume, thin_spacing: float) -> Volume:
    """``thick`` without the fewest trailing slices that leave an extent of whole thin slices, so that the centred
    thin grid lies on the thin slices ``thick`` was simulated from (``thick`` itself when none is needed or none
    within :data:`_MAX_DROPPED` or a quarter of the stack helps).

    A stack simulated at a non-integer factor (48 slices / 2.5 -> 19 slabs, 47.5 thin slices deep) would otherwise be
    upsampled a quarter of a slice off its truth, and could not be scored against it without resampling.
    """
    fewest = max(thick.num_slices - max(_MAX_DROPPED, thick.num_slices // 4), 2)
    for keep in range(thick.num_slices, fewest - 1, -1):
        trimmed = thick if keep == thick.num_slices else thick.with_slices(
            thick.slices_first()[:keep], thick.slice_spacing, 0.0, thick.slice_thickness)
        if fills_extent(trimmed, thin_spacing):
            return trimmed
    return thick
