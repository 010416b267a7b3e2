"""Tiled encode/decode of whole CT volumes with the 3D VAE, so memory stays at a few GB for 512x512x300.

Built on MONAI's ``sliding_window_inference`` (Gaussian blending, through
:func:`thinslice.models.windows.blend_windows`; since MONAI 1.3 it accepts predictor outputs of a different spatial
size than the window, which is what encode (smaller) and decode (larger) produce). What is added
here, and why:

- the volume is padded at the far end of each axis with air (-1 in model range) to a multiple of the VAE's total
  stride and to at least one tile, then cropped back, so any shape works;
- tile sizes and scan intervals are rounded to multiples of the total stride, so that every window starts on a
  latent voxel boundary (otherwise tiles would be shifted by a fraction of a latent voxel and blend wrongly);
- the decode blend weights are a Gaussian computed at *output* resolution (MONAI would up-sample a latent-size map
  by nearest neighbour, giving blocky weights).
"""

from __future__ import annotations

import math
from contextlib import nullcontext
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from monai.data.utils import compute_importance_map

from thinslice.errors import ThinsliceError
from thinslice.models.intensity import hu_to_model, model_to_hu
from thinslice.models.vae import AutoencoderKL3D
from thinslice.models.windows import DEFAULT_OVERLAP, aligned_overlaps, blend_windows

AIR_MODEL = -1.0  # air (HU_MIN) in model range
DEFAULT_TILE = (32, 128, 128)


