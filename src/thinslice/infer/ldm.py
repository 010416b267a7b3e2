"""``--method ldm``: thick slices -> thin slices with the 3D latent diffusion model (ResShift + IRControlNet).

Pipeline (timed per stage, see :class:`LDMResult`):

1. cubic B-spline upsampling to the thin grid (the LR image the model is conditioned on);
2. VAE encoding, tiled (:func:`thinslice.models.tiling.encode_volume`); the image is edge-padded so that latent
   sizes are multiples of the denoiser's size multiple, and cropped back after decoding;
3. sampling the HR latent with :func:`thinslice.infer.sampler.sample_latent`: the whole latent at once when it
   fits in memory, else overlapping latent windows (MONAI ``sliding_window_inference``, Gaussian blending), each
   sampled with its own generator seeded from (seed, window position) so results are reproducible;
4. VAE decoding, tiled. ``decode="residual"`` (default) returns ``cubic + D(x0) - D(y)`` instead of ``D(x0)``:
   the VAE's reconstruction error, common to both decodes, cancels, so the model adds through-plane detail to the
   cubic image instead of replacing it by a VAE reconstruction (a small VAE trained on a CPU reconstructs CT at
   ~25 dB, far below cubic interpolation's ~39 dB; ``direct`` is kept to measure what this gains). A model that
   learnt nothing (x0 = y) then gives exactly cubic;
5. data consistency: projection onto ``{x : A x = thick}`` for the input's slice profile (:mod:`.consistency`).

``samples > 1`` averages several seeds and can write the per-voxel standard deviation (an uncertainty map).
"""

from __future__ import annotations

import logging
import math
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from monai.inferers import sliding_window_inference
from tqdm.auto import tqdm

from thinslice.checkpoints.bundle import load_denoiser, load_vae
from thinslice.checkpoints.device import autocast, autocast_dtype, resolve_device
from thinslice.checkpoints.files import loaded_preset, record_of
from thinslice.degrade.grid import thin_grid
from thinslice.errors import ThinsliceError
from thinslice.infer.consistency import consistency_residual_hu, enforce_consistency, thick_profile_operator
from thinslice.infer.options import option_bool, option_float, option_int, option_patch
from thinslice.infer.sampler import sample_latent
from thinslice.infer.upsample import get_method, register_method
from thinslice.io.volume import Volume
from thinslice.models.denoiser import LatentDenoiser
from thinslice.models.tiling import DEFAULT_TILE, decode_volume, encode_volume
from thinslice.models.vae import AutoencoderKL3D

log = logging.getLogger(__name__)

DEFAULT_OVERLAP = 0.25
# Peak sampling memory per latent voxel and UNet base channel (bytes), measured on CPU for the tiny and small
# presets with the control net (float32, no gradients), with a safety margin; used to pick whole vs windowed sampling.
BYTES_PER_VOXEL_CHANNEL = 120.0

OPTIONS = ("checkpoint", "device", "steps", "samples", "guidance_scale", "sampler", "seed", "patch_size", "profile",
           "consistency", "progress", "uncertainty_path", "preset", "thickness", "memory_limit_gb", "decode",
           "precision")
DECODE_MODES = ("residual", "direct")


@dataclass
class LDMResult:
    """Output volume (mean of the samples), std map (``samples > 1``) and run information (timings, residuals)."""

    volume: Volume
    std: Volume | None = None
    info: dict[str, object] = field(default_factory=dict)


# ------------------------------------------------------------------------------------------------ helpers
def std_path_for(output: str | Path) -> Path:
    """Where the uncertainty map of ``output`` goes: ``ct.nii.gz`` -> ``ct_std.nii.gz``, folder ``out/`` ->
    ``out_std/``."""
    from thinslice.io.readers import file_extension

    text = str(output).rstrip("/\\")
    path = Path(text)
    ext = file_extension(path)
    if ext and path.name.lower().endswith(ext) and len(path.name) > len(ext):
        return path.with_name(path.name[: -len(ext)] + "_std" + path.name[-len(ext):])
    return path.with_name(path.name + "_std")


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


