"""``--method ldm``: thick slices -> thin slices with the 3D latent diffusion model (ResShift + IRControlNet).

The prior the denoiser was trained to refine (:func:`~thinslice.infer.registry.prior_estimate`) is encoded by the
first stage (:func:`~thinslice.models.tiling.encode_padded`: the lossless Haar transform of the shipped model, or a
VAE); the HR latent is sampled (:func:`~thinslice.diffusion.sampling.reverse_process`) whole, or in latent windows
seeded by position when it does not fit in memory (:mod:`thinslice.models.windows`); with residual latents
(:class:`~thinslice.presets.LatentConfig`) the model samples the scaled residual from the prior from zero. Decoding
is residual by default, ``prior + D(x0) - D(y)``: the first stage's reconstruction error cancels, so the model adds
through-plane detail to the prior (and a model that learnt nothing gives the prior). Every sample is projected onto
consistency with the thick slices (:func:`~thinslice.infer.consistency.make_consistent`) before they are averaged;
with ``samples > 1`` their per-voxel std (and the planes prior's pass disagreement) becomes a calibrated std map in
``Result.extras["std"]`` (:mod:`thinslice.infer.uncertainty`). Stage timings: ``Result.report["ldm_timing_s"]``.
"""

from __future__ import annotations

import logging
import time
import warnings
from dataclasses import dataclass
from typing import cast

import numpy as np
import torch
from tqdm.auto import tqdm

from thinslice.checkpoints.bundle import has_weights, load_denoiser, load_vae
from thinslice.checkpoints.files import loaded_preset, record_of, weights_label
from thinslice.degrade.grid import thin_grid
from thinslice.device import autocast, autocast_dtype, resolve_device
from thinslice.diffusion.sampling import make_schedule, reverse_process, seeded_generator, window_seed
from thinslice.errors import ThinsliceError
from thinslice.infer.consistency import make_consistent
from thinslice.infer.pipeline import Acquisition, LearnedOptions, Pipeline, Result
from thinslice.infer.planes import Planes
from thinslice.infer.registry import prior_result, register_pipeline
from thinslice.infer.uncertainty import Welford, attach_std
from thinslice.io.volume import Volume
from thinslice.models.denoiser import LatentDenoiser
from thinslice.models.factory import build_first_stage
from thinslice.models.kinds import network_kind
from thinslice.models.tiling import DEFAULT_TILE, PaddedLatent, decode_padded, encode_padded
from thinslice.models.vae import AutoencoderKL3D
from thinslice.models.windows import DEFAULT_TRAIN_PATCH, available_memory_bytes, latent_window, whole_or_windows
from thinslice.presets import LatentConfig

log = logging.getLogger(__name__)

DECODE_MODES = ("residual", "direct")


def _check(o: LdmOptions, vae: AutoencoderKL3D, denoiser: LatentDenoiser, factor: float) -> None:
    """Refuse options and model pairs that cannot work, before any work; warn of a factor the model did not learn."""
    if o.samples < 1:
        raise ThinsliceError(f"--samples must be at least 1, got {o.samples}")
    if o.decode not in DECODE_MODES:
        raise ThinsliceError(f"unknown decode mode '{o.decode}': use one of {', '.join(DECODE_MODES)}")
    autocast_dtype(o.precision)  # an unknown precision fails here
    if vae.config.latent_channels != denoiser.unet.cfg.latent_channels:
        raise ThinsliceError(f"the VAE makes {vae.config.latent_channels}-channel latents but the denoiser expects "
                             f"{denoiser.unet.cfg.latent_channels}: use the VAE the denoiser was trained with (same "
                             "bundle)")
    want = getattr(record_of(denoiser), "metadata", {}).get("vae_hash", "")
    have = getattr(record_of(vae), "content_hash", "")
    if want and have and want != have:
        raise ThinsliceError(f"the denoiser was trained on latents of VAE {want} but the bundle's VAE is {have}: put "
                             "the matching vae.safetensors next to the denoiser (or retrain the denoiser on this VAE)")
    factors = tuple(getattr(getattr(loaded_preset(denoiser), "degradation", None), "factors", ()) or ())
    if factors and not (min(factors) * 0.9 <= factor <= max(factors) * 1.1):
        warnings.warn(f"upsampling factor {factor:.3g} is outside the factors the model was trained on "
                      f"({min(factors):g}-{max(factors):g}); results may be poor", stacklevel=3)


