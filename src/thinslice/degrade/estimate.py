"""Estimate a thick scan's slice profile (shape and FWHM) from the scan itself (``--profile auto``).

The idea is ESPRESO's (Han et al., 2021): anatomy looks statistically alike along every axis, so the through-plane
power spectrum of a thick scan is the in-plane spectrum seen through the unknown slice profile and sampled at the
slice spacing. Each candidate profile is applied to the scan's own in-plane lines (fine pixels) and sampled at the
slice spacing exactly as the scanner sampled the slices; the candidate whose spectrum has the through-plane
spectrum's shape is the estimate. Only the shape of the spectrum is compared (the two log-spectra are aligned by
their mean over the band), as anatomy has more low-frequency power along the body axis than across it; the
segments are differenced first, so that the window's leakage of that low-frequency power does not mask the
profile's fall-off near the Nyquist frequency.

What a spectrum below the slice Nyquist frequency tells is the profile's *width* (its second moment), not its shape:
a box and a Gaussian of the same variance differ by less than 0.3 dB of power there (measured on ct07: the box
candidate fitted every true profile as well as the Gaussian did). So the estimate is the Gaussian of the same width,
reported as such; a box of thickness T comes out as a Gaussian of FWHM about 0.7 T (docs/design/clinical.md).

Written here because no imaging library estimates a slice sensitivity profile; the spectra are numpy FFTs and the
candidates are :func:`thinslice.degrade.profiles.profile_matrix`, the operator simulation and consistency use.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from thinslice.degrade.profiles import profile_matrix
from thinslice.errors import ThinsliceError
from thinslice.io.volume import Volume

# Candidate shapes (see the module docstring: the width is what can be told, so one shape) and FWHM / spacing
# ratios; the estimate is refined between the grid points by a parabola through the best three.
SHAPES = ("gaussian",)
RATIOS = np.round(np.arange(0.6, 2.61, 0.1), 2)
SEGMENT = 17  # samples per segment, 16 differences (through-plane: thick slices; in-plane: every slice spacing)
BAND = (0.15, 0.95)  # the compared part of the spectrum, as fractions of the slice Nyquist frequency
TISSUE_HU = -900.0  # segments whose mean is below this are outside the body and skipped
MIN_SLICES = 8
_REF_SLICES = 24  # axial slices used for the in-plane reference


@dataclass(frozen=True)
class ProfileEstimate:
    """The slice profile that best explains the scan: shape, FWHM (mm), FWHM / spacing, and the fit's distance
    (RMS of the log-spectrum difference; lower is a closer fit)."""

    profile: str
    fwhm_mm: float
    ratio: float
    distance: float

    def describe(self) -> str:
        return f"{self.profile}, FWHM {self.fwhm_mm:.2f} mm ({self.ratio:.2f} x spacing), estimated from the scan"


def estimate_profile(thick: Volume, shapes: Sequence[str] = SHAPES) -> ProfileEstimate:
    """The slice profile of ``thick`` estimated from its own through-plane and in-plane spectra; ``shapes`` are the
    candidate shapes (other families were design points: docs/design)."""
    hu = np.clip(thick.slices_first().astype(np.float32), -1024.0, 2000.0)
    if hu.shape[0] < MIN_SLICES:
        raise ThinsliceError(f"--profile auto needs at least {MIN_SLICES} slices to estimate the slice profile, the "
                             f"input has {hu.shape[0]}: give --profile and --thickness instead")
    spacing = float(thick.slice_spacing)
    pixel = float(np.mean([thick.spacing[i] for i in range(3) if i != thick.slice_axis]))
    target = _spectrum(_through_plane_segments(hu))
    lines = _inplane_lines(hu)
    fits = {shape: np.array([_distance(target, _candidate_spectrum(lines, pixel, spacing, r, shape))
                             for r in RATIOS]) for shape in shapes}
    shape = min(fits, key=lambda s: float(fits[s].min()))
    ratio = _refine(RATIOS, fits[shape])
    return ProfileEstimate(shape, ratio * spacing, ratio, float(fits[shape].min()))


def _segments(columns: np.ndarray) -> np.ndarray:
    """Non-overlapping SEGMENT-long pieces (count, SEGMENT) of columns (count, length) that lie in the body."""
    n = columns.shape[1] // SEGMENT
    if n == 0:
        raise ThinsliceError(f"need at least {SEGMENT} samples along an axis to estimate the slice profile")
    pieces = columns[:, : n * SEGMENT].reshape(-1, SEGMENT)
    return pieces[pieces.mean(axis=1) > TISSUE_HU]


def _through_plane_segments(hu: np.ndarray) -> np.ndarray:
    """Segments along the slice axis of every 4th in-plane column (M, A, B) -> (count, SEGMENT)."""
    cols = hu[:, ::4, ::4].reshape(hu.shape[0], -1).T
    if hu.shape[0] < SEGMENT:  # short stacks: mirror to one segment's length (keeps the spectrum's shape)
        cols = np.concatenate([cols, cols[:, ::-1]], axis=1)[:, :SEGMENT]
    return _segments(cols)


def _inplane_lines(hu: np.ndarray) -> np.ndarray:
    """Rows and columns (count, pixels) of up to _REF_SLICES axial slices spread over the stack."""
    picks = hu[np.unique(np.linspace(0, hu.shape[0] - 1, _REF_SLICES).round().astype(int))]
    rows = picks[:, ::4, :].reshape(-1, picks.shape[2])
    cols = picks[:, :, ::4].transpose(0, 2, 1).reshape(-1, picks.shape[1])
    size = min(rows.shape[1], cols.shape[1])
    return np.concatenate([rows[:, :size], cols[:, :size]])


def _candidate_spectrum(lines: np.ndarray, pixel: float, spacing: float, ratio: float, shape: str) -> np.ndarray:
    """Spectrum of the in-plane lines seen through ``shape`` with FWHM ``ratio`` x spacing, sampled every spacing."""
    positions = np.arange(lines.shape[1]) * pixel
    fwhm = max(ratio * spacing, pixel)
    centres = np.arange(fwhm, positions[-1] - fwhm, spacing)
    if centres.size < SEGMENT:
        raise ThinsliceError("the in-plane field of view is too small for the slice spacing to estimate the profile")
    weights = profile_matrix(positions, centres, fwhm, shape).astype(np.float32)
    return _spectrum(_segments(lines @ weights.T))


def _spectrum(segments: np.ndarray) -> np.ndarray:
    """Mean log power spectrum (Hann window, mean removed) of segments (count, SEGMENT) over the compared band."""
    if segments.shape[0] == 0:
        raise ThinsliceError("the scan has no tissue to estimate the slice profile from: give --profile instead")
    steps = np.diff(segments, axis=1)
    n = steps.shape[1]
    x = (steps - steps.mean(axis=1, keepdims=True)) * np.hanning(n).astype(np.float32)
    power = (np.abs(np.fft.rfft(x, axis=1)) ** 2).mean(axis=0)
    freq = np.fft.rfftfreq(n) * 2  # fraction of Nyquist
    band = (freq >= BAND[0]) & (freq <= BAND[1])
    return np.log(power[band] + 1e-6)


def _distance(a: np.ndarray, b: np.ndarray) -> float:
    """RMS difference of two log spectra after removing their mean offset (compares shape, not level)."""
    d = a - b
    return float(np.sqrt(np.mean((d - d.mean()) ** 2)))


def _refine(grid: np.ndarray, values: np.ndarray) -> float:
    """The minimum of a parabola through the best grid point and its neighbours (the grid point at an edge)."""
    i = int(np.argmin(values))
    if i == 0 or i == len(grid) - 1:
        return float(grid[i])
    y0, y1, y2 = values[i - 1: i + 2]
    denom = y0 - 2 * y1 + y2
    step = float(grid[1] - grid[0])
    return float(grid[i] + (0.5 * (y0 - y2) / denom * step if denom > 0 else 0.0))