# ------------------------------------------------------------------------------------------------ sampling
def sample_hr_latent(
    denoiser: LatentDenoiser,
    y_latent: torch.Tensor,
    factor: float,
    *,
    seed: int = 0,
    window: tuple[int, int, int] | None = None,
    sampler: str | None = None,
    steps: int | None = None,
    guidance_scale: float | None = None,
    device: torch.device | None = None,
    progress: bool = False,
) -> torch.Tensor:
    """HR latent (1, C, d, h, w) on CPU for ``y_latent`` (1, C, d, h, w): whole, or in latent ``window``s."""
    device = device or next(denoiser.parameters()).device
    kwargs = {"method": sampler, "steps": steps, "guidance_scale": guidance_scale}
    if window is None or all(w >= s for w, s in zip(window, y_latent.shape[2:], strict=True)):
        out = sample_latent(denoiser, y_latent.to(device), factor, generator=_generator(seed), progress=progress,
                            **kwargs)
        return out.float().cpu()

    def predictor(window_latent: torch.Tensor, coords: list) -> torch.Tensor:
        start = tuple(int(s.start or 0) for s in coords[0][2:])
        out = sample_latent(denoiser, window_latent, factor, generator=_generator(_window_seed(seed, start)),
                            progress=False, **kwargs)
        return out.float()

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
def run_ldm(
    thick: Volume,
    spacing_mm: float,
    vae: AutoencoderKL3D,
    denoiser: LatentDenoiser,
    *,
    steps: int | None = None,
    samples: int = 1,
    guidance_scale: float | None = None,
    sampler: str | None = None,
    seed: int = 0,
    patch_size: tuple[int, int, int] | None = None,
    profile: str = "gaussian",
    thickness: float | None = None,
    consistency: bool = True,
    progress: bool = False,
    memory_limit_gb: float | None = None,
    vae_tile: tuple[int, int, int] = DEFAULT_TILE,
    decode: str = "residual",
    precision: str = "fp32",
) -> LDMResult:
    """The LDM pipeline with given (loaded) models; see the module docstring. ``samples`` seeds are
    ``seed, seed + 1, ...``; the result is their mean, ``std`` their per-voxel standard deviation."""
    if samples < 1:
        raise ThinsliceError(f"--samples must be at least 1, got {samples}")
    if decode not in DECODE_MODES:
        raise ThinsliceError(f"unknown decode mode '{decode}': use one of {', '.join(DECODE_MODES)}")
    amp = autocast_dtype(precision)
    _check_pair(vae, denoiser)
    device = next(denoiser.parameters()).device
    timings: dict[str, float] = {}
    info: dict[str, object] = {"timings_s": timings}

    t0 = time.perf_counter()
    n_thin, first_offset = thin_grid(thick, spacing_mm)
    lr = get_method("cubic").fn(thick, spacing_mm)
    y_hu = lr.slices_first()
    factor = thick.slice_spacing / float(spacing_mm)
    _warn_factor(factor, denoiser)
    timings["cubic"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    stride = vae.total_stride
    mult = tuple(s * m for s, m in zip(stride, denoiser.size_multiple, strict=True))
    padded = _pad_to(np.ascontiguousarray(y_hu), mult)  # type: ignore[arg-type]
    # Tiles no larger than the (stride-aligned) volume: tiling pads small volumes up to a whole tile otherwise.
    vae_tile = tuple(min(int(t), n) for t, n in zip(vae_tile, padded.shape, strict=True))  # type: ignore[assignment]
    y_latent = encode_volume(vae, padded, tile=vae_tile, progress=progress, autocast_dtype=amp)[None]
    timings["encode"] = time.perf_counter() - t0
    lr_detail = None
    if decode == "residual":
        # cubic - D(y): what the VAE loses of the cubic image; added back to every decoded sample.
        t0 = time.perf_counter()
        lr_detail = decode_volume(vae, y_latent[0], out_shape=padded.shape, tile=vae_tile, progress=progress,
                                  autocast_dtype=amp)[:n_thin, : y_hu.shape[1], : y_hu.shape[2]]
        np.subtract(y_hu, lr_detail, out=lr_detail)
        timings["decode_lr"] = time.perf_counter() - t0
    latent_shape = tuple(int(n) for n in y_latent.shape[2:])
    scale = denoiser.cfg.guidance_scale if guidance_scale is None else float(guidance_scale)
    budget = int(memory_limit_gb * 1024**3) if memory_limit_gb else available_memory_bytes(device)
    window = latent_window(denoiser, stride, latent_shape, patch_size, budget, scale)  # type: ignore[arg-type]
    info.update(factor=factor, latent_shape=latent_shape, window=window or "whole", samples=samples, seed=seed,
                steps=steps or (denoiser.cfg.num_steps if denoiser.cfg.method == "resshift"
                                else denoiser.cfg.ddim_sample_steps),
                sampler=denoiser.cfg.method, guidance_scale=scale, decode=decode, precision=precision)

    weights = thick_profile_operator(thick, spacing_mm, profile, thickness) if consistency else None
    mean = np.zeros((n_thin, *y_hu.shape[1:]), np.float32)
    m2 = np.zeros_like(mean) if samples > 1 else None
    timings.update(sampling=0.0, decode=0.0, consistency=0.0)
    residual_before: list[dict[str, float]] = []
    residual_after: list[dict[str, float]] = []
    seeds = tqdm(range(samples), desc="samples", disable=not progress or samples == 1, leave=False)
    for index in seeds:
        t0 = time.perf_counter()
        with autocast(device, amp):
            hr_latent = sample_hr_latent(denoiser, y_latent, factor, seed=seed + index, window=window,
                                         sampler=sampler, steps=steps, guidance_scale=scale, device=device,
                                         progress=progress)
        timings["sampling"] += time.perf_counter() - t0
        t0 = time.perf_counter()
        x = decode_volume(vae, hr_latent[0].float(), out_shape=padded.shape, tile=vae_tile, progress=progress,
                          autocast_dtype=amp)
        x = x[:n_thin, : y_hu.shape[1], : y_hu.shape[2]]
        if lr_detail is not None:
            x += lr_detail
        timings["decode"] += time.perf_counter() - t0
        if weights is not None:
            t0 = time.perf_counter()
            thick_hu = thick.slices_first()
            residual_before.append(consistency_residual_hu(x, thick_hu, weights))
            x = enforce_consistency(x, thick_hu, weights)
            residual_after.append(consistency_residual_hu(x, thick_hu, weights))
            timings["consistency"] += time.perf_counter() - t0
        # Welford's running mean / sum of squares in place (float32 accumulators of the output size):
        # delta = x - mean_old; mean += delta / n; m2 += delta * (x - mean_new) = delta^2 (n - 1) / n.
        n = index + 1
        delta = np.subtract(x, mean, dtype=np.float32)
        del x
        mean += delta / n
        if m2 is not None and n > 1:
            np.multiply(delta, delta, out=delta)
            delta *= (n - 1) / n
            m2 += delta
        del delta

    out = thick.with_slices(mean, float(spacing_mm), first_offset, slice_thickness=float(spacing_mm))
    std = None
    if m2 is not None:
        std_arr = np.sqrt(np.maximum(m2 / (samples - 1), 0.0)).astype(np.float32)
        std = thick.with_slices(std_arr, float(spacing_mm), first_offset, slice_thickness=float(spacing_mm))
        std.metadata["content"] = f"per-voxel standard deviation (HU) over {samples} ldm samples"
        info["std_mean_hu"] = float(std_arr.mean())
    if residual_before:
        info["consistency_hu"] = {
            "before_mean_abs": float(np.mean([r["mean_abs"] for r in residual_before])),
            "before_max_abs": float(max(r["max_abs"] for r in residual_before)),
            "after_mean_abs": float(np.mean([r["mean_abs"] for r in residual_after])),
            "after_max_abs": float(max(r["max_abs"] for r in residual_after)),
            "profile": profile,
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
        out.metadata["ldm_consistency_hu"] = (
            f"{res['profile']} profile; |A x - thick| before mean {res['before_mean_abs']:.3g} max "
            f"{res['before_max_abs']:.3g}, after mean {res['after_mean_abs']:.3g} max {res['after_max_abs']:.3g}")
    timings = info["timings_s"]
    out.metadata["ldm_timing_s"] = ", ".join(f"{k} {v:.1f}" for k, v in timings.items())  # type: ignore[union-attr]


def upsample_ldm(
    thick: Volume,
    spacing_mm: float,
    checkpoint: str | None = None,
    device: str | None = None,
    steps: int | str | None = None,
    samples: int | str = 1,
    guidance_scale: float | str | None = None,
    sampler: str | None = None,
    seed: int | str = 0,
    patch_size: tuple[int, int, int] | str | None = None,
    profile: str = "gaussian",
    consistency: bool | str = True,
    progress: bool | str = True,
    uncertainty_path: str | Path | None = None,
    preset: str | None = None,
    thickness: float | str | None = None,
    memory_limit_gb: float | str | None = None,
    decode: str = "residual",
    precision: str = "fp32",
) -> Volume:
    """Latent-diffusion upsampling of ``thick`` to ``spacing_mm`` slices on ``thin_grid(thick, spacing_mm)``.

    ``checkpoint``: bundle folder (default: the shipped weights). ``steps``: None = the model's schedule; 4 picks
    ``denoiser-4step.safetensors``. ``samples`` > 1 averages seeds; with ``uncertainty_path`` their per-voxel
    standard deviation is written there (float32 file, or int16 DICOM folder). ``profile``/``thickness`` describe
    the input's slices for data consistency (thickness default: the file's slice thickness, else its spacing).
    ``preset`` only checks that the weights have that preset's architecture. ``decode``: residual (cubic + D(x0) -
    D(y), default) or direct (D(x0)). ``precision``: fp32 or bf16 (autocast; about twice as fast on a CPU).
    """
    steps_n = None if steps is None else option_int("steps", steps, 1)
    n_samples = option_int("samples", samples, 1)
    seed_n = option_int("seed", seed)
    scale = None if guidance_scale is None else option_float("guidance_scale", guidance_scale)
    patch = None if patch_size is None else option_patch("patch_size", patch_size)
    thick_mm = None if thickness is None else option_float("thickness", thickness, positive=True)
    limit = None if memory_limit_gb is None else option_float("memory_limit_gb", memory_limit_gb, positive=True)
    show = option_bool("progress", progress)
    if uncertainty_path is not None and n_samples < 2:
        raise ThinsliceError("an uncertainty (standard deviation) map needs --samples 2 or more")
    bundle = get_method("ldm").bundle(checkpoint)
    dev = resolve_device(device)
    vae = load_vae(bundle, dev, preset=preset)
    denoiser = load_denoiser(bundle, dev, steps=steps_n, preset=preset)
    result = run_ldm(thick, spacing_mm, vae, denoiser, steps=steps_n, samples=n_samples, guidance_scale=scale,
                     sampler=sampler, seed=seed_n, patch_size=patch, profile=str(profile), thickness=thick_mm,
                     consistency=option_bool("consistency", consistency), progress=show, memory_limit_gb=limit,
                     decode=str(decode), precision=str(precision))
    if show:
        res = result.info.get("consistency_hu")
        if isinstance(res, dict):
            log.info(f"ldm: data consistency |A x - thick| mean {res['before_mean_abs']:.2f} -> "
                  f"{res['after_mean_abs']:.2g} HU")
    if uncertainty_path is not None and result.std is not None:
        from thinslice.io.writers import is_folder_output, write_volume

        dtype = "int16" if is_folder_output(uncertainty_path) else "float32"
        written = write_volume(result.std, uncertainty_path, dtype=dtype)
        result.volume.metadata["ldm_std_map"] = str(written)
        if show:
            log.info(f"ldm: wrote standard-deviation map {written}")
    return result.volume


register_method(
    "ldm", upsample_ldm,
    description="3D latent diffusion (ResShift + IRControlNet) with data consistency; needs trained weights "
                "(--checkpoint DIR or shipped)",
    options=OPTIONS,
    weights=("vae", "denoiser"), train_hint="thinslice train-vae ... and thinslice train ...", preference=2,
)
