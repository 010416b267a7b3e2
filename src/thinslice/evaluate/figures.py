"""Side-by-side orthogonal views of several volumes at true physical aspect (thick inputs look thick)."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import numpy as np

from thinslice.io.atomic import atomic_output
from thinslice.io.volume import Volume


def _inplane_spacings(vol: Volume) -> tuple[float, float]:
    """Spacings of numpy axes 1 and 2 of ``vol.slices_first()``."""
    others = [ax for ax in (2, 1, 0) if ax != vol.slice_axis]  # index axes in numpy order, slice axis removed
    return vol.spacing[others[0]], vol.spacing[others[1]]


def orthogonal_views(vol: Volume, centre_mm: float | None = None) -> dict[str, tuple[np.ndarray, list[float]]]:
    """Axial, coronal and sagittal planes through the volume centre, each with its imshow extent in mm.

    ``centre_mm`` picks the axial slice by its position along the slice direction so that volumes on different
    grids show the same anatomy.
    """
    stack = vol.slices_first()
    n, na, nb = stack.shape
    sa, sb = _inplane_spacings(vol)
    positions = vol.slice_positions_mm()
    k = n // 2 if centre_mm is None else int(np.argmin(np.abs(positions - centre_mm)))
    z0, z1 = positions[0] - vol.slice_spacing / 2, positions[-1] + vol.slice_spacing / 2
    return {
        "axial": (stack[k], [0, nb * sb, na * sa, 0]),
        "coronal": (stack[:, na // 2, :], [0, nb * sb, z0, z1]),
        "sagittal": (stack[:, :, nb // 2], [0, na * sa, z0, z1]),
    }


def save_comparison_figure(
    volumes: Mapping[str, Volume],
    path: str | Path,
    window: tuple[float, float] = (-1000.0, 400.0),
    title: str | None = None,
) -> Path:
    """PNG with one column per volume (e.g. thin truth, thick input, result) and one row per view."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(volumes)
    first = volumes[names[0]]
    centre = float(np.mean(first.slice_positions_mm()))
    # Row heights follow each view's physical aspect so that no row is mostly white space.
    heights = [abs(e[3] - e[2]) / max(abs(e[1] - e[0]), 1e-6) for _, e in orthogonal_views(first, centre).values()]
    fig, axes = plt.subplots(3, len(names), figsize=(3.2 * len(names), 3.2 * sum(heights) + 0.6), squeeze=False,
                             gridspec_kw={"height_ratios": heights})
    for col, name in enumerate(names):
        views = orthogonal_views(volumes[name], centre)
        for row, (view, (image, extent)) in enumerate(views.items()):
            ax = axes[row][col]
            origin = "upper" if view == "axial" else "lower"  # superior at the top in coronal/sagittal views
            ax.imshow(image, cmap="gray", vmin=window[0], vmax=window[1], extent=extent, origin=origin,
                      interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if row == 0:
                ax.set_title(name, fontsize=10)
            if col == 0:
                ax.set_ylabel(view)
    if title:
        fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    path = Path(path)
    try:
        with atomic_output(path, suffix=".png") as tmp:
            fig.savefig(tmp, dpi=90)
    finally:
        plt.close(fig)
    return path
