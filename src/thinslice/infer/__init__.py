"""Upsampling a thick volume to thin slices: interpolation, CNN, latent diffusion."""

from thinslice.degrade.grid import target_grid_volume, thin_grid, thin_positions
from thinslice.degrade.interpolate import interpolate_slices
from thinslice.infer.upsample import UPSAMPLERS, available_methods, get_method, register_method, upsample

__all__ = [
    "UPSAMPLERS",
    "available_methods",
    "get_method",
    "interpolate_slices",
    "register_method",
    "target_grid_volume",
    "thin_grid",
    "thin_positions",
    "upsample",
]