@dataclass(frozen=True)
class _Plan:
    """How the latent is sampled (window None: whole; residual_scale 0: the model samples the HR latent itself)."""

    window: tuple[int, int, int] | None
    scale: float
    factor: float
    residual_scale: float = 0.0


def _sample_latent(denoiser: LatentDenoiser, y: torch.Tensor, plan: _Plan, o: LdmOptions, seed: int,
                   progress: bool) -> torch.Tensor:
    """One HR latent for the prior's latent ``y``: the denoiser, told ``y``, through the schedule it was trained with.
    With residual latents (:class:`~thinslice.presets.LatentConfig`) it samples s (x0 - y) from 0: x0 = y + out / s."""
    if denoiser.channels_last:
        y = y.contiguous(memory_format=torch.channels_last_3d)

    def model_fn(x: torch.Tensor, t: torch.Tensor, _anchor: torch.Tensor) -> torch.Tensor:
        return denoiser.guided(x, t, y, plan.factor, guidance_scale=plan.scale)

    residual = plan.residual_scale > 0
    out = reverse_process(make_schedule(denoiser.cfg, o.sampler), model_fn, torch.zeros_like(y) if residual else y,
                          seeded_generator(seed), o.steps, progress)
    assert isinstance(out, torch.Tensor)
    return y.float() + out.float() / plan.residual_scale if residual else out.float()


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


def _encode(vae: AutoencoderKL3D, denoiser: LatentDenoiser, prior: Volume, o: LdmOptions,
            timings: dict[str, float]) -> tuple[PaddedLatent, np.ndarray | None]:
    """Encode the prior (padded to the denoiser's size multiple); for residual decoding keep prior - D(y), what the
    first stage loses of it (Haar: what its HU-range clipping loses), added back to every decoded sample."""
    amp = autocast_dtype(o.precision)
    t0 = time.perf_counter()
    y_hu = prior.slices_first()
    mult = tuple(s * m for s, m in zip(vae.total_stride, denoiser.size_multiple, strict=True))
    first = encode_padded(vae, y_hu, mult, o.vae_tile, o.progress, amp)
    timings["encode"] = time.perf_counter() - t0
    lr_detail = None
    if o.decode == "residual":
        t0 = time.perf_counter()
        lr_detail = decode_padded(vae, first, first.latent[0], o.progress, amp)
        np.subtract(y_hu, lr_detail, out=lr_detail)
        timings["decode_lr"] = time.perf_counter() - t0
    return first, lr_detail


@torch.no_grad()
def _sample(vae: AutoencoderKL3D, denoiser: LatentDenoiser, enc: tuple[PaddedLatent, np.ndarray | None], plan: _Plan,
            o: LdmOptions, seed: int, timings: dict[str, float]) -> np.ndarray:
    """One seed's HR latent (the denoiser in eval mode; whole, or in the plan's latent windows each seeded from
    ``seed`` and its position), decoded to HU on the thin grid plus the residual-decoding detail."""
    (first, lr_detail), was_training = enc, denoiser.training
    device, amp = next(denoiser.parameters()).device, autocast_dtype(o.precision)

    def sample(y: torch.Tensor, start: tuple[int, ...] | None) -> torch.Tensor:  # start None: the whole latent
        return _sample_latent(denoiser, y, plan, o, seed if start is None else window_seed(seed, start),
                              o.progress and start is None)

    t0 = time.perf_counter()
    denoiser.eval()
    try:
        with autocast(device, amp):
            hr_latent = whole_or_windows(sample, first.latent, plan.window, device, o.progress)
    finally:
        denoiser.train(was_training)
    timings["sampling"] += time.perf_counter() - t0
    t0 = time.perf_counter()
    x = decode_padded(vae, first, hr_latent[0].float(), o.progress, amp)
    if lr_detail is not None:
        x += lr_detail
    timings["decode"] += time.perf_counter() - t0
    return x


