"""Thick-slice simulation by slice profiles (box, Gaussian, triangle, trapezoid, tailed, decimation)."""

from thinslice.degrade.pairs import (
    degrade_slices,
    degrade_slices_torch,
    random_degradation,
    simulate_pair,
    thick_weights,
)
from thinslice.degrade.profiles import (
    PROFILE_FAMILY,
    PROFILES,
    ThickSliceSpec,
    apply_profile,
    apply_profile_torch,
    degrade,
    describe,
    make_spec,
    profile_matrix,
    thick_grid,
)

__all__ = [
    "PROFILE_FAMILY",
    "PROFILES",
    "ThickSliceSpec",
    "apply_profile",
    "apply_profile_torch",
    "degrade",
    "degrade_slices",
    "degrade_slices_torch",
    "describe",
    "make_spec",
    "profile_matrix",
    "random_degradation",
    "simulate_pair",
    "thick_grid",
    "thick_weights",
]
