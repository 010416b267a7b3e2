"""Through-plane interpolation of slices (linear, cubic B-spline): one axis only, in-plane untouched.

Here in degrade/ rather than in infer/ because it is one of the operators a training example is made with (the
cubic input of the CNN and diffusion pairs, cubic-dc written as a matrix for planes) as well as the ``linear`` and
``cubic`` methods of inference (:mod:`thinslice.infer.interpolate`, which applies it to volumes).

``scipy.ndimage.map_coordinates`` would need a full 3D coordinate array (3 x output voxels of float64) for what is
a 1D problem, so the cubic path reproduces it along one axis by hand: B-spline prefilter with
``scipy.ndimage.spline_filter1d`` on the edge-padded slices (what ``map_coordinates(order=3, mode="nearest")`` does
internally), then the 4-tap cubic B-spline sum per output slice. It is exact against ``map_coordinates`` (tested),
and processes blocks of rows so that peak memory stays near the output size.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

from thinslice.errors import ThinsliceError

METHODS = ("linear", "cubic")
# Edge padding before the prefilter, as scipy does for mode="nearest": the influence of the boundary condition
# decays as 0.268^n, below float32 precision after 12 samples.
_PAD = 12


def _fractional_index(thick_centres: np.ndarray, thin_centres: np.ndarray) -> np.ndarray:
    """Position of each thin centre in thick-slice index units, clamped to [0, M-1] (nearest at the ends)."""
    c = np.asarray(thick_centres, dtype=np.float64)
    t = np.asarray(thin_centres, dtype=np.float64)
    if c.ndim != 1 or c.size < 1:
        raise ThinsliceError("need at least one thick slice")
    if c.size > 1 and np.any(np.diff(c) <= 0):
        raise ThinsliceError("thick slice centres must increase")
    return np.interp(t, c, np.arange(c.size, dtype=np.float64))


def interpolate_slices(
    thick_slices_first: np.ndarray,
    thick_centres: np.ndarray,
    thin_centres: np.ndarray,
    method: str = "linear",
    chunk_rows: int = 64,
) -> np.ndarray:
    """Values at ``thin_centres`` (mm) from slices at ``thick_centres`` (mm), along axis 0: (M, a, b) -> (n, a, b).

    Cubic uses a cubic B-spline on uniformly spaced thick centres.
    """
    if method not in METHODS:
        raise ThinsliceError(f"unknown interpolation '{method}': use one of {', '.join(METHODS)}")
    data = np.asarray(thick_slices_first)
    if data.ndim != 3:
        raise ThinsliceError(f"expected slices-first (M, a, b) array, got shape {data.shape}")
    if data.shape[0] != len(thick_centres):
        raise ThinsliceError(f"{data.shape[0]} slices but {len(thick_centres)} slice centres")
    u = _fractional_index(thick_centres, thin_centres)
    out = np.empty((u.size, *data.shape[1:]), dtype=np.float32)
    m = data.shape[0]
    if method == "linear" or m < 2:
        lo = np.minimum(np.floor(u).astype(int), max(m - 2, 0))
        frac = (u - lo).astype(np.float32)
        hi = np.minimum(lo + 1, m - 1)
        for j in range(u.size):
            np.multiply(data[lo[j]], 1.0 - frac[j], out=out[j], casting="unsafe")
            out[j] += frac[j] * data[hi[j]]
        return out
    # Cubic B-spline: taps at floor(u)-1 .. floor(u)+2 of the padded coefficient array.
    base = np.floor(u).astype(int)
    weights = _bspline3_weights(u - base)  # (n, 4)
    idx = base[:, None] + np.arange(-1, 3)[None, :] + _PAD  # (n, 4)
    for r0 in range(0, data.shape[1], chunk_rows):
        block = np.asarray(data[:, r0:r0 + chunk_rows], dtype=np.float32)
        padded = np.pad(block, ((_PAD, _PAD), (0, 0), (0, 0)), mode="edge")
        coeffs = ndimage.spline_filter1d(padded, order=3, axis=0, mode="mirror", output=np.float32)
        for j in range(u.size):
            acc = out[j, r0:r0 + chunk_rows]
            np.multiply(coeffs[idx[j, 0]], weights[j, 0], out=acc)
            for t in range(1, 4):
                acc += weights[j, t] * coeffs[idx[j, t]]
    return out


def _bspline3_weights(frac: np.ndarray) -> np.ndarray:
    """Cubic B-spline weights of the taps at offsets -1, 0, 1, 2 for fractional positions in [0, 1)."""
    f = np.asarray(frac, dtype=np.float64)
    w0 = (1 - f) ** 3 / 6
    w1 = (3 * f**3 - 6 * f**2 + 4) / 6
    w2 = (-3 * f**3 + 3 * f**2 + 3 * f + 1) / 6
    w3 = f**3 / 6
    return np.stack([w0, w1, w2, w3], axis=1).astype(np.float32)
