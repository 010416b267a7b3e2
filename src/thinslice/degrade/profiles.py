"""Thick-slice simulation as a linear operator along the slice axis.

A thick slice is a weighted sum of thin slices, so the whole simulation is one (M thick x N thin) matrix ``W``
applied along the slice axis. Keeping it a matrix (rather than a filter followed by subsampling) makes the same
operator usable for data consistency during inference (:func:`apply_profile_torch` is differentiable) and handles
volume ends, overlapping slices and non-integer factors without special cases.

Conventions (positions in mm along the slice direction, thin spacing ``s``, thickness ``T``, thick spacing ``S``):

- thick slice ``m`` represents the slab ``[p0 - s/2 + m*S, p0 - s/2 + m*S + T]``; its *nominal centre* (the
  position written into the output geometry) is the slab centre ``p0 - s/2 + T/2 + m*S``. The first slab starts at
  the lower edge of the first thin slice and as many slabs are made as fit fully inside the thin extent;
- ``box``: weights = overlap length of each thin slice's extent with the slab;
- ``gaussian``: weights ~ exp(-(p - c)^2 / 2 sigma^2) with FWHM = T, truncated at 3 sigma;
- ``triangle``: weights ~ max(0, 1 - |p - c| / T) (FWHM = T, base 2T), the profile of many helical reconstructions;
- ``trapezoid``: flat top T/2 wide, base 3T/2 (FWHM = T), between box and triangle;
- ``tailed``: the Gaussian plus a tenth of one three times as wide (FWHM about 1.1 T): the long tails measured
  slice sensitivity profiles have;
- ``decimate``: the thin slice at the *sampling centre* ``round(first nominal centre) + m*S`` (linear interpolation
  between the two nearest thin slices when that falls between slices, e.g. for factor 2.5). For integer factors
  this is plain decimation. For even factors the slab centre lies half-way between two thin slices; the lower one
  is kept, half a thin slice from the nominal centre. The geometry still reports the nominal centre so that the
  thick grid, and hence every upsampling grid and training pair, stays aligned with the thin source for all three
  profiles (see docs/design/interpolation-baselines.md).

Rows are normalised to sum to 1 over the thin slices that exist, which renormalises the profile at volume ends.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from thinslice.errors import ThinsliceError
from thinslice.io.volume import Volume

if TYPE_CHECKING:  # torch is imported where used, so that the CLI starts fast
    import torch

PROFILES = ("box", "gaussian", "decimate", "triangle", "trapezoid", "tailed")
# The shapes a scanner's slice sensitivity profile takes (decimation is a sampling, not a profile): training draws the
# true profile from this family so that a network never depends on being told the right one.
PROFILE_FAMILY = ("gaussian", "box", "triangle", "trapezoid", "tailed")
TAIL_WEIGHT, TAIL_WIDTH = 0.1, 3.0  # ``tailed``: 0.1 x a Gaussian 3x as wide
FWHM_TO_SIGMA = 1.0 / (2.0 * math.sqrt(2.0 * math.log(2.0)))
GAUSSIAN_TRUNCATE = 3.0  # in sigmas
_EPS = 1e-6


@dataclass(frozen=True)
class ThickSliceSpec:
    """How thick slices are made: slice thickness and spacing in mm (overlap when spacing < thickness)."""

    thickness_mm: float
    spacing_mm: float
    profile: str = "gaussian"

    def __post_init__(self) -> None:
        check_profile(self.profile)
        if not (math.isfinite(self.thickness_mm) and self.thickness_mm > 0):
            raise ThinsliceError(f"slice thickness must be a positive number of mm, got {self.thickness_mm}")
        if not (math.isfinite(self.spacing_mm) and self.spacing_mm > 0):
            raise ThinsliceError(f"slice spacing must be a positive number of mm, got {self.spacing_mm}")

    def describe(self) -> str:
        overlap = ""
        if self.spacing_mm < self.thickness_mm - _EPS:
            overlap = f", {self.thickness_mm - self.spacing_mm:.3g} mm overlap"
        return f"{self.profile} profile, {self.thickness_mm:.4g} mm slices every {self.spacing_mm:.4g} mm{overlap}"


def check_profile(profile: str) -> str:
    if profile not in PROFILES:
        raise ThinsliceError(f"unknown slice profile '{profile}': use one of {', '.join(PROFILES)}")
    return profile


def make_spec(
    thin_spacing_mm: float,
    *,
    factor: float | None = None,
    thickness: float | None = None,
    spacing: float | None = None,
    profile: str = "gaussian",
) -> ThickSliceSpec:
    """Resolve the user's choice (a factor k, or thickness/spacing in mm) into a :class:`ThickSliceSpec`."""
    if (factor is None) == (thickness is None):
        raise ThinsliceError("give either a factor (thick = k x thin slices) or a slice thickness in mm, not both")
    if factor is not None:
        if spacing is not None:
            raise ThinsliceError("--spacing goes with --thickness; with --factor the spacing is factor x thin spacing")
        if not (math.isfinite(factor) and factor >= 1.0):
            raise ThinsliceError(f"factor must be >= 1 (thick slices are made of several thin ones), got {factor}")
        thickness = spacing = float(factor) * thin_spacing_mm
    assert thickness is not None
    spacing = thickness if spacing is None else spacing
    spec = ThickSliceSpec(float(thickness), float(spacing), profile)
    if spec.thickness_mm < thin_spacing_mm * (1 - _EPS):
        raise ThinsliceError(
            f"slice thickness {spec.thickness_mm:.4g} mm is thinner than the input slice spacing "
            f"{thin_spacing_mm:.4g} mm: choose a thickness >= {thin_spacing_mm:.4g} mm (or a factor >= 1)"
        )
    if spec.spacing_mm < thin_spacing_mm * (1 - _EPS):
        raise ThinsliceError(
            f"slice spacing {spec.spacing_mm:.4g} mm is finer than the input's {thin_spacing_mm:.4g} mm: the "
            f"simulated stack would have more slices than the input; choose --spacing >= {thin_spacing_mm:.4g} mm"
        )
    return spec


