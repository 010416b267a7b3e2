"""``--method ldm``: thick slices -> thin slices with the 3D latent diffusion model (ResShift + IRControlNet).

Pipeline (timed per stage, see :class:`LDMResult`):

1. the prior the denoiser was trained to refine (its record's ``latent.prior``): the planes network's output (the
   shipped model), cubic-dc, or cubic B-spline upsampling;
2. first-stage encoding, tiled (:func:`thinslice.models.tiling.encode_volume`): the lossless Haar transform (the
   shipped model) or the trained VAE; the image is edge-padded so that latent sizes are multiples of the denoiser's
   size multiple, and cropped back after decoding;
3. sampling the HR latent with :func:`thinslice.infer.sampler.sample_latent`: the whole latent at once when it
   fits in memory, else overlapping latent windows (MONAI ``sliding_window_inference``, Gaussian blending), each
   sampled with its own generator seeded from (seed, window position) so results are reproducible. With residual
   latents (``latent.residual_scale`` > 0) the model samples the scaled residual from the prior from zero,
   conditioned on the prior's latent (:class:`~thinslice.presets.LatentConfig` says why);
4. decoding, tiled. With a VAE, ``decode="residual"`` (default) returns ``prior + D(x0) - D(y)`` instead of
   ``D(x0)``: the VAE's reconstruction error, common to both decodes, cancels, so the model adds through-plane
   detail to the prior instead of replacing it by a VAE reconstruction (a small CPU-trained VAE reconstructs CT at
   ~25 dB); with the exact Haar stage it restores only what the model's HU range clips (below -1024 HU). A model
   that learnt nothing (x0 = y) then gives the prior;
5. data consistency: projection onto ``{x : A x = thick}`` for the input's slice profile (:mod:`.consistency`).

``samples > 1`` averages several seeds; their per-voxel standard deviation, with the planes prior's pass
disagreement, is turned into a calibrated std map (:mod:`thinslice.infer.uncertainty`, docs/uncertainty.md) that
comes back as ``Result.extras["std"]`` for the caller to write (``thinslice upsample`` writes it beside the output).
"""

from __future__ import annotations

import logging
import math
import time
import warnings
from dataclasses import dataclass, field

import numpy as np
import torch
from monai.inferers import sliding_window_inference
from tqdm.auto import tqdm

from thinslice.checkpoints.bundle import has_weights, load_denoiser, load_vae
from thinslice.checkpoints.files import loaded_preset, record_of, weights_label
from thinslice.degrade.grid import thin_grid
from thinslice.degrade.operators import SlabOperator, thick_profile_operator
from thinslice.device import autocast, autocast_dtype, resolve_device
from thinslice.errors import ThinsliceError
from thinslice.infer.consistency import (
    consistency_residual_hu,
    enforce_consistency,
)
from thinslice.infer.interpolate import interpolate_volume
from thinslice.infer.pipeline import Acquisition, LearnedOptions, Pipeline, Result
from thinslice.infer.sampler import sample_latent
from thinslice.infer.upsample import CubicDC, register_pipeline
from thinslice.io.volume import Volume
from thinslice.models.denoiser import LatentDenoiser
from thinslice.models.factory import build_first_stage
from thinslice.models.tiling import DEFAULT_TILE, decode_volume, encode_volume
from thinslice.models.vae import AutoencoderKL3D
from thinslice.presets import LatentConfig

log = logging.getLogger(__name__)

DEFAULT_OVERLAP = 0.25
# Peak sampling memory per latent voxel and UNet base channel (bytes), measured on CPU for the tiny and small
# presets with the control net (float32, no gradients), with a safety margin; used to pick whole vs windowed sampling.
BYTES_PER_VOXEL_CHANNEL = 120.0

DECODE_MODES = ("residual", "direct")


@dataclass
class LDMResult:
    """Output volume (mean of the samples), std map (``samples > 1``) and run information (timings, residuals)."""

    volume: Volume
    std: Volume | None = None
    info: dict[str, object] = field(default_factory=dict)