def _plan(denoiser: LatentDenoiser, vae: AutoencoderKL3D, first: PaddedLatent, o: LdmOptions, factor: float,
          latent: LatentConfig) -> tuple[_Plan, str]:
    """Latent window (None: whole) and guidance scale of the run, and the report line that says so."""
    device = next(denoiser.parameters()).device
    d, h, w = (int(n) for n in first.latent.shape[2:])
    latent_shape = (d, h, w)
    scale = denoiser.cfg.guidance_scale if o.guidance_scale is None else float(o.guidance_scale)
    budget = int(o.memory_limit_gb * 1024**3) if o.memory_limit_gb else available_memory_bytes(device)
    train_patch = getattr(getattr(loaded_preset(denoiser), "train_diffusion", None), "patch_size", DEFAULT_TRAIN_PATCH)
    window = latent_window(denoiser, vae.total_stride, latent_shape, o.patch_size, budget, scale, train_patch)
    steps = o.steps or (denoiser.cfg.num_steps if denoiser.cfg.method == "resshift" else denoiser.cfg.ddim_sample_steps)
    mode = "whole latent" if window is None else "latent windows " + "x".join(str(w) for w in window)
    line = (f"{denoiser.cfg.method} {steps} steps, factor {factor:.3g}, {o.decode} decode, {o.precision}, "
            f"{o.samples} sample(s), seed {o.seed}, guidance {scale:g}, {mode}")
    return _Plan(window, scale, factor, float(latent.residual_scale)), line


def latent_config(denoiser: LatentDenoiser) -> LatentConfig:
    """The latent space a loaded denoiser was trained in (first stage, prior...); the default for one not loaded."""
    preset = loaded_preset(denoiser)
    return getattr(preset, "latent", None) or LatentConfig()


def _finish(thick: Volume, prior: Volume, acc: Welford, report: dict[str, str], residuals: list[dict[str, float]],
            profile: str) -> Result:
    """The mean volume on the thin grid, (several samples) their std as ``extras["spread"]``, and the samples'
    consistency residuals (mean of their means, max of their maxima) in the report."""
    spacing, (_, offset) = prior.slice_spacing, thin_grid(thick, prior.slice_spacing)
    result = Result(thick.with_slices(acc.mean, spacing, offset, slice_thickness=spacing), report=report)
    if residuals:
        r = {k: float(max(r[k] for r in residuals) if "max" in k else np.mean([r[k] for r in residuals]))
             for k in residuals[0]}
        report["consistency_hu"] = (f"{profile} profile; |A x - thick| before mean {r['before_mean_abs']:.3g} max "
                                    f"{r['before_max_abs']:.3g}, after mean {r['after_mean_abs']:.3g} max "
                                    f"{r['after_max_abs']:.3g}")
    if (std := acc.std()) is not None:
        result.extras["spread"] = thick.with_slices(std, spacing, offset, slice_thickness=spacing)
        result.extras["spread"].metadata["content"] = f"per-voxel standard deviation (HU) over {acc.n} ldm samples"
    return result


