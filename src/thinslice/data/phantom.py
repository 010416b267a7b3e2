"""A synthetic chest CT phantom, so that the demo and the tests need no patient data.

Built in millimetre coordinates, so that the same anatomy appears at any voxel spacing: body outline with a fat
layer, two lungs with branching-looking vessels and a few nodules, heart and aorta, spine and oblique ribs, and
scanner-like noise. Values are Hounsfield units.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

from thinslice.io.volume import Volume

AIR_HU = -1000.0


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
    z = (np.arange(nz) - (nz - 1) / 2) * sz
    y = (np.arange(ny) - (ny - 1) / 2) * sy
    x = (np.arange(nx) - (nx - 1) / 2) * sx
    zz, yy, xx = np.meshgrid(z, y, x, indexing="ij")
    half_x, half_y, half_z = nx * sx / 2, ny * sy / 2, max(nz * sz / 2, 1e-3)
    tz = zz / half_z  # -1 (feet) .. 1 (head)

    vol = np.full(shape, AIR_HU, dtype=np.float32)
    # Body: ellipse that narrows a little towards the head; a fat layer under the skin.
    bx, by = 0.85 * half_x * (1 - 0.08 * tz), 0.62 * half_y * (1 - 0.05 * tz)
    body_r = (xx / bx) ** 2 + (yy / by) ** 2
    vol[body_r < 1.0] = -100.0
    vol[body_r < 0.80] = 40.0

    # Lungs: two ellipsoids, smaller at the apex (head end).
    lung_scale = np.clip(1.0 - 0.35 * np.clip(tz, 0, None) ** 2, 0.2, None)
    lungs = np.zeros(shape, dtype=bool)
    for side in (-1, 1):
        cx = side * 0.38 * bx
        r = ((xx - cx) / (0.28 * bx * lung_scale)) ** 2 + ((yy + 0.05 * by) / (0.62 * by * lung_scale)) ** 2
        lungs |= r < 1.0
    vol[lungs] = -860.0

    # Vessels: tubes where two smooth random fields are both near zero (intersections of level sets).
    sigma_mm = 6.0
    sig = (sigma_mm / sz, sigma_mm / sy, sigma_mm / sx)
    f1 = ndimage.gaussian_filter(rng.standard_normal(shape).astype(np.float32), sig)
    f2 = ndimage.gaussian_filter(rng.standard_normal(shape).astype(np.float32), sig)
    f1 /= f1.std() + 1e-8
    f2 /= f2.std() + 1e-8
    vessels = (np.abs(f1) < 0.12) & (np.abs(f2) < 0.35) & lungs
    vol[vessels] = 30.0 + 20.0 * rng.standard_normal(np.count_nonzero(vessels)).astype(np.float32) * 0.2

    # Nodules: a few spheres inside the lungs.
    lung_idx = np.argwhere(lungs)
    for _ in range(3 if len(lung_idx) else 0):
        c = lung_idx[rng.integers(len(lung_idx))]
        rad = rng.uniform(3.0, 7.0)
        d2 = ((zz - z[c[0]]) ** 2 + (yy - y[c[1]]) ** 2 + (xx - x[c[2]]) ** 2)
        vol[d2 < rad**2] = 20.0

    # Heart between the lungs (lower half) and the descending aorta.
    heart = ((xx + 0.08 * bx) / (0.25 * bx)) ** 2 + ((yy + 0.15 * by) / (0.35 * by)) ** 2 + ((tz + 0.3) / 0.7) ** 2
    vol[heart < 1.0] = 45.0
    aorta = ((xx + 0.1 * bx) / (0.07 * bx)) ** 2 + ((yy - 0.45 * by) / (0.1 * by)) ** 2
    vol[(aorta < 1.0) & (body_r < 0.8)] = 50.0

    # Spine: vertebral bodies (cortical rim, spongy core) with discs every ~30 mm.
    spine = (xx / (0.1 * bx)) ** 2 + ((yy - 0.72 * by) / (0.14 * by)) ** 2
    disc = np.cos(2 * np.pi * (zz - 9.0) / 30.0) > 0.9
    vol[(spine < 1.0)] = 700.0
    vol[(spine < 0.6)] = 250.0
    vol[(spine < 1.0) & disc] = 80.0

    # Ribs: an elliptical shell inside the body, present in oblique bands along z.
    angle = np.arctan2(yy, xx)
    shell = (body_r > 0.70) & (body_r < 0.76)
    bands = np.sin(2 * np.pi * (zz + 12.0 * np.sin(angle)) / 22.0) > 0.55
    vol[shell & bands & (yy > -0.5 * by)] = 600.0

    # Noise, a little correlated in-plane as reconstructed CT noise is.
    noise = rng.standard_normal(shape).astype(np.float32)
    noise = ndimage.gaussian_filter(noise, (0.0, 0.7, 0.7))
    noise *= noise_hu / (noise.std() + 1e-8)
    vol = vol + noise * (vol > -990)
    vol = np.clip(vol, -1024.0, 3071.0).astype(np.float32)

    origin = (-(nx - 1) / 2 * sx, -(ny - 1) / 2 * sy, -(nz - 1) / 2 * sz)
    return Volume(array=vol, spacing=(sx, sy, sz), origin=origin, direction=np.eye(3), slice_thickness=sz,
                  metadata={"description": "thinslice synthetic chest phantom", "seed": str(seed)})