# ----------------------------------------------------------------------------------------------------- grids
def thick_grid(
    n_thin: int, thin_spacing: float, spec: ThickSliceSpec, first_thin_position: float = 0.0
) -> tuple[np.ndarray, np.ndarray]:
    """Nominal centres (for the output geometry) and sampling centres (for the weights) of the thick slices.

    Both are absolute positions in the same frame as ``first_thin_position``; they differ only for ``decimate``.
    """
    s, t, step = float(thin_spacing), spec.thickness_mm, spec.spacing_mm
    extent = n_thin * s
    if extent < t * (1 - _EPS):
        raise ThinsliceError(
            f"the volume is only {extent:.4g} mm deep along the slice axis ({n_thin} slices of {s:.4g} mm), "
            f"less than one {t:.4g} mm thick slice: use a thinner slice thickness"
        )
    shift = 0.0 if spec.profile == "decimate" else lattice_shift(s, spec)
    n_thick = int(math.floor((extent - shift - t) / step + _EPS)) + 1
    nominal = first_thin_position - s / 2 + shift + t / 2 + step * np.arange(n_thick)
    if spec.profile != "decimate":
        return nominal, nominal.copy()
    # Round the first centre to the nearest thin slice, ties to the lower one (see module docstring).
    offset = (t - s) / 2 / s
    first = first_thin_position + s * math.floor(offset + 0.5 - _EPS)
    return nominal, first + step * np.arange(n_thick)


def lattice_shift(thin_spacing: float, spec: ThickSliceSpec) -> float:
    """How far (mm, less than one thin slice) the first slab starts above the lower edge of the thin stack.

    The upsampling grid of a thick stack starts ``(thickness - spacing) / 2`` above its first slab's lower edge. When
    that is not a whole number of thin slices (e.g. 4 mm slices every 2 mm from 2 mm slices: half a slice), the
    slabs start later by the remainder, so that the grid lands on the thin slices and the result can be scored
    against them without resampling. Zero for every non-overlapping and most overlapping cases.
    """
    offset = (spec.thickness_mm - spec.spacing_mm) / 2 / float(thin_spacing)
    remainder = (-offset) % 1.0
    return 0.0 if remainder < _EPS or remainder > 1 - _EPS else remainder * float(thin_spacing)


def profile_half_width(profile: str, thickness: float) -> float:
    """How far (mm) a slab's weights reach from its centre (decimation: half a slice)."""
    sigma = thickness * FWHM_TO_SIGMA
    return {"gaussian": GAUSSIAN_TRUNCATE * sigma, "tailed": GAUSSIAN_TRUNCATE * TAIL_WIDTH * sigma,
            "triangle": thickness, "trapezoid": 0.75 * thickness}.get(profile, thickness / 2)


def _shape_weights(d: np.ndarray, thickness: float, profile: str) -> np.ndarray:
    """Point-sampled weights of the smooth profiles at distances ``d`` (mm) from the slab centre."""
    sigma = thickness * FWHM_TO_SIGMA
    if profile == "triangle":
        return np.clip(1.0 - np.abs(d) / thickness, 0.0, None)
    if profile == "trapezoid":
        return np.clip((0.75 * thickness - np.abs(d)) / (0.5 * thickness), 0.0, 1.0)
    w = np.exp(-0.5 * (d / sigma) ** 2)
    if profile == "tailed":
        w = w + TAIL_WEIGHT * np.exp(-0.5 * (d / (TAIL_WIDTH * sigma)) ** 2)
    w[np.abs(d) > profile_half_width(profile, thickness)] = 0.0
    return w