def _round_tile(tile: tuple[int, int, int], stride: tuple[int, int, int]) -> tuple[int, ...]:
    return tuple(max(s, (int(t) // s) * s) for t, s in zip(tile, stride, strict=True))


def _padded_shape(shape: tuple[int, ...], tile: tuple[int, ...], stride: tuple[int, int, int]) -> tuple[int, ...]:
    return tuple(max(t, math.ceil(n / s) * s) for n, t, s in zip(shape, tile, stride, strict=True))


def _device_of(module: torch.nn.Module) -> torch.device:
    """Where a first stage runs: its parameters', else its buffers' (a parameter-free wavelet stage), else CPU."""
    for tensor in (*module.parameters(), *module.buffers()):
        return tensor.device
    return torch.device("cpu")


def _autocast(device: torch.device, dtype: torch.dtype | None):
    if dtype is None or dtype == torch.float32:
        return nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def _as_batch(array: np.ndarray | torch.Tensor) -> torch.Tensor:
    t = torch.as_tensor(np.asarray(array, dtype=np.float32)) if isinstance(array, np.ndarray) else array.float()
    if t.ndim == 3:
        t = t[None, None]
    elif t.ndim == 4:
        t = t[None]
    if t.ndim != 5:
        raise ThinsliceError(f"expected a 3D volume (slices first), got shape {tuple(array.shape)}")
    return t


@torch.no_grad()
def encode_volume(
    vae: AutoencoderKL3D,
    hu_slices_first: np.ndarray | torch.Tensor,
    tile: tuple[int, int, int] = DEFAULT_TILE,
    overlap: float = DEFAULT_OVERLAP,
    scaled: bool = True,
    autocast_dtype: torch.dtype | None = None,
    progress: bool = False,
) -> torch.Tensor:
    """Latent (posterior mean, times the scaling factor when ``scaled``) of a whole HU volume.

    ``hu_slices_first`` is (D, H, W) in HU. Returns a float32 CPU tensor (latent_channels, d', h', w') with
    d' = ceil(D / stride_d) etc. (the padding to a stride multiple is kept in the latent; :func:`decode_volume`
    crops back when given ``out_shape``).
    """
    was_training = vae.training
    vae.eval()
    device = _device_of(vae)
    stride = vae.total_stride
    x = hu_to_model(_as_batch(hu_slices_first))
    shape = tuple(x.shape[2:])
    tile_r = _round_tile(tile, stride)
    padded = _padded_shape(shape, tile_r, stride)
    tile_r = tuple(min(t, p) for t, p in zip(tile_r, padded, strict=True))
    pad = []
    for n, p in zip(reversed(shape), reversed(padded), strict=True):
        pad += [0, p - n]
    x = F.pad(x, pad, mode="constant", value=AIR_MODEL)

    def predictor(window: torch.Tensor) -> torch.Tensor:
        with _autocast(device, autocast_dtype):
            mean = vae.encode(window)[0]
        return mean.float()

    latent = blend_windows(x, tile_r, predictor, device, progress, aligned_overlaps(tile_r, stride, overlap))
    vae.train(was_training)
    # Keep the stride padding (decode crops it with out_shape), drop the padding up to one tile.
    keep = tuple(math.ceil(n / s) for n, s in zip(shape, stride, strict=True))
    latent = latent[0, :, : keep[0], : keep[1], : keep[2]]
    return latent * vae.scaling_factor if scaled else latent


@torch.no_grad()
def decode_volume(
    vae: AutoencoderKL3D,
    latent: np.ndarray | torch.Tensor,
    out_shape: tuple[int, int, int] | None = None,
    tile: tuple[int, int, int] = DEFAULT_TILE,
    overlap: float = DEFAULT_OVERLAP,
    scaled: bool = True,
    autocast_dtype: torch.dtype | None = None,
    progress: bool = False,
) -> np.ndarray:
    """HU volume (D, H, W) float32 from a latent (C, d', h', w'); ``tile`` is in *image* voxels.

    ``out_shape`` crops the result to the original volume shape (as given to :func:`encode_volume`).
    """
    was_training = vae.training
    vae.eval()
    device = _device_of(vae)
    stride = vae.total_stride
    z = _as_batch(latent)
    if z.shape[1] != vae.config.latent_channels:
        raise ThinsliceError(
            f"latent has {z.shape[1]} channels but the VAE expects {vae.config.latent_channels}; "
            "was it encoded with another VAE?"
        )
    if scaled:
        z = z / vae.scaling_factor
    lshape = tuple(z.shape[2:])
    tile_img = _round_tile(tile, stride)
    tile_lat = tuple(max(1, t // s) for t, s in zip(tile_img, stride, strict=True))
    padded = tuple(max(t, n) for t, n in zip(tile_lat, lshape, strict=True))
    tile_lat = tuple(min(t, p) for t, p in zip(tile_lat, padded, strict=True))
    pad = []
    for n, p in zip(reversed(lshape), reversed(padded), strict=True):
        pad += [0, p - n]
    if any(pad):
        # Pad the latent with replicated border values (there is no "air latent" to pad with); cropped away below.
        z = F.pad(z, pad, mode="replicate")
    out_tile = tuple(t * s for t, s in zip(tile_lat, stride, strict=True))
    weight = compute_importance_map(out_tile, mode="gaussian", sigma_scale=0.125, device=device)
    weight = weight.to(torch.float32)[None, None]

    def predictor(window: torch.Tensor) -> torch.Tensor:
        with _autocast(device, autocast_dtype):
            out = vae.decode(window)
        return out.float()

    def blend_weights(outputs: tuple[torch.Tensor, ...], _window: torch.Tensor, _imp: torch.Tensor):
        return outputs, weight

    # One latent voxel of overlap is the least that avoids hard seams.
    overlaps = aligned_overlaps(tile_lat, (1, 1, 1), overlap)
    image = blend_windows(z, tile_lat, predictor, device, progress, overlaps, process_fn=blend_weights)[0, 0]
    if out_shape is not None:
        image = image[: out_shape[0], : out_shape[1], : out_shape[2]]
    vae.train(was_training)
    return model_to_hu(image.clamp(-1.0, 1.0)).numpy().astype(np.float32)


@dataclass(frozen=True)
class PaddedLatent:
    """The latent (1, C, d, h, w) of a HU volume of ``shape`` that was edge-padded to ``padded_shape`` and encoded
    in tiles of ``tile``: what :func:`decode_padded` decodes and crops back."""

    latent: torch.Tensor
    shape: tuple[int, ...]
    padded_shape: tuple[int, int, int]
    tile: tuple[int, int, int]


def encode_padded(vae: AutoencoderKL3D, hu_slices_first: np.ndarray, multiple: tuple[int, ...],
                  tile: tuple[int, int, int] = DEFAULT_TILE, progress: bool = False,
                  autocast_dtype: torch.dtype | None = None) -> PaddedLatent:
    """:func:`encode_volume` of the volume edge-padded at the far end of each axis to ``multiple`` (e.g. the
    stride times a denoiser's size multiple, so latent sizes fit it). Edge, not air: no artificial boundary in the
    latent. Tiles are no larger than the padded volume (tiling pads small volumes up to a whole tile otherwise)."""
    hu = np.ascontiguousarray(hu_slices_first)
    pads = [(0, (-n) % m) for n, m in zip(hu.shape, multiple, strict=True)]
    padded = np.pad(hu, pads, mode="edge") if any(p for _, p in pads) else hu
    d, h, w = (min(int(t), n) for t, n in zip(tile, padded.shape, strict=True))
    tile_p = (d, h, w)
    latent = encode_volume(vae, padded, tile=tile_p, progress=progress, autocast_dtype=autocast_dtype)
    return PaddedLatent(latent[None], hu.shape, padded.shape, tile_p)


def decode_padded(vae: AutoencoderKL3D, encoded: PaddedLatent, latent: torch.Tensor, progress: bool = False,
                  autocast_dtype: torch.dtype | None = None) -> np.ndarray:
    """HU volume of ``encoded.shape`` from a latent (C, d, h, w) the size of ``encoded.latent`` (that one or a
    sample conditioned on it), decoded in the same tiles and cropped back."""
    x = decode_volume(vae, latent, out_shape=encoded.padded_shape, tile=encoded.tile, progress=progress,
                      autocast_dtype=autocast_dtype)
    return x[: encoded.shape[0], : encoded.shape[1], : encoded.shape[2]]
