"""Validation that scores what users get: every trainer runs the method's shipped pipeline
(:mod:`thinslice.infer.pipeline`) on fixed held-out cases and picks "best" on that number.

A case is the central crop of a validation volume (``depth`` slices or all, ``size`` x ``size`` pixels in-plane),
degraded to x4 Gaussian thick slices with :func:`thinslice.degrade.pairs.simulate_pair`, with cubic-dc's PSNR on it as
the reference the gain is measured against.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from thinslice.degrade.pairs import simulate_pair
from thinslice.errors import ThinsliceError
from thinslice.evaluate.metrics import psnr
from thinslice.infer.pipeline import Acquisition, Pipeline
from thinslice.infer.upsample import upsample
from thinslice.io.volume import Volume

VAL_FACTOR = 4
VAL_PROFILE = "gaussian"


@dataclass(frozen=True)
class ValCase:
    name: str
    thick: Volume
    truth: Volume
    cubic_dc_psnr: float


def central_crop(volume: Volume, size: int, depth: int | None = None) -> Volume:
    """The central ``depth`` slices (all when None) and ``size`` x ``size`` pixels in-plane, slices stacked on
    axis 2 (validation stays a few seconds)."""
    arr = volume.slices_first()
    d0 = 0 if depth is None else max(0, (arr.shape[0] - depth) // 2)
    d1 = arr.shape[0] if depth is None else d0 + depth
    a0 = max(0, (arr.shape[1] - size) // 2)
    b0 = max(0, (arr.shape[2] - size) // 2)
    crop = np.ascontiguousarray(arr[d0:d1, a0:a0 + size, b0:b0 + size])
    inplane = [s for i, s in enumerate(volume.spacing) if i != volume.slice_axis]
    return Volume(crop, (inplane[0], inplane[1], volume.slice_spacing), stack_axis=2)


def validation_cases(volumes: Sequence[Volume | str | Path], size: int, depth: int | None = None,
                     max_volumes: int = 4, factor: int = VAL_FACTOR) -> list[ValCase]:
    """Fixed held-out cases: x``factor`` (4 unless the network serves no x4) Gaussian thick slices of each volume's
    central crop, at least 3 thick slices deep (volumes with fewer slices are skipped; none left is a one-line
    error)."""
    from thinslice.io import read_volume

    depth = None if depth is None else max(int(depth), 3 * factor)
    cases = []
    for i, item in enumerate(list(volumes)[:max_volumes]):
        vol = item if isinstance(item, Volume) else read_volume(item)
        thin = central_crop(vol, size, depth)
        if thin.num_slices < 3 * factor:
            continue
        thick, truth = simulate_pair(thin, factor=factor, profile=VAL_PROFILE)
        base = upsample(thick, thin.slice_spacing, "cubic-dc", profile=VAL_PROFILE)
        name = Path(item).name if not isinstance(item, Volume) else f"volume{i}"
        cases.append(ValCase(name, thick, truth, psnr(base.slices_first(), truth.slices_first())))
    if not cases:
        raise ThinsliceError(f"no validation volume has {3 * factor} or more slices; pass longer --val volumes")
    return cases


IMG_WINDOW = (-1000.0, 1000.0)  # HU window of the TensorBoard images


def window_image(img: np.ndarray) -> np.ndarray:
    lo, hi = IMG_WINDOW
    return np.clip((img - lo) / (hi - lo), 0.0, 1.0)


def through_plane_image(*volumes_hu: np.ndarray) -> np.ndarray:
    """Coronal-like cuts (slice axis vertical, through the middle row) side by side: where through-plane detail
    shows."""
    return np.concatenate([window_image(v[:, v.shape[1] // 2, :]) for v in volumes_hu], axis=1)


def make_pipeline_validate(cases: list[ValCase], pipeline_for: Callable[[dict[str, Any]], Pipeline],
                           image_tag: str | None = None) -> Callable[[dict[str, Any], int], dict[str, Any]]:
    """``validate(models, step)`` for the engine: ``pipeline_for(models)`` (the shipped pipeline around the networks
    being trained) on every case; logs val/psnr, val/psnr_cubic_dc, val/psnr_gain (the number "best" is picked by),
    val/minutes and, with ``image_tag``, a truth | cubic-dc | output image."""
    start = time.time()

    def validate(models: dict[str, Any], step: int) -> dict[str, Any]:
        pipeline, scores, image = pipeline_for(models), [], None
        for case in cases:
            out = pipeline(case.thick, case.truth.slice_spacing, Acquisition.of(case.thick, VAL_PROFILE)).volume
            scores.append(psnr(out.slices_first(), case.truth.slices_first()))
            if image_tag and image is None:
                base = upsample(case.thick, case.truth.slice_spacing, "cubic-dc", profile=VAL_PROFILE)
                image = through_plane_image(case.truth.slices_first(), base.slices_first(), out.slices_first())
        base_psnr = float(np.mean([c.cubic_dc_psnr for c in cases]))
        results: dict[str, Any] = {"val/psnr": float(np.mean(scores)), "val/psnr_cubic_dc": base_psnr,
                                   "val/psnr_gain": float(np.mean(scores)) - base_psnr,
                                   "val/minutes": (time.time() - start) / 60}
        if image_tag and image is not None:
            results[image_tag] = image
        return results

    return validate
