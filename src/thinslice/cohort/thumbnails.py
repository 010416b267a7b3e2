"""QC thumbnails: thick input above thin output, axial / coronal / sagittal through the same point, at true aspect.

Small greyscale PNGs (a few kB each), made by the worker while both volumes are in memory, so that the QC page of a
1,000-scan cohort stays a single file of a few MB and is built without reading any volume again.
"""

from __future__ import annotations

import io

import numpy as np
from scipy import ndimage

from thinslice.io.volume import Volume

VIEW_PX = 112  # width of each view, pixels
WINDOW_HU = (-1000.0, 400.0)  # lung to soft tissue
STD_WINDOW_HU = (0.0, 60.0)  # std maps: black = certain, white = 90% interval wider than about 200 HU
GAP_PX = 3


def thumbnail_png(thick: Volume, thin: Volume) -> bytes:
    """PNG bytes: row 1 the thick input, row 2 the thin output; columns axial, coronal, sagittal."""
    centre = float(np.mean(thin.slice_positions_mm()))
    rows = [_row(thick, centre), _row(thin, centre)]
    width = max(r.shape[1] for r in rows)
    rows = [np.pad(r, ((0, 0), (0, width - r.shape[1]))) for r in rows]
    gap = np.zeros((GAP_PX, width), dtype=np.uint8)
    strip = np.concatenate([rows[0], gap, rows[1]], axis=0)
    return _png(strip)


def std_thumbnail_png(std: Volume) -> bytes:
    """PNG bytes of the uncertainty map, axial / coronal / sagittal through the same point as the output's strip
    (window 0-60 HU std: where the network guessed is bright)."""
    return _png(_row(std, float(np.mean(std.slice_positions_mm())), STD_WINDOW_HU))


def _png(pixels: np.ndarray) -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(pixels, mode="L").save(buffer, format="PNG", optimize=True)
    return buffer.getvalue()


def _row(volume: Volume, centre_mm: float, window: tuple[float, float] = WINDOW_HU) -> np.ndarray:
    """The three views of ``volume`` side by side, all at the axial view's millimetres per pixel."""
    from thinslice.evaluate.figures import orthogonal_views

    views = orthogonal_views(volume, centre_mm)
    axial_extent = views["axial"][1]
    mm_per_px = abs(axial_extent[1] - axial_extent[0]) / VIEW_PX
    head_up = volume.direction[2, volume.slice_axis] > 0  # LPS: +z is towards the head
    images = []
    for name, (image, extent) in views.items():
        if name != "axial" and head_up:
            image = image[::-1]
        images.append(_to_pixels(image, extent, mm_per_px, window))
    height = max(i.shape[0] for i in images)
    padded = [np.pad(i, (((height - i.shape[0]) // 2, (height - i.shape[0] + 1) // 2), (0, GAP_PX))) for i in images]
    return np.concatenate(padded, axis=1)


def _to_pixels(image: np.ndarray, extent: list[float], mm_per_px: float,
               window: tuple[float, float] = WINDOW_HU) -> np.ndarray:
    """``image`` windowed to 8 bits and resampled (nearest: thick slices stay visibly thick) to square pixels."""
    width_mm, height_mm = abs(extent[1] - extent[0]), abs(extent[3] - extent[2])
    shape = (max(1, round(height_mm / mm_per_px)), max(1, round(width_mm / mm_per_px)))
    zoomed = ndimage.zoom(np.asarray(image, dtype=np.float32), (shape[0] / image.shape[0], shape[1] / image.shape[1]),
                          order=0, grid_mode=True, mode="nearest")
    low, high = window
    return (np.clip((zoomed - low) / (high - low), 0, 1) * 255).astype(np.uint8)