# ------------------------------------------------------------------------------------------------ helpers
def available_memory_bytes(device: torch.device) -> int:
    """Memory the sampler may use: 70% of free GPU memory, or half the available RAM on CPU."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free * 0.7)
    try:
        import psutil

        return int(psutil.virtual_memory().available * 0.5)
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


def _window_seed(seed: int, start: tuple[int, ...]) -> int:
    """A seed for one latent window, fixed by the run's seed and the window's position (order-independent)."""
    return int(np.random.SeedSequence([int(seed) & 0xFFFFFFFF, *(int(s) for s in start)]).generate_state(1)[0])


def _generator(seed: int) -> torch.Generator:
    # CPU generator: the sampler draws noise on it and moves it, so a seed gives the same result on every device.
    return torch.Generator(device="cpu").manual_seed(int(seed))


def _round_down(value: int, multiple: int) -> int:
    return max(multiple, (int(value) // multiple) * multiple)


def _pad_to(array: np.ndarray, multiple: tuple[int, int, int]) -> np.ndarray:
    """Edge-pad the far end of each axis to a multiple (edge, not air: no artificial boundary in the latent)."""
    pads = [(0, (-n) % m) for n, m in zip(array.shape, multiple, strict=True)]
    return np.pad(array, pads, mode="edge") if any(p for _, p in pads) else array


def _check_pair(vae: AutoencoderKL3D, denoiser: LatentDenoiser) -> None:
    if vae.config.latent_channels != denoiser.unet.cfg.latent_channels:
        raise ThinsliceError(
            f"the VAE makes {vae.config.latent_channels}-channel latents but the denoiser expects "
            f"{denoiser.unet.cfg.latent_channels}: use the VAE the denoiser was trained with (same bundle)"
        )
    want = getattr(record_of(denoiser), "metadata", {}).get("vae_hash", "")
    have = getattr(record_of(vae), "content_hash", "")
    if want and have and want != have:
        raise ThinsliceError(
            f"the denoiser was trained on latents of VAE {want} but the bundle's VAE is {have}: put the matching "
            "vae.safetensors next to the denoiser (or retrain the denoiser on this VAE)"
        )


def _warn_factor(factor: float, denoiser: LatentDenoiser) -> None:
    preset = loaded_preset(denoiser)
    factors = tuple(getattr(getattr(preset, "degradation", None), "factors", ()) or ())
    if factors and not (min(factors) * 0.9 <= factor <= max(factors) * 1.1):
        warnings.warn(
            f"upsampling factor {factor:.3g} is outside the factors the model was trained on "
            f"({min(factors):g}-{max(factors):g}); results may be poor", stacklevel=3)


@dataclass(frozen=True)
class _Plan:
    """How the latent is sampled: window (None: whole), guidance scale, thick/thin factor, residual-latent scale
    (0: the model samples the HR latent itself)."""

    window: tuple[int, int, int] | None
    scale: float
    factor: float
    residual_scale: float = 0.0


def _sample_latent(denoiser: LatentDenoiser, y: torch.Tensor, plan: _Plan, kwargs: dict, seed: int,
                   progress: bool) -> torch.Tensor:
    """One HR latent for the prior's latent ``y``. With residual latents the model samples s (x0 - y) from zero,
    conditioned on y (see :class:`~thinslice.presets.LatentConfig`), and x0 = y + sample / s."""
    generator = _generator(seed)
    if denoiser.channels_last:
        y = y.contiguous(memory_format=torch.channels_last_3d)
    if plan.residual_scale <= 0:
        return sample_latent(denoiser, y, plan.factor, generator=generator, progress=progress, **kwargs).float()
    residual = sample_latent(denoiser, torch.zeros_like(y), plan.factor, generator=generator, progress=progress,
                             condition=y, **kwargs)
    return y.float() + residual.float() / plan.residual_scale


# ------------------------------------------------------------------------------------------------ sampling
def sample_hr_latent(denoiser: LatentDenoiser, y_latent: torch.Tensor, plan: _Plan, o: LdmOptions,
                     seed: int = 0) -> torch.Tensor:
    """HR latent (1, C, d, h, w) on CPU for ``y_latent`` (1, C, d, h, w): whole, or in the plan's latent windows
    (each seeded from ``seed`` and its position)."""
    device, window, progress = next(denoiser.parameters()).device, plan.window, o.progress
    kwargs = {"method": o.sampler, "steps": o.steps, "guidance_scale": plan.scale}
    if window is None or all(w >= s for w, s in zip(window, y_latent.shape[2:], strict=True)):
        return _sample_latent(denoiser, y_latent.to(device), plan, kwargs, seed, progress).cpu()

    def predictor(window_latent: torch.Tensor, coords: list) -> torch.Tensor:
        start = tuple(int(s.start or 0) for s in coords[0][2:])
        return _sample_latent(denoiser, window_latent, plan, kwargs, _window_seed(seed, start), False)

    return sliding_window_inference(
        y_latent, roi_size=window, sw_batch_size=1, predictor=predictor, overlap=DEFAULT_OVERLAP, mode="gaussian",
        sw_device=device, device=torch.device("cpu"), progress=progress, with_coord=True,
    )


def _num_windows(size: int, window: int) -> int:
    """How many windows MONAI's sliding_window_inference places along an axis (its scan-interval rule)."""
    if window >= size:
        return 1
    interval = max(int(window * (1 - DEFAULT_OVERLAP)), 1)
    return math.ceil((size - window) / interval) + 1


