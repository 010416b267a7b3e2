"""The one windowing module: blended windows and halo tiles cover the volume, blending keeps a constant, the memory
budget picks the window."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from thinslice.models.factory import build_denoiser
from thinslice.models.windows import (
    DEFAULT_OVERLAP,
    blend_windows,
    estimate_sampling_bytes,
    fit_window,
    halo_tiles,
    latent_window,
    num_windows,
)
from thinslice.presets import load_preset

CPU = torch.device("cpu")


def test_blended_windows_cover_the_volume_in_the_counted_number() -> None:
    x = torch.zeros(1, 1, 13, 20, 9)
    roi = fit_window((8, 8, 16), tuple(x.shape[2:]))
    assert roi == (8, 8, 9)
    seen = torch.zeros_like(x)
    starts = []

    def predictor(window: torch.Tensor, coords: list) -> torch.Tensor:
        seen[tuple(coords[0])] += 1
        starts.append(tuple(int(s.start or 0) for s in coords[0][2:]))
        return window

    blend_windows(x, roi, predictor, CPU, with_coord=True)
    assert bool((seen > 0).all())  # every voxel lies in some window
    assert len(starts) == math.prod(num_windows(n, w) for n, w in zip(x.shape[2:], roi, strict=True))
    assert num_windows(13, 8) == 2 and num_windows(20, 8, DEFAULT_OVERLAP) == 3 and num_windows(9, 9) == 1


def test_blending_a_constant_gives_the_constant() -> None:
    x = torch.full((1, 2, 11, 17, 23), 3.25)
    out = blend_windows(x, (4, 8, 8), lambda w: w * 1.0, CPU)
    torch.testing.assert_close(out, x, atol=1e-5, rtol=0)


@pytest.mark.parametrize(("shape", "tile", "halo"), [((20, 33), 7, 3), ((5, 5), 16, 2), ((9,), 3, 0)])
def test_halo_tiles_cover_each_voxel_once_and_read_around_it(shape: tuple[int, ...], tile: int, halo: int) -> None:
    volume = np.arange(math.prod(shape), dtype=np.float32).reshape(shape)
    out = np.zeros_like(volume)
    count = np.zeros(shape, int)
    for t in halo_tiles(shape, tile, halo):
        out[t.write] = volume[t.read][t.core]  # the core of what was read is the tile itself
        count[t.write] += 1
        for r, w, n in zip(t.read, t.write, shape, strict=True):
            assert (r.start, r.stop) == (max(0, w.start - halo), min(w.stop + halo, n))
    assert np.array_equal(out, volume) and bool((count == 1).all())


def test_the_memory_budget_picks_a_smaller_window_when_smaller() -> None:
    preset = load_preset("tiny")
    denoiser = build_denoiser(preset)
    latent, stride, patch = (48, 64, 64), (1, 2, 2), preset.train_diffusion.patch_size
    need = estimate_sampling_bytes(denoiser, latent)
    assert latent_window(denoiser, stride, latent, None, need, train_patch=patch) is None
    sizes = []
    for fraction in (2, 4, 8):
        window = latent_window(denoiser, stride, latent, None, need // fraction, train_patch=patch)
        assert window is not None and estimate_sampling_bytes(denoiser, window) <= need // fraction
        sizes.append(math.prod(window))
    assert sizes[0] > sizes[1] > sizes[2]
    # Classifier-free guidance holds two predictions: the same budget buys a smaller window.
    guided = latent_window(denoiser, stride, latent, None, need // 2, 3.0, train_patch=patch)
    assert guided is not None and math.prod(guided) < sizes[0]