def profile_matrix(
    thin_positions_mm: np.ndarray,
    thick_centres_mm: np.ndarray,
    thickness_mm: float,
    profile: str,
) -> np.ndarray:
    """Weights ``W`` (M thick x N thin, float64, rows sum to 1) so that ``thick = W @ thin`` along the slices.

    ``thin_positions_mm`` must be uniformly spaced and increasing; ``thick_centres_mm`` are the sampling centres.
    """
    check_profile(profile)
    p = np.asarray(thin_positions_mm, dtype=np.float64)
    c = np.asarray(thick_centres_mm, dtype=np.float64)[:, None]
    if p.ndim != 1 or p.size < 1:
        raise ThinsliceError("need at least one thin slice position")
    s = float(np.median(np.diff(p))) if p.size > 1 else float(thickness_mm)
    if profile == "box":
        lo = np.maximum(p[None, :] - s / 2, c - thickness_mm / 2)
        hi = np.minimum(p[None, :] + s / 2, c + thickness_mm / 2)
        w = np.clip(hi - lo, 0.0, None)
    elif profile != "decimate":
        w = _shape_weights(p[None, :] - c, float(thickness_mm), profile)
    else:  # decimate: linear interpolation at the centre, clamped to the thin range
        idx = np.clip((c[:, 0] - p[0]) / s, 0.0, p.size - 1)
        lo_i = np.floor(idx + _EPS).astype(int).clip(0, p.size - 1)
        frac = np.where(idx - lo_i < _EPS, 0.0, idx - lo_i)
        w = np.zeros((c.shape[0], p.size))
        rows = np.arange(c.shape[0])
        w[rows, lo_i] = 1.0 - frac
        hi_i = np.minimum(lo_i + 1, p.size - 1)
        w[rows, hi_i] += frac
    total = w.sum(axis=1, keepdims=True)
    if np.any(total <= 0):
        raise ThinsliceError("a thick slice lies outside the thin volume; check the thick slice positions")
    return w / total


# ------------------------------------------------------------------------------------------------ applying W
def apply_profile(slices_first: np.ndarray, weights: np.ndarray, chunk_rows: int = 64) -> np.ndarray:
    """``W`` applied along axis 0 of ``slices_first`` (N, a, b) -> (M, a, b) float32.

    Works on blocks of rows so that a non-contiguous view (slice axis not the first numpy axis) is never copied
    whole: peak memory is the output plus one block.
    """
    n = slices_first.shape[0]
    if weights.shape[1] != n:
        raise ThinsliceError(f"profile matrix has {weights.shape[1]} columns but the volume has {n} slices")
    w32 = np.ascontiguousarray(weights, dtype=np.float32)
    rest = slices_first.shape[1:]
    out = np.empty((weights.shape[0], *rest), dtype=np.float32)
    if slices_first.ndim == 1:
        return (w32 @ slices_first.astype(np.float32)).astype(np.float32)
    for r0 in range(0, rest[0], chunk_rows):
        block = np.asarray(slices_first[:, r0:r0 + chunk_rows], dtype=np.float32)
        out[:, r0:r0 + chunk_rows] = (w32 @ block.reshape(n, -1)).reshape(weights.shape[0], *block.shape[1:])
    return out


def apply_profile_torch(tensor: torch.Tensor, weights: np.ndarray | torch.Tensor, dim: int) -> torch.Tensor:
    """Differentiable ``W`` along ``dim`` of ``tensor`` (e.g. dim=2 of a (B, C, D, H, W) batch)."""
    import torch

    w = torch.as_tensor(weights, dtype=tensor.dtype, device=tensor.device)
    if w.shape[1] != tensor.shape[dim]:
        raise ThinsliceError(f"profile matrix has {w.shape[1]} columns but dim {dim} has {tensor.shape[dim]}")
    moved = tensor.movedim(dim, -1)
    return torch.matmul(moved, w.T).movedim(-1, dim)


# ---------------------------------------------------------------------------------------------- volume level
def degrade(
    volume: Volume,
    *,
    factor: float | None = None,
    thickness: float | None = None,
    spacing: float | None = None,
    profile: str = "gaussian",
) -> Volume:
    """Simulate a thick-slice acquisition of ``volume`` (a thin-slice CT) along its slice axis.

    Either ``factor`` k (thickness = spacing = k x thin spacing) or ``thickness`` [and ``spacing``] in mm.
    """
    s = volume.slice_spacing
    spec = make_spec(s, factor=factor, thickness=thickness, spacing=spacing, profile=profile)
    nominal, sampling = thick_grid(volume.num_slices, s, spec)
    if nominal.size < 2:
        raise ThinsliceError(
            f"the volume ({volume.num_slices * s:.4g} mm deep) holds only one {spec.thickness_mm:.4g} mm slab every "
            f"{spec.spacing_mm:.4g} mm: a single thick slice is no volume to upsample; use thinner or more closely "
            "spaced slices")
    weights = profile_matrix(np.arange(volume.num_slices) * s, sampling, spec.thickness_mm, spec.profile)
    thick = apply_profile(volume.slices_first(), weights)
    out = volume.with_slices(thick, spec.spacing_mm, float(nominal[0]), slice_thickness=spec.thickness_mm)
    out.metadata["degrade"] = spec.describe()
    return out


def describe(spec: ThickSliceSpec) -> str:
    """One-line description of a thick-slice simulation (for logs and file metadata)."""
    return spec.describe()