def latent_window(denoiser: LatentDenoiser, vae_stride: tuple[int, int, int], latent_shape: tuple[int, int, int],
                  patch_size: tuple[int, int, int] | None, budget_bytes: int,
                  guidance_scale: float = 1.0) -> tuple[int, int, int] | None:
    """Latent window for windowed sampling (None: sample the whole latent).

    ``patch_size`` (image voxels) forces windows. Otherwise the whole latent is used when its estimated memory fits
    ``budget_bytes``; else the window (at least the diffusion training patch) that fits the budget with the least
    total work, i.e. number of windows x window size, which favours few large windows and little overlap.
    """
    mult = denoiser.size_multiple
    if patch_size is not None:
        win = [_round_down(p // s, m) for p, s, m in zip(patch_size, vae_stride, mult, strict=True)]
        return tuple(min(w, n) for w, n in zip(win, latent_shape, strict=True))  # type: ignore[return-value]
    if estimate_sampling_bytes(denoiser, latent_shape, guidance_scale) <= budget_bytes:
        return None
    preset = loaded_preset(denoiser)
    train_patch = getattr(getattr(preset, "train_diffusion", None), "patch_size", (48, 128, 128))
    smallest = [min(n, _round_down(p // s, m))
                for p, s, m, n in zip(train_patch, vae_stride, mult, latent_shape, strict=True)]
    candidates = [sorted({*range(lo, n + 1, m), n}) for lo, m, n in zip(smallest, mult, latent_shape, strict=True)]
    best: tuple[int, int, int] = tuple(smallest)  # type: ignore[assignment]
    best_cost = math.inf
    for wd in candidates[0]:
        for wh in candidates[1]:
            for ww in candidates[2]:
                if estimate_sampling_bytes(denoiser, (wd, wh, ww), guidance_scale) > budget_bytes:
                    break  # larger ww only needs more memory
                cost = (_num_windows(latent_shape[0], wd) * _num_windows(latent_shape[1], wh)
                        * _num_windows(latent_shape[2], ww) * wd * wh * ww)
                if cost < best_cost:
                    best, best_cost = (wd, wh, ww), cost
    return best


# ------------------------------------------------------------------------------------------------ pipeline
@dataclass(frozen=True)
class LdmOptions(LearnedOptions):
    progress: bool = True
    steps: int | None = None  # None: the model's schedule; 4 picks denoiser-4step.safetensors
    samples: int = 1  # > 1: mean of seeds seed, seed + 1, ...; their per-voxel std comes back as extras["std"]
    guidance_scale: float | None = None  # classifier-free guidance (None: the model's)
    sampler: str | None = None  # resshift or ddim (None: the model's)
    patch_size: tuple[int, int, int] | None = None  # image voxels per latent window (None: by memory)
    consistency: bool = True  # data-consistency projection of every sample
    memory_limit_gb: float | None = None  # sampling memory budget (None: 70% free GPU / half the free RAM)
    decode: str = "residual"  # residual (cubic + D(x0) - D(y)) or direct (D(x0))
    vae_tile: tuple[int, int, int] = DEFAULT_TILE


@dataclass
class _Encoded:
    """The conditioning image in latent space, and what residual decoding adds back."""

    y_hu: np.ndarray
    padded_shape: tuple[int, ...]
    latent: torch.Tensor
    lr_detail: np.ndarray | None
    vae_tile: tuple[int, int, int]


def _encode(vae: AutoencoderKL3D, denoiser: LatentDenoiser, cubic: Volume, o: LdmOptions,
            timings: dict[str, float]) -> _Encoded:
    """Encode the cubic image (edge-padded to the size multiple), and for residual decoding keep cubic - D(y)."""
    amp = autocast_dtype(o.precision)
    t0 = time.perf_counter()
    y_hu = cubic.slices_first()
    mult = tuple(s * m for s, m in zip(vae.total_stride, denoiser.size_multiple, strict=True))
    padded = _pad_to(np.ascontiguousarray(y_hu), mult)  # type: ignore[arg-type]
    # Tiles no larger than the (stride-aligned) volume: tiling pads small volumes up to a whole tile otherwise.
    tile = tuple(min(int(t), n) for t, n in zip(o.vae_tile, padded.shape, strict=True))
    latent = encode_volume(vae, padded, tile=tile, progress=o.progress, autocast_dtype=amp)[None]
    timings["encode"] = time.perf_counter() - t0
    lr_detail = None
    # Also with the lossless Haar stage: its input is clipped to the model's HU range, which this restores.
    if o.decode == "residual":
        # cubic - D(y): what the VAE loses of the cubic image; added back to every decoded sample.
        t0 = time.perf_counter()
        lr_detail = decode_volume(vae, latent[0], out_shape=padded.shape, tile=tile, progress=o.progress,
                                  autocast_dtype=amp)[: y_hu.shape[0], : y_hu.shape[1], : y_hu.shape[2]]
        np.subtract(y_hu, lr_detail, out=lr_detail)
        timings["decode_lr"] = time.perf_counter() - t0
    return _Encoded(y_hu, padded.shape, latent, lr_detail, tile)  # type: ignore[arg-type]


class _Welford:
    """Running mean and sum of squares in place (float32 accumulators of the output size):
    delta = x - mean_old; mean += delta / n; m2 += delta * (x - mean_new) = delta^2 (n - 1) / n."""

    def __init__(self, shape: tuple[int, ...], with_var: bool) -> None:
        self.n = 0
        self.mean = np.zeros(shape, np.float32)
        self.m2 = np.zeros(shape, np.float32) if with_var else None

    def add(self, x: np.ndarray) -> None:
        self.n += 1
        delta = np.subtract(x, self.mean, dtype=np.float32)
        self.mean += delta / self.n
        if self.m2 is not None and self.n > 1:
            np.multiply(delta, delta, out=delta)
            delta *= (self.n - 1) / self.n
            self.m2 += delta

    def std(self) -> np.ndarray | None:
        if self.m2 is None:
            return None
        return np.sqrt(np.maximum(self.m2 / (self.n - 1), 0.0)).astype(np.float32)


def _sample(vae: AutoencoderKL3D, denoiser: LatentDenoiser, enc: _Encoded, plan: _Plan, o: LdmOptions, seed: int,
            timings: dict[str, float]) -> np.ndarray:
    """One seed's HR latent, decoded to HU on the thin grid (plus the residual-decoding detail)."""
    device, amp = next(denoiser.parameters()).device, autocast_dtype(o.precision)
    t0 = time.perf_counter()
    with autocast(device, amp):
        hr_latent = sample_hr_latent(denoiser, enc.latent, plan, o, seed)
    timings["sampling"] += time.perf_counter() - t0
    t0 = time.perf_counter()
    x = decode_volume(vae, hr_latent[0].float(), out_shape=enc.padded_shape, tile=enc.vae_tile, progress=o.progress,
                      autocast_dtype=amp)
    x = x[: enc.y_hu.shape[0], : enc.y_hu.shape[1], : enc.y_hu.shape[2]]
    if enc.lr_detail is not None:
        x += enc.lr_detail
    timings["decode"] += time.perf_counter() - t0
    return x


def _plan(denoiser: LatentDenoiser, vae: AutoencoderKL3D, enc: _Encoded, o: LdmOptions,
          info: dict[str, object], latent: LatentConfig) -> _Plan:
    """Latent window (None: whole) and guidance scale of the run, recorded in ``info``."""
    device = next(denoiser.parameters()).device
    latent_shape = tuple(int(n) for n in enc.latent.shape[2:])
    scale = denoiser.cfg.guidance_scale if o.guidance_scale is None else float(o.guidance_scale)
    budget = int(o.memory_limit_gb * 1024**3) if o.memory_limit_gb else available_memory_bytes(device)
    window = latent_window(denoiser, vae.total_stride, latent_shape, o.patch_size, budget, scale)  # type: ignore[arg-type]
    info.update(latent_shape=latent_shape, window=window or "whole", samples=o.samples, seed=o.seed,
                steps=o.steps or (denoiser.cfg.num_steps if denoiser.cfg.method == "resshift"
                                  else denoiser.cfg.ddim_sample_steps),
                sampler=denoiser.cfg.method, guidance_scale=scale, decode=o.decode, precision=o.precision,
                first_stage=latent.first_stage, prior=latent.prior)
    return _Plan(window, scale, float(info["factor"]), float(latent.residual_scale))  # type: ignore[arg-type]


def latent_config(denoiser: LatentDenoiser) -> LatentConfig:
    """The latent space a loaded denoiser was trained in (first stage, prior, residual scale); the default (VAE,
    cubic) for a network not loaded from a file."""
    preset = loaded_preset(denoiser)
    return getattr(preset, "latent", None) or LatentConfig()


def run_ldm(thick: Volume, spacing_mm: float, vae: AutoencoderKL3D, denoiser: LatentDenoiser,
            options: LdmOptions | None = None, acquisition: Acquisition | None = None,
            prior: Volume | None = None, latent: LatentConfig | None = None) -> LDMResult:
    """The LDM pipeline with given (loaded) models; see the module docstring. ``prior`` is the estimate the model
    starts from (the cubic image, computed when not given); ``latent`` the denoiser's latent space (default: its
    record's). The result is the mean of ``options.samples`` seeds, ``std`` their per-voxel deviation."""
    o = options or LdmOptions()
    if o.samples < 1:
        raise ThinsliceError(f"--samples must be at least 1, got {o.samples}")
    if o.decode not in DECODE_MODES:
        raise ThinsliceError(f"unknown decode mode '{o.decode}': use one of {', '.join(DECODE_MODES)}")
    autocast_dtype(o.precision)  # an unknown precision fails before any work
    _check_pair(vae, denoiser)
    acquisition = acquisition or Acquisition.of(thick)
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    cubic = prior if prior is not None else interpolate_volume(thick, spacing_mm, "cubic")
    factor = thick.slice_spacing / float(spacing_mm)
    _warn_factor(factor, denoiser)
    timings["prior"] = time.perf_counter() - t0
    enc = _encode(vae, denoiser, cubic, o, timings)
    info: dict[str, object] = {"timings_s": timings, "factor": factor}
    plan = _plan(denoiser, vae, enc, o, info, latent or latent_config(denoiser))
    weights = (thick_profile_operator(thick, spacing_mm, acquisition.profile, acquisition.thickness_mm)
               if o.consistency else None)
    acc = _Welford(enc.y_hu.shape, o.samples > 1)
    timings.update(sampling=0.0, decode=0.0, consistency=0.0)
    residuals: list[tuple[dict[str, float], dict[str, float]]] = []
    for index in tqdm(range(o.samples), desc="samples", disable=not o.progress or o.samples == 1, leave=False):
        x = _sample(vae, denoiser, enc, plan, o, o.seed + index, timings)
        if weights is not None:
            x = _project(x, thick, weights, residuals, timings)
        acc.add(x)
    return _finish(thick, cubic, acc, residuals, acquisition, info)


def _project(x: np.ndarray, thick: Volume, weights: SlabOperator,
             residuals: list[tuple[dict[str, float], dict[str, float]]], timings: dict[str, float]) -> np.ndarray:
    """One sample projected onto consistency with the thick slices; its residuals before/after recorded."""
    t0 = time.perf_counter()
    thick_hu = thick.slices_first()
    before = consistency_residual_hu(x, thick_hu, weights)
    x = enforce_consistency(x, thick_hu, weights)
    residuals.append((before, consistency_residual_hu(x, thick_hu, weights)))
    timings["consistency"] += time.perf_counter() - t0
    return x


def _finish(thick: Volume, cubic: Volume, acc: _Welford, residuals: list, acquisition: Acquisition,
            info: dict[str, object]) -> LDMResult:
    """The mean volume on the thin grid, the std map, and the run facts in ``info`` and the volume's metadata."""
    spacing = cubic.slice_spacing
    _, offset = thin_grid(thick, spacing)
    out = thick.with_slices(acc.mean, spacing, offset, slice_thickness=spacing)
    std = None
    std_arr = acc.std()
    if std_arr is not None:
        std = thick.with_slices(std_arr, spacing, offset, slice_thickness=spacing)
        std.metadata["content"] = f"per-voxel standard deviation (HU) over {acc.n} ldm samples"
        info["std_mean_hu"] = float(std_arr.mean())
    if residuals:
        info["consistency_hu"] = {
            "before_mean_abs": float(np.mean([b["mean_abs"] for b, _ in residuals])),
            "before_max_abs": float(max(b["max_abs"] for b, _ in residuals)),
            "after_mean_abs": float(np.mean([a["mean_abs"] for _, a in residuals])),
            "after_max_abs": float(max(a["max_abs"] for _, a in residuals)),
            "profile": acquisition.profile,
        }
    _annotate(out, info)
    return LDMResult(out, std, info)


def _annotate(out: Volume, info: dict[str, object]) -> None:
    """Short run facts in the volume's metadata (written into NRRD/MHA headers)."""
    window = info["window"]
    mode = "whole latent" if window == "whole" else "latent windows " + "x".join(str(w) for w in window)  # type: ignore[union-attr]
    out.metadata["ldm"] = (f"{info['sampler']} {info['steps']} steps, factor {info['factor']:.3g}, "
                           f"{info['decode']} decode, {info['precision']}, "
                           f"{info['samples']} sample(s), seed {info['seed']}, guidance {info['guidance_scale']:g}, "
                           f"{mode}")
    res = info.get("consistency_hu")
    if isinstance(res, dict):
        out.metadata["consistency_hu"] = (
            f"{res['profile']} profile; |A x - thick| before mean {res['before_mean_abs']:.3g} max "
            f"{res['before_max_abs']:.3g}, after mean {res['after_mean_abs']:.3g} max {res['after_max_abs']:.3g}")
    timings = info["timings_s"]
    out.metadata["ldm_timing_s"] = ", ".join(f"{k} {v:.1f}" for k, v in timings.items())  # type: ignore[union-attr]


def prior_estimate(kind: str, planes: Pipeline | None, thick: Volume, spacing_mm: float,
                   acquisition: Acquisition) -> Volume:
    """The estimate a denoiser refines (``latent.prior`` ``kind``): the planes output, cubic-dc where the planes
    network cannot serve the input, or cubic. Inference and the trainer's prior pairs both call this, so the model
    is trained on the prior it meets."""
    if kind == "planes" and planes is not None:
        reason = planes.applicable(thick, spacing_mm, getattr(planes.options, "checkpoint", None))
        if reason is None:
            return planes(thick, spacing_mm, acquisition).volume
        log.warning("ldm: the planes prior cannot serve this input (%s); starting from cubic-dc", reason)
    if kind in ("planes", "cubic-dc"):
        return CubicDC()(thick, spacing_mm, acquisition).volume
    return interpolate_volume(thick, spacing_mm, "cubic")


@register_pipeline
class Ldm(Pipeline):
    """prior (cubic, cubic-dc or planes, as trained) -> first-stage latent -> ResShift/DDIM sampling (IRControlNet,
    CFG) -> decode -> consistency per sample."""

    name = "ldm"
    description = ("3D latent diffusion (ResShift + IRControlNet) from the best estimate, with data consistency and "
                   "a std map (--samples N); needs trained weights (--checkpoint DIR or shipped)")
    Options = LdmOptions
    # The VAE (first stage 'vae') and the planes network (prior 'planes') are read from the same bundle when the
    # denoiser's record asks for them; the lossless Haar first stage has no weights.
    weights = ("denoiser",)
    preference = 2
    consistent = False  # type: ignore[assignment]  (every sample is projected inside, before averaging)
    vae: AutoencoderKL3D
    denoiser: LatentDenoiser
    latent: LatentConfig = LatentConfig()
    planes: Pipeline | None = None

    @classmethod
    def from_models(cls, vae: AutoencoderKL3D, denoiser: LatentDenoiser, options: LdmOptions | None = None,
                    latent: LatentConfig | None = None, planes: Pipeline | None = None) -> Ldm:
        """The pipeline around networks in hand (training validates through this); ``planes`` serves a 'planes'
        prior."""
        pipeline = cls(options)
        pipeline.vae, pipeline.denoiser = vae, denoiser
        pipeline.latent, pipeline.planes = latent or latent_config(denoiser), planes
        return pipeline

    def load(self) -> None:
        o = self.options
        bundle, device = self.bundle(), resolve_device(o.device)
        self.denoiser = load_denoiser(bundle, device, steps=o.steps, preset=o.preset)
        if device.type == "cpu":
            self.denoiser.use_channels_last()
        self.latent = latent_config(self.denoiser)
        stage = build_first_stage(loaded_preset(self.denoiser))  # type: ignore[arg-type]
        if stage is None:
            if not has_weights("vae", bundle):
                raise ThinsliceError(f"the denoiser in {bundle} works on a VAE's latents, but the folder has no "
                                     "vae.safetensors: put the VAE it was trained with beside it")
            self.vae = load_vae(bundle, device, preset=o.preset)
        else:
            self.vae = stage.to(device)  # type: ignore[assignment]
        if self.latent.prior == "planes":
            from thinslice.infer.planes import Planes

            # With samples, planes also keeps its passes' disagreement: the std map builds on it (docs/uncertainty.md)
            self.planes = Planes.from_pretrained(bundle, device=o.device, precision=o.precision,
                                                 uncertainty=o.samples > 1)

    def prior(self, thick: Volume, spacing_mm: float, acquisition: Acquisition) -> Volume:
        if self.planes is not None:
            self.planes.last_spread = None  # type: ignore[attr-defined]  (set again only if planes serves this input)
        return prior_estimate(self.latent.prior, self.planes, thick, spacing_mm, acquisition)

    def refine(self, thick: Volume, prior: Volume, acquisition: Acquisition) -> Result:
        run = run_ldm(thick, prior.slice_spacing, self.vae, self.denoiser, self.options, acquisition, prior,
                      self.latent)
        res = run.info.get("consistency_hu")
        if self.options.progress and isinstance(res, dict):
            log.info("ldm: data consistency |A x - thick| mean %.2f -> %.2g HU", res["before_mean_abs"],
                     res["after_mean_abs"])
        result = Result(run.volume)
        if run.std is not None:  # the samples' std, calibrated into extras["std"] (docs/uncertainty.md)
            from thinslice.infer.uncertainty import attach_std

            result.extras["spread"] = run.std
            planes_spread = getattr(self.planes, "last_spread", None)
            if planes_spread is not None and planes_spread.array.shape == run.std.array.shape:
                result.extras["planes_spread"] = planes_spread
            k = round(thick.slice_spacing / prior.slice_spacing)
            attach_std(result, self.bundle(), "ldm", k, self.network_hashes(k), self.options.samples)
        return result

    def network_hashes(self, k: int) -> dict[str, str]:
        """Content hashes of the networks a factor-``k`` run uses (denoiser, planes prior): what a calibration of
        its std map is valid for."""
        from thinslice.models.kinds import network_kind

        hashes = {"denoiser": weights_label(self.denoiser)}
        network_for = getattr(self.planes, "network_for", None)
        if self.latent.prior == "planes" and network_for is not None:
            network = network_for(k)
            name = network_kind("planes").file_name(k if network is not self.planes.model else None)
            hashes[name] = weights_label(network)
        return hashes
