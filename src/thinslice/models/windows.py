"""Windows over volumes too large for one network pass, written once for every method.

- blended windows: MONAI's ``sliding_window_inference`` with Gaussian blending and :data:`DEFAULT_OVERLAP`, run on
  the network's device and gathered on the CPU (:func:`blend_windows`; the CNN, latent sampling and VAE tiling), or
  one pass when the volume fits (:func:`whole_or_windows`);
- exact tiles with a halo that covers a network's receptive field, so tiles join without blending
  (:func:`halo_tiles`; the planes 3D network);
- the memory budget and the window search of latent sampling (:func:`latent_window`): the whole latent when it
  fits, else the window with the least total work.

It lives in ``models`` (not ``infer``) because the VAE tiling (:mod:`thinslice.models.tiling`) uses it too.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, cast

import torch
from monai.inferers import sliding_window_inference

from thinslice.memory import available_memory

if TYPE_CHECKING:
    from thinslice.models.denoiser import LatentDenoiser

DEFAULT_OVERLAP = 0.25
# Peak sampling memory per latent voxel and UNet base channel (bytes), measured on CPU for the tiny and small
# presets with the control net (float32, no gradients), with a safety margin; used to pick whole vs windowed sampling.
BYTES_PER_VOXEL_CHANNEL = 120.0
# The diffusion training patch (image voxels) of a denoiser whose preset does not say: the smallest latent window.
DEFAULT_TRAIN_PATCH = (48, 128, 128)


# ------------------------------------------------------------------------------------------------ blending
def fit_window(window: tuple[int, ...], shape: tuple[int, ...]) -> tuple[int, ...]:
    """Windows no larger than the volume: MONAI would otherwise pad it (with zeros, i.e. ~1000 HU in model range)."""
    return tuple(min(int(w), int(n)) for w, n in zip(window, shape, strict=True))


def blend_windows(x: torch.Tensor, roi: tuple[int, ...], predictor: Callable[..., torch.Tensor],
                  device: torch.device, progress: bool = False,
                  overlap: float | tuple[float, ...] = DEFAULT_OVERLAP, **kwargs: Any) -> torch.Tensor:
    """``predictor`` over overlapping windows of ``x`` (1, C, ...), Gaussian-blended; windows run on ``device``,
    the result is gathered on the CPU so that only one window at a time occupies the accelerator. ``kwargs`` go to
    MONAI (``with_coord``, ``process_fn``)."""
    out = sliding_window_inference(
        x, roi_size=roi, sw_batch_size=1, predictor=predictor, overlap=overlap, mode="gaussian",
        sw_device=device, device=torch.device("cpu"), progress=progress, **kwargs,
    )
    return cast(torch.Tensor, out)  # MONAI returns what the predictor returns: one tensor here


def whole_or_windows(fn: Callable[[torch.Tensor, tuple[int, ...] | None], torch.Tensor], x: torch.Tensor,
                     window: tuple[int, ...] | None, device: torch.device, progress: bool = False) -> torch.Tensor:
    """``fn`` over the whole of ``x`` (1, C, ...) on ``device`` when there is no window or it covers ``x`` (``fn``
    told None), else over blended windows, each told its start (e.g. to seed itself by position, so results do not
    depend on the order MONAI runs them in); the result on the CPU."""
    if window is None or all(w >= s for w, s in zip(window, x.shape[2:], strict=True)):
        return fn(x.to(device), None).cpu()

    def predictor(part: torch.Tensor, coords: list) -> torch.Tensor:
        return fn(part, tuple(int(s.start or 0) for s in coords[0][2:]))

    return blend_windows(x, window, predictor, device, progress, with_coord=True)


def num_windows(size: int, window: int, overlap: float = DEFAULT_OVERLAP) -> int:
    """How many windows :func:`blend_windows` places along an axis (MONAI's scan-interval rule)."""
    if window >= size:
        return 1
    interval = max(int(window * (1 - overlap)), 1)
    return math.ceil((size - window) / interval) + 1


def aligned_overlaps(tile: tuple[int, ...], stride: tuple[int, ...], overlap: float) -> tuple[float, ...]:
    """Per-axis overlap fractions whose scan interval ``int(tile * (1 - o))`` (MONAI's rule) is a stride multiple."""
    result = []
    for t, s in zip(tile, stride, strict=True):
        interval = max(s, (int(t * (1.0 - overlap)) // s) * s)
        # +0.5 keeps int() from rounding down through float error.
        result.append(min(max(1.0 - (interval + 0.5) / t, 0.0), 0.999))
    return tuple(result)


# ------------------------------------------------------------------------------------------------ halo tiles
@dataclass(frozen=True)
class HaloTile:
    """One tile: ``read`` (the tile and its halo, clipped to the volume), ``core`` (the tile within what was read)
    and ``write`` (the tile in the volume)."""

    read: tuple[slice, ...]
    core: tuple[slice, ...]
    write: tuple[slice, ...]


def halo_tiles(shape: tuple[int, ...], tile: int, halo: int) -> list[HaloTile]:
    """Non-overlapping tiles of ``tile`` voxels per axis covering ``shape`` (first axis outermost), each read with
    ``halo`` voxels around it: with a halo at least the receptive field, the tiles' cores join exactly."""
    tiles = []
    for start in itertools.product(*(range(0, n, tile) for n in shape)):
        stop = [min(s + tile, n) for s, n in zip(start, shape, strict=True)]
        low = [max(0, s - halo) for s in start]
        tiles.append(HaloTile(
            read=tuple(slice(lo, min(e + halo, n)) for lo, e, n in zip(low, stop, shape, strict=True)),
            core=tuple(slice(s - lo, s - lo + e - s) for s, lo, e in zip(start, low, stop, strict=True)),
            write=tuple(slice(s, e) for s, e in zip(start, stop, strict=True)),
        ))
    return tiles


# ------------------------------------------------------------------------------------------------ memory budget
def available_memory_bytes(device: torch.device) -> int:
    """Memory the sampler may use: 70% of free GPU memory, or half the available RAM on CPU."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free * 0.7)
    try:
        return int(available_memory() * 0.5)
    except ImportError:  # psutil comes with accelerate; keep a conservative fallback anyway
        return 8 * 1024**3


def estimate_sampling_bytes(denoiser: LatentDenoiser, latent_shape: tuple[int, int, int],
                            guidance_scale: float = 1.0) -> int:
    """Rough peak memory of one denoiser pass over a latent of ``latent_shape`` (d, h, w)."""
    per_voxel = BYTES_PER_VOXEL_CHANNEL * denoiser.unet.cfg.base_channels
    if denoiser.control is None:
        per_voxel *= 0.7
    if guidance_scale != 1.0:
        per_voxel *= 1.5  # conditional and unconditional predictions held at once
    return int(math.prod(latent_shape) * per_voxel)


def _round_down(value: int, multiple: int) -> int:
    return max(multiple, (int(value) // multiple) * multiple)


def latent_window(denoiser: LatentDenoiser, vae_stride: tuple[int, int, int], latent_shape: tuple[int, int, int],
                  patch_size: tuple[int, int, int] | None, budget_bytes: int, guidance_scale: float = 1.0,
                  train_patch: tuple[int, int, int] = DEFAULT_TRAIN_PATCH) -> tuple[int, int, int] | None:
    """Latent window for windowed sampling (None: sample the whole latent).

    ``patch_size`` (image voxels) forces windows. Otherwise the whole latent is used when its estimated memory fits
    ``budget_bytes``; else the window (at least the diffusion ``train_patch``, image voxels) that fits the budget with
    the least total work, i.e. number of windows x window size, which favours few large windows and little overlap.
    """
    mult = denoiser.size_multiple
    if patch_size is not None:
        win = [_round_down(p // s, m) for p, s, m in zip(patch_size, vae_stride, mult, strict=True)]
        d, h, w = (min(w, n) for w, n in zip(win, latent_shape, strict=True))
        return d, h, w
    if estimate_sampling_bytes(denoiser, latent_shape, guidance_scale) <= budget_bytes:
        return None
    smallest = [min(n, _round_down(p // s, m))
                for p, s, m, n in zip(train_patch, vae_stride, mult, latent_shape, strict=True)]
    candidates = [sorted({*range(lo, n + 1, m), n}) for lo, m, n in zip(smallest, mult, latent_shape, strict=True)]
    best = (smallest[0], smallest[1], smallest[2])
    best_cost = math.inf
    for wd in candidates[0]:
        for wh in candidates[1]:
            for ww in candidates[2]:
                if estimate_sampling_bytes(denoiser, (wd, wh, ww), guidance_scale) > budget_bytes:
                    break  # larger ww only needs more memory
                cost = (num_windows(latent_shape[0], wd) * num_windows(latent_shape[1], wh)
                        * num_windows(latent_shape[2], ww) * wd * wh * ww)
                if cost < best_cost:
                    best, best_cost = (wd, wh, ww), cost
    return best