@register_pipeline
class Ldm(Pipeline):
    """prior (cubic, cubic-dc or planes, as trained) -> first-stage latent -> ResShift/DDIM sampling (IRControlNet,
    CFG) -> decode -> consistency per sample."""

    name = "ldm"
    description = ("3D latent diffusion (ResShift + IRControlNet) from the best estimate, with data consistency and "
                   "a std map (--samples N); needs trained weights (--checkpoint DIR or shipped)")
    Options = LdmOptions
    steps = ("prior", "refine", "spread")  # consistency: on each sample, inside refine (before averaging)
    # The VAE (first stage 'vae') and the planes network (prior 'planes') are read from the same bundle when the
    # denoiser's record asks for them; the lossless Haar first stage has no weights.
    weights = ("denoiser",)
    preference = 2
    vae: AutoencoderKL3D  # or the Haar first stage, which offers the same encode/decode
    denoiser: LatentDenoiser
    latent: LatentConfig = LatentConfig()
    planes: Pipeline | None = None  # the planes prior (a Planes pipeline), when the denoiser starts from planes

    @classmethod
    def from_models(cls, vae: AutoencoderKL3D, denoiser: LatentDenoiser, options: LdmOptions | None = None,
                    latent: LatentConfig | None = None, planes: Pipeline | None = None) -> Ldm:
        """The pipeline around networks in hand (training validates through this); ``planes``: a 'planes' prior."""
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
        preset = loaded_preset(self.denoiser)
        assert preset is not None  # the denoiser was loaded from its file just above, which records its preset
        stage = build_first_stage(preset)
        if stage is None and not has_weights("vae", bundle):
            raise ThinsliceError(f"the denoiser in {bundle} works on a VAE's latents, but the folder has no "
                                 "vae.safetensors: put the VAE it was trained with beside it")
        # The Haar stage has the VAE's encode/decode interface (models.wavelet), so the sampler takes either.
        haar = cast(AutoencoderKL3D, stage.to(device)) if stage is not None else None
        self.vae = load_vae(bundle, device, preset=o.preset) if haar is None else haar
        if self.latent.prior == "planes":  # with samples it keeps its passes' disagreement for the std map
            self.planes = Planes.from_pretrained(bundle, device=o.device, precision=o.precision,
                                                 uncertainty=o.samples > 1)

    def prior(self, thick: Volume, spacing_mm: float, acquisition: Acquisition) -> Result:
        begun = prior_result(self.latent.prior, self.planes, thick, spacing_mm, acquisition)
        return Result(begun.volume, extras={k: v for k, v in begun.extras.items() if k == "spread"})

    def refine(self, thick: Volume, prior: Volume, acquisition: Acquisition) -> Result:
        """The mean of ``options.samples`` seeds refining ``prior``, each projected onto consistency (see the module
        docstring); with several, their std in ``extras["spread"]``, calibrated into ``extras["std"]``."""
        o, vae, denoiser = self.options, self.vae, self.denoiser
        factor = thick.slice_spacing / prior.slice_spacing
        _check(o, vae, denoiser, factor)
        timings: dict[str, float] = {}
        enc = _encode(vae, denoiser, prior, o, timings)
        plan, line = _plan(denoiser, vae, enc[0], o, factor, self.latent)
        acc, residuals = Welford(prior.slices_first().shape, o.samples > 1), []
        timings.update(sampling=0.0, decode=0.0, consistency=0.0)
        for index in tqdm(range(o.samples), desc="samples", disable=not o.progress or o.samples == 1, leave=False):
            x = _sample(vae, denoiser, enc, plan, o, o.seed + index, timings)
            if o.consistency:  # each sample, before averaging
                t0 = time.perf_counter()
                sample = thick.with_slices(x, prior.slice_spacing, 0.0, prior.slice_spacing)
                projected, residual = make_consistent(sample, thick, acquisition.profile, acquisition.thickness_mm)
                x = projected.slices_first()
                residuals.append(residual)
                timings["consistency"] += time.perf_counter() - t0
            acc.add(x)
        result = _finish(thick, prior, acc, {"ldm": line}, residuals, acquisition.profile)
        result.report["ldm_timing_s"] = ", ".join(f"{k} {v:.1f}" for k, v in timings.items())
        if o.progress and "consistency_hu" in result.report:
            log.info("ldm: data consistency %s", result.report["consistency_hu"])
        return result

    def spread(self, result: Result, thick: Volume, acquisition: Acquisition) -> Result:
        """The samples' spread (with the planes prior's passes' disagreement, when it served this input) calibrated
        into ``extras["std"]`` (docs/design/uncertainty.md)."""
        planes_spread = result.extras.pop("prior_spread", None)
        if planes_spread is not None and planes_spread.array.shape == result.extras["spread"].array.shape:
            result.extras["planes_spread"] = planes_spread
        k = round(thick.slice_spacing / result.volume.slice_spacing)
        attach_std(result, self.bundle(), "ldm", k, self.network_hashes(k), self.options.samples)
        return result

    def network_hashes(self, k: int) -> dict[str, str]:
        """Hashes of the networks a factor-``k`` run uses (denoiser, planes prior): what a calibration is valid for."""
        hashes = {"denoiser": weights_label(self.denoiser)}
        network_for = getattr(self.planes, "network_for", None)
        if self.latent.prior == "planes" and network_for is not None:
            network = network_for(k)
            name = network_kind("planes").file_name(k if network is not getattr(self.planes, "model", None) else None)
            hashes[name] = weights_label(network)
        return hashes
