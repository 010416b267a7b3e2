"""The interpolation baselines (``--method linear`` / ``cubic``) on volumes: :func:`interpolate_slices` of
:mod:`thinslice.degrade.interpolate` (shared with the making of training examples) onto the thin output grid."""

from __future__ import annotations

from thinslice.degrade.grid import thin_grid, thin_positions
from thinslice.degrade.interpolate import interpolate_slices
from thinslice.io.volume import Volume


def interpolate_volume(thick: Volume, spacing_mm: float, method: str = "cubic") -> Volume:
    """``thick`` interpolated along its slice axis onto :func:`thinslice.degrade.grid.thin_grid` at ``spacing_mm``."""
    _, first_offset = thin_grid(thick, spacing_mm)
    values = interpolate_slices(thick.slices_first(), thick.slice_positions_mm(), thin_positions(thick, spacing_mm),
                                method=method)
    return thick.with_slices(values, spacing_mm, first_offset, slice_thickness=spacing_mm)
