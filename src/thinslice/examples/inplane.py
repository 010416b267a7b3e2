"""Self-supervised training pairs from one thick volume (SMORE idea, Zhao et al. 2021): the examples the CNN
baseline fits to under ``upsample --method cnn --adapt`` (:mod:`thinslice.infer.cnn_adapt`).

A thick-slice volume has no thin truth, but its in-plane axes *are* high resolution. Treating one in-plane axis as
if it were the slice axis gives training pairs from the volume itself: degrade that axis the way the scanner degraded
the slice axis (slab ``thick slice spacing`` wide, the given profile) and cubic-interpolate back
(:class:`~thinslice.examples.pairs.PairSampler`).

To mimic inference exactly, the borrowed in-plane axis is first resampled (cubic) to the output spacing
``spacing_mm`` when the pixel spacing differs from it by more than 2%, so the pairs have the same slice spacing and
the same factor ``thick spacing / spacing_mm`` as the through-plane problem the network then solves. (With
``spacing_mm`` equal to the pixel spacing, this is SMORE's factor thick spacing / in-plane spacing.) The thick axis
becomes the patch's second axis, so the network also sees the real thick-slice texture across it.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

from thinslice.errors import ThinsliceError
from thinslice.examples.pairs import PairSampler, pair_margin
from thinslice.io.volume import Volume
from thinslice.presets import DegradationConfig

DEFAULT_PATCH = (32, 64, 64)
DEFAULT_BATCH = 4
_RESAMPLE_TOLERANCE = 0.02


def adaptation_factor(thick: Volume, spacing_mm: float) -> float:
    """The thick/thin factor the adaptation pairs simulate: thick slice spacing / output spacing."""
    s = float(spacing_mm)
    if not (np.isfinite(s) and s > 0):
        raise ThinsliceError(f"output slice spacing must be a positive number of mm, got {spacing_mm}")
    factor = thick.slice_spacing / s
    if factor < 1.0 + 1e-6:
        raise ThinsliceError(
            f"adaptation needs thick slices coarser than the output spacing ({thick.slice_spacing:.4g} mm vs "
            f"{s:.4g} mm); leave out --adapt"
        )
    return float(factor)


def inplane_views(thick: Volume, spacing_mm: float) -> list[Volume]:
    """The thick volume seen with each in-plane axis first (as if it were the slice axis), that axis resampled to
    ``spacing_mm``; the thick axis second. Returned as unit-spacing Volumes whose ``slices_first()`` is that array
    (identity direction, isotropic: the slice axis is numpy axis 0), ready for the patch sampler."""
    arr = thick.slices_first()
    slice_np_axis = thick.numpy_axis(thick.slice_axis)
    inplane_np = [ax for ax in range(3) if ax != slice_np_axis]
    views = []
    for pos, np_axis in ((1, inplane_np[0]), (2, inplane_np[1])):
        pixel = float(thick.spacing[2 - np_axis])
        other = 2 if pos == 1 else 1
        view = np.transpose(arr, (pos, 0, other)).astype(np.float32)  # (in-plane, thick, other in-plane)
        zoom = pixel / float(spacing_mm)
        if abs(zoom - 1.0) > _RESAMPLE_TOLERANCE:
            view = ndimage.zoom(view, (zoom, 1.0, 1.0), order=3, mode="nearest", grid_mode=True)
        views.append(Volume(np.ascontiguousarray(view, dtype=np.float32), (1.0, 1.0, 1.0)))
    return views


def adaptation_sampler(
    thick: Volume,
    spacing_mm: float,
    profile: str = "gaussian",
    patch_size: tuple[int, int, int] = DEFAULT_PATCH,
    batch_size: int = DEFAULT_BATCH,
    seed: int = 0,
) -> PairSampler:
    """Self-supervised pairs from ``thick`` (see the module docstring), as training batches for the CNN."""
    factor = adaptation_factor(thick, spacing_mm)
    views = inplane_views(thick, spacing_mm)
    d, h, w = (int(p) for p in patch_size)
    n_thick = thick.num_slices
    longest = max(v.array.shape[0] for v in views)
    # The borrowed axis must hold the pair depth plus the margins the pair crop drops.
    d = max(1, min(d, longest - 2 * pair_margin(factor)))
    if longest < 2 * pair_margin(factor) + 1:
        raise ThinsliceError(
            f"the volume is too small in-plane ({longest} pixels) to adapt for factor {factor:.3g}; leave out --adapt"
        )
    patch = (d, min(h, n_thick), w)
    return PairSampler(views, patch, batch_size, DegradationConfig(factors=(factor,), profiles=(profile,)), seed=seed)
