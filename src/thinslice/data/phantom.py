"""A synthetic chest CT phantom, so that the demo and the tests need no patient data.

Built in millimetre coordinates, so that the same anatomy appears at any voxel spacing: body outline with a fat
layer, two lungs with branching-looking vessels and a few nodules, heart and aorta, spine and oblique ribs, and
scanner-like noise. Values are Hounsfield units.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from thinslice.io.volume import Volume

AIR_HU = -1000.0


@dataclass(frozen=True)
class _Grid:
    """Voxel-centre coordinates (mm, centred) and the half field of view; anatomy is drawn in these units."""

    z: np.ndarray
    y: np.ndarray
    x: np.ndarray
    zz: np.ndarray
    yy: np.ndarray
    xx: np.ndarray
    tz: np.ndarray  # -1 (feet) .. 1 (head)
    bx: float | np.ndarray  # body half-axes (narrowing towards the head)
    by: float | np.ndarray


def make_chest_phantom(
    shape: tuple[int, int, int] = (120, 192, 192),
    spacing: tuple[float, float, float] = (1.5, 1.5, 1.25),
    seed: int = 0,
    noise_hu: float = 12.0,
) -> Volume:
    """Chest phantom with numpy shape ``(n_slices, ny, nx)`` and ``spacing`` in (x, y, z) mm.

    The field of view is the shape times the spacing; anatomy is scaled to fit it, so small test volumes still
    contain every structure.
    """
    rng = np.random.default_rng(seed)
    nz, ny, nx = shape
    sx, sy, sz = spacing
    g = _grid(shape, spacing)
    vol = np.full(shape, AIR_HU, dtype=np.float32)
    body_r = _body(vol, g)
    lungs = _lungs(vol, g)
    _vessels_and_nodules(vol, g, lungs, (sz, sy, sx), rng)
    _mediastinum_and_bones(vol, g, body_r)
    # Noise, a little correlated in-plane as reconstructed CT noise is.
    noise = rng.standard_normal(shape).astype(np.float32)
    noise = ndimage.gaussian_filter(noise, (0.0, 0.7, 0.7))
    noise *= noise_hu / (noise.std() + 1e-8)
    vol = vol + noise * (vol > -990)
    vol = np.clip(vol, -1024.0, 3071.0).astype(np.float32)
    origin = (-(nx - 1) / 2 * sx, -(ny - 1) / 2 * sy, -(nz - 1) / 2 * sz)
    return Volume(array=vol, spacing=(sx, sy, sz), origin=origin, direction=np.eye(3), slice_thickness=sz,
                  metadata={"description": "thinslice synthetic chest phantom", "seed": str(seed)})


def _grid(shape: tuple[int, int, int], spacing: tuple[float, float, float]) -> _Grid:
    nz, ny, nx = shape
    sx, sy, sz = spacing
    z = (np.arange(nz) - (nz - 1) / 2) * sz
    y = (np.arange(ny) - (ny - 1) / 2) * sy
    x = (np.arange(nx) - (nx - 1) / 2) * sx
    zz, yy, xx = np.meshgrid(z, y, x, indexing="ij")
    half_x, half_y, half_z = nx * sx / 2, ny * sy / 2, max(nz * sz / 2, 1e-3)
    tz = zz / half_z
    return _Grid(z, y, x, zz, yy, xx, tz, 0.85 * half_x * (1 - 0.08 * tz), 0.62 * half_y * (1 - 0.05 * tz))


def _body(vol: np.ndarray, g: _Grid) -> np.ndarray:
    """Body: an ellipse that narrows a little towards the head, with a fat layer under the skin."""
    body_r = (g.xx / g.bx) ** 2 + (g.yy / g.by) ** 2
    vol[body_r < 1.0] = -100.0
    vol[body_r < 0.80] = 40.0
    return body_r


def _lungs(vol: np.ndarray, g: _Grid) -> np.ndarray:
    """Lungs: two ellipsoids, smaller at the apex (head end)."""
    lung_scale = np.clip(1.0 - 0.35 * np.clip(g.tz, 0, None) ** 2, 0.2, None)
    lungs = np.zeros(vol.shape, dtype=bool)
    for side in (-1, 1):
        cx = side * 0.38 * g.bx
        r = ((g.xx - cx) / (0.28 * g.bx * lung_scale)) ** 2 + ((g.yy + 0.05 * g.by) / (0.62 * g.by * lung_scale)) ** 2
        lungs |= r < 1.0
    vol[lungs] = -860.0
    return lungs


def _vessels_and_nodules(vol: np.ndarray, g: _Grid, lungs: np.ndarray, voxel_mm: tuple[float, float, float],
                         rng: np.random.Generator) -> None:
    """Vessels: tubes where two smooth random fields are both near zero (intersections of level sets); nodules: a
    few spheres inside the lungs."""
    sigma_mm = 6.0
    sig = tuple(sigma_mm / s for s in voxel_mm)
    f1 = ndimage.gaussian_filter(rng.standard_normal(vol.shape).astype(np.float32), sig)
    f2 = ndimage.gaussian_filter(rng.standard_normal(vol.shape).astype(np.float32), sig)
    f1 /= f1.std() + 1e-8
    f2 /= f2.std() + 1e-8
    vessels = (np.abs(f1) < 0.12) & (np.abs(f2) < 0.35) & lungs
    vol[vessels] = 30.0 + 20.0 * rng.standard_normal(np.count_nonzero(vessels)).astype(np.float32) * 0.2
    lung_idx = np.argwhere(lungs)
    for _ in range(3 if len(lung_idx) else 0):
        c = lung_idx[rng.integers(len(lung_idx))]
        rad = rng.uniform(3.0, 7.0)
        d2 = ((g.zz - g.z[c[0]]) ** 2 + (g.yy - g.y[c[1]]) ** 2 + (g.xx - g.x[c[2]]) ** 2)
        vol[d2 < rad**2] = 20.0


def _mediastinum_and_bones(vol: np.ndarray, g: _Grid, body_r: np.ndarray) -> None:
    """Heart between the lungs (lower half), descending aorta, spine with discs every ~30 mm, ribs in oblique
    bands."""
    xx, yy, zz, bx, by = g.xx, g.yy, g.zz, g.bx, g.by
    heart = ((xx + 0.08 * bx) / (0.25 * bx)) ** 2 + ((yy + 0.15 * by) / (0.35 * by)) ** 2 + ((g.tz + 0.3) / 0.7) ** 2
    vol[heart < 1.0] = 45.0
    aorta = ((xx + 0.1 * bx) / (0.07 * bx)) ** 2 + ((yy - 0.45 * by) / (0.1 * by)) ** 2
    vol[(aorta < 1.0) & (body_r < 0.8)] = 50.0
    spine = (xx / (0.1 * bx)) ** 2 + ((yy - 0.72 * by) / (0.14 * by)) ** 2
    disc = np.cos(2 * np.pi * (zz - 9.0) / 30.0) > 0.9
    vol[(spine < 1.0)] = 700.0
    vol[(spine < 0.6)] = 250.0
    vol[(spine < 1.0) & disc] = 80.0
    angle = np.arctan2(yy, xx)
    shell = (body_r > 0.70) & (body_r < 0.76)
    bands = np.sin(2 * np.pi * (zz + 12.0 * np.sin(angle)) / 22.0) > 0.55
    vol[shell & bands & (yy > -0.5 * by)] = 600.0
