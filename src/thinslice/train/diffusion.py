"""Train the latent diffusion model (``thinslice train``): ResShift + IRControlNet on first-stage latents, on the
shared engine.

The first stage is frozen (eval mode, no gradients, outside the optimiser and the checkpoints): the lossless Haar
transform (``latent.first_stage = "haar"``, the small preset's) or a trained VAE. Batches come from one of three
samplers:

- **prior pairs** (Haar stage, or any prior other than cubic): every training volume is degraded once per factor and
  profile, the prior (planes or cubic-dc) is computed on the whole volume as inference does, and both latents are
  held in memory (:mod:`thinslice.examples.prior_pairs`); the model then learns residual latents, scaled by 1 / RMS of
  the residual (recorded with the weights, :class:`~thinslice.presets.LatentConfig`);
- **pairs encoded on the fly** (VAE, cubic prior): :class:`~thinslice.examples.pairs.PairSampler` HR and
  cubic-upsampled LR patches, a fresh degradation per example, encoded by the VAE each step;
- **a latent cache** (``--cache``, made by ``thinslice encode``): no VAE work per step, only the cached
  factors/profiles.

The loss is :func:`~thinslice.diffusion.sampling.diffusion_loss` (uniform timestep, classifier-free-guidance dropout of
the network's condition), with its timesteps/noise/dropout drawn from a generator seeded by the batch, so resume is
exact. ``--init DIR`` starts from a bundle's denoiser (same architecture and latent space).

Validation runs the shipped ldm pipeline (:class:`thinslice.infer.ldm.Ldm`: its prior, residual decoding, data
consistency, one fixed seed) on fixed held-out crops (factor 4, gaussian; :mod:`thinslice.train.validation`), so
"best" is picked on the number users get: PSNR in HU against the truth and against cubic-dc (``val/psnr_gain`` =
model - cubic-dc), plus the first stage's own reconstruction PSNR of the truth.

The exported folders ``RUN_DIR/final`` and ``RUN_DIR/best`` are model bundles (:mod:`thinslice.checkpoints.bundle`):
``denoiser.safetensors`` recording the preset (with its latent section), the steps and the first stage's hash, plus
what the bundle needs to run alone: a copy of the VAE as ``vae.safetensors``, or the planes weights of a planes
prior. A schedule other than the preset's (e.g. ``--steps 4`` with a 15-step preset) is also written as
``denoiser-<T>step.safetensors``, the name under which it sits next to another bundle's default denoiser
(``upsample --steps T`` picks it).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch
from safetensors import safe_open
from torch import nn

from thinslice.checkpoints.bundle import load_denoiser, load_model, save_model
from thinslice.checkpoints.files import record_of
from thinslice.device import resolve_device
from thinslice.diffusion.resshift import ResShiftConfig
from thinslice.diffusion.sampling import diffusion_loss, make_schedule
from thinslice.errors import ThinsliceError
from thinslice.evaluate.metrics import psnr
from thinslice.examples.pairs import PairSampler
from thinslice.examples.prior_pairs import CropBatches, PriorPairSampler, build_pairs, fits, residual_scale
from thinslice.infer.ldm import Ldm, LdmOptions, latent_config
from thinslice.infer.pipeline import Acquisition, Pipeline
from thinslice.infer.upsample import prior_estimate
from thinslice.io.atomic import atomic_output
from thinslice.io.volume import Volume
from thinslice.models.denoiser import LatentDenoiser
from thinslice.models.factory import build_denoiser, build_haar
from thinslice.models.kinds import network_kind
from thinslice.models.tiling import decode_volume, encode_volume
from thinslice.models.vae import AutoencoderKL3D
from thinslice.presets import ControlConfig, DegradationConfig, LatentConfig, Preset, TrainConfig, load_preset
from thinslice.train.engine import (
    RunOptions,
    Trainer,
    TrainResult,
    check_run_record,
    engine_config,
    fit_run,
    run_settings,
)
from thinslice.train.latents import LatentCache
from thinslice.train.validation import ValCase, make_pipeline_validate, validation_cases

log = logging.getLogger(__name__)

DEFAULT_VAL_CROP = (24, 96, 96)
VAL_SEED = 20240


@dataclass(kw_only=True)
class DiffusionTrainOptions(RunOptions):
    """``val_crop`` default: DEFAULT_VAL_CROP, at most the training patch."""

    vae: str | Path | None = None  # weights file, train-vae run folder or bundle folder (first stage 'vae')
    steps: int | None = None  # ResShift steps T (None: the preset's; 4: the paper's fast schedule)
    control: bool = True
    cache: Path | None = None
    first_stage: str | None = None  # vae or haar (None: the preset's latent.first_stage)
    prior: str | None = None  # cubic, cubic-dc or planes (None: the preset's latent.prior)
    planes: str | Path | None = None  # bundle with planes.safetensors for the planes prior (None: shipped)
    degradations: tuple[tuple[float, str], ...] | None = None  # prior pairs (None: preset factors x profiles)
    prior_workers: int = 1  # threads that make the prior pairs
    init: str | Path | None = None  # start from this bundle's denoiser (fine-tuning; same architecture and latents)


# -------------------------------------------------------------------------------------------- configuration
def schedule_for_steps(base: ResShiftConfig, steps: int | None) -> ResShiftConfig:
    """Diffusion config for ``--steps``: the preset's for None or its own T, the paper's fast 4-step schedule
    (min_noise 0.2) for 4, else the paper's T-step schedule (min_noise 0.04); other settings from the preset."""
    if steps is None or steps == base.num_steps:
        return dataclasses.replace(base)
    if steps < 2:
        raise ThinsliceError(f"--steps must be at least 2, got {steps}")
    if base.method != "resshift":
        raise ThinsliceError("--steps picks a ResShift schedule; a DDIM model takes its step count at sampling")
    if steps == 4:
        fast = ResShiftConfig.fast()
        return dataclasses.replace(base, num_steps=fast.num_steps, min_noise=fast.min_noise)
    return dataclasses.replace(base, num_steps=int(steps), min_noise=ResShiftConfig().min_noise)


def default_val_crop(patch: tuple[int, ...]) -> tuple[int, int, int]:
    """Validation crop: :data:`DEFAULT_VAL_CROP`, but no larger than the training patch (cheap on small presets)."""
    d, h, w = (min(int(c), int(p)) for c, p in zip(DEFAULT_VAL_CROP, patch, strict=True))
    return d, h, w


def check_patch_fits(patch: tuple[int, int, int], vae: AutoencoderKL3D, multiple: tuple[int, int, int]) -> None:
    """The training patch must map onto whole latent voxels that the UNet can down-sample."""
    need = tuple(s * m for s, m in zip(vae.total_stride, multiple, strict=True))
    if any(p % n for p, n in zip(patch, need, strict=True)):
        raise ThinsliceError(
            f"training patch {tuple(patch)} must be a multiple of {need} (VAE stride x UNet size multiple); "
            "fix train_diffusion.patch_size in the preset"
        )


# ----------------------------------------------------------------------------------------------- batches
class LatentCropSampler(CropBatches):
    """:class:`~thinslice.examples.prior_pairs.CropBatches` from the (factor, profile) pairs of a latent cache.

    Crops are read straight from the safetensors files (memory-mapped slices), so a large cache costs no RAM.
    """

    def __init__(self, cache: LatentCache, crop: tuple[int, int, int], batch_size: int, seed: int = 0) -> None:
        self.cache = cache
        self.entries: list[tuple[Path, tuple[int, ...], float]] = []
        for entry in cache.pairs():
            path = cache.folder / entry.file
            with safe_open(str(path), framework="pt") as f:
                shape = tuple(f.get_slice("lr").get_shape())
            if fits(shape, crop):
                self.entries.append((path, shape, float(entry.factor or 0.0)))
        if not self.entries:
            raise ThinsliceError(
                f"latent cache {cache.folder} has no LR/HR pair of at least {tuple(crop)} latent voxels; make one "
                "with thinslice encode --factors ... (pairs are needed, not only HR latents)"
            )
        super().__init__([shape for _, shape, _ in self.entries], crop, batch_size, seed)

    def read(self, index: int, window: tuple[slice, ...]) -> tuple[torch.Tensor, torch.Tensor, float]:
        path, _, factor = self.entries[index]
        with safe_open(str(path), framework="pt") as f:
            return f.get_slice("hr")[window], f.get_slice("lr")[window], factor


# ------------------------------------------------------------------------------------------------- loss
class DiffusionLoss:
    """``loss_fn`` for the engine: latents (encoded on the fly or from the cache) -> :func:`diffusion_loss`.

    The schedule and the dropout rate are passed explicitly, so the (possibly DDP-wrapped) denoiser is only called,
    never asked for attributes.
    """

    def __init__(self, vae: AutoencoderKL3D | None, schedule: Any, cfg_dropout: float,
                 residual_scale: float = 0.0) -> None:
        self.vae = vae
        self.schedule = schedule
        self.cfg_dropout = float(cfg_dropout)
        self.residual_scale = float(residual_scale)

    @torch.no_grad()
    def latents(self, batch: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
        if "hr_latent" in batch:
            return batch["hr_latent"].float(), batch["lr_latent"].float()
        if self.vae is None:
            raise ValueError("image batches need the VAE")
        return self.vae.encode_latent(batch["hr"]).float(), self.vae.encode_latent(batch["lr"]).float()

    def __call__(self, models: dict[str, nn.Module], batch: dict[str, Any], step: int
                 ) -> tuple[torch.Tensor, dict[str, float]]:
        x0, y = self.latents(batch)
        condition = None
        if self.residual_scale > 0:  # residual latents: s (x0 - y) diffused from zero, the network told y
            x0, y, condition = (x0 - y) * self.residual_scale, torch.zeros_like(y), y
        generator = torch.Generator(device="cpu").manual_seed(int(batch["seed"]))
        told, denoiser, factor = y if condition is None else condition, models["denoiser"], batch["factor"]

        def model_fn(x: torch.Tensor, t: torch.Tensor, _y: torch.Tensor, drop: torch.Tensor) -> torch.Tensor:
            return denoiser(x, t, told, factor, drop_mask=drop)

        loss = diffusion_loss(self.schedule, model_fn, x0, y, cfg_dropout=self.cfg_dropout, generator=generator)
        return loss, {}


# ------------------------------------------------------------------------------------------- validation
def make_validate_fn(vae: AutoencoderKL3D, cases: list[ValCase], seed: int = VAL_SEED,
                     latent: LatentConfig | None = None, planes: Any = None):
    """Validation through the shipped ldm pipeline (its prior, residual decoding, data consistency; one fixed seed),
    plus the first stage's own reconstruction PSNR of the truths (its ceiling under direct decoding; fixed, as the
    first stage is frozen)."""
    options = LdmOptions(seed=seed, progress=False)
    validate = make_pipeline_validate(
        cases, lambda models: Ldm.from_models(vae, models["denoiser"], options, latent or LatentConfig(), planes),
        "val/truth_cubic-dc_ldm")
    ceiling = float(np.mean([_vae_psnr(vae, case.truth.slices_first()) for case in cases]))

    def with_ceiling(models: dict[str, nn.Module], step: int) -> dict[str, Any]:
        return {**validate(models, step), "val/psnr_vae_ceiling": ceiling}

    return with_ceiling


@torch.no_grad()
def _vae_psnr(vae: AutoencoderKL3D, hu: np.ndarray) -> float:
    latent = encode_volume(vae, hu)
    return psnr(decode_volume(vae, latent, out_shape=hu.shape), hu)


# ----------------------------------------------------------------------------------------------- export
def copy_atomic(src: Path, dst: Path) -> None:
    """Copy a file via a temporary file in the destination folder (never a half-written bundle file)."""
    src, dst = Path(src), Path(dst)
    if dst.exists() and os.path.samefile(src, dst):
        return
    with atomic_output(dst) as tmp:
        shutil.copyfile(src, tmp)


# ------------------------------------------------------------------------------------------------- train
def load_frozen_vae(vae: str | Path | AutoencoderKL3D | None) -> AutoencoderKL3D:
    """The VAE, frozen; it must have been loaded from a weights file (its record ties the denoiser to it)."""
    if vae is None:
        raise ThinsliceError("the 'vae' first stage needs --vae (a trained VAE); or train on the lossless wavelet "
                             "first stage with --first-stage haar")
    model = vae if isinstance(vae, AutoencoderKL3D) else cast(AutoencoderKL3D, load_model("vae", vae))
    record = record_of(model)
    if record is None or not record.content_hash:
        raise ThinsliceError("the VAE must come from a thinslice weights file (its hash ties the denoiser to it)")
    model.requires_grad_(False)
    return model.eval()


def _batches(cache_dir: Path | None, train: Sequence[Volume | str | Path], degradation: DegradationConfig,
             batch_size: int, vae: AutoencoderKL3D, patch: tuple[int, int, int], seed: int) -> Any:
    """Training batches: latent crops from ``cache_dir`` (``--cache``, made with this VAE), else pairs encoded on the
    fly."""
    if not cache_dir:
        return PairSampler(train, patch, batch_size, degradation, seed=seed)
    record = record_of(vae)
    cache = LatentCache.load(cache_dir, record.content_hash if record else "")
    if abs(cache.scaling_factor - vae.scaling_factor) > 1e-6 * max(1.0, abs(vae.scaling_factor)):
        raise ThinsliceError(
            f"latent cache {cache_dir} was made with latent scaling factor {cache.scaling_factor:.6g} but the VAE "
            f"has {vae.scaling_factor:.6g}; rebuild it with thinslice encode"
        )
    d, h, w = (p // s for p, s in zip(patch, vae.total_stride, strict=True))
    return LatentCropSampler(cache, (d, h, w), batch_size, seed=seed)


@dataclass
class _FirstStage:
    """The frozen first stage of a run, with what ties the denoiser to it (content hash, weights file)."""

    model: Any
    hash: str
    path: Path | None
    config: Any  # the VAE's config for the record (None: the Haar stage, described by latent)


def _first_stage(latent: LatentConfig, vae_source: str | Path | None) -> _FirstStage:
    if latent.first_stage == "haar":
        stage = build_haar(latent)
        stage.requires_grad_(False)
        return _FirstStage(stage.eval(), "haar-" + "x".join(map(str, latent.wavelet_strides)), None, None)
    vae = load_frozen_vae(vae_source)
    record = record_of(vae)
    assert record is not None  # load_frozen_vae checked it
    return _FirstStage(vae, record.content_hash, record.path, vae.config)


def _init_denoiser(init: str | Path | None, resume: bool) -> LatentDenoiser | None:
    """The ``--init`` bundle's denoiser (None without ``--init`` or when resuming: a resumed run continues from its
    own checkpoint)."""
    if not init or resume:
        return None
    return load_denoiser(Ldm.locate_weights(str(init)))


def _load_init(denoiser: nn.Module, init: nn.Module, where: object) -> None:
    """Copy ``init``'s weights into the fresh ``denoiser``, refusing another architecture in one line."""
    mine, theirs = denoiser.state_dict(), init.state_dict()
    if {k: tuple(v.shape) for k, v in mine.items()} != {k: tuple(v.shape) for k, v in theirs.items()}:
        raise ThinsliceError(f"--init {where}: its denoiser has another architecture than this preset's (unet, "
                             "control, latent channels); pass --preset with its architecture or train from scratch")
    denoiser.load_state_dict(theirs)
    log.info("initialised the denoiser from %s", where)


def _latent_setting(latent: LatentConfig, first_stage: str | None, prior: str | None) -> LatentConfig:
    """The preset's latent section with the run's overrides (first stage, prior); the residual scale is set later,
    from the data."""
    return dataclasses.replace(latent, first_stage=first_stage or latent.first_stage, prior=prior or latent.prior,
                               residual_scale=0.0)


def _named_volumes(train: Sequence[Volume | str | Path]) -> list[tuple[str, Volume]]:
    from thinslice.io import read_volume

    return [(f"volume{i}", v) if isinstance(v, Volume) else (Path(v).name, read_volume(v))
            for i, v in enumerate(train)]


def _prior_pipeline(latent: LatentConfig, planes: str | Path | None, device: str) -> Pipeline | None:
    """The planes pipeline that makes the prior (None for the interpolation priors), on the training device."""
    if latent.prior != "planes":
        return None
    from thinslice.infer.planes import Planes

    where = str(resolve_device(None if device == "auto" else device))
    return Planes.from_pretrained(planes, device=where, precision="bf16")


def _prior_fn(latent: LatentConfig, planes: Pipeline | None):
    """(thick, thin spacing, profile) -> the prior, as the ldm pipeline computes it at inference."""
    def prior(thick: Volume, spacing: float, profile: str) -> Volume:
        return prior_estimate(latent.prior, planes, thick, spacing, Acquisition.of(thick, profile))

    return prior


def _prior_batches(train: Sequence[Volume | str | Path], degradations: Sequence[tuple[float, str]], workers: int,
                   planes: Pipeline | None, stage: _FirstStage, latent_crop: tuple[int, int, int],
                   setting: tuple[LatentConfig, int, int]):
    """Prior pairs of every training volume and degradation, their residual scale, and the crop sampler."""
    latent, batch_size, seed = setting
    pairs = build_pairs(_named_volumes(train), degradations, _prior_fn(latent, planes), stage.model, workers)
    scale = latent.residual_scale or residual_scale(pairs)
    latent = dataclasses.replace(latent, residual_scale=scale)
    log.info("%d prior pairs, residual scale %.4g", len(pairs), latent.residual_scale)
    return PriorPairSampler(pairs, latent_crop, batch_size, seed), latent


@dataclass(frozen=True)
class _Plan:
    """A diffusion run resolved once from its options; the steps of :func:`train_diffusion` take their parts."""

    preset: Preset
    tc: TrainConfig
    seed: int
    ema_decay: float | None
    latent: LatentConfig
    init: nn.Module | None  # the --init denoiser
    stage: _FirstStage
    diffusion: ResShiftConfig  # the schedule --steps picks
    control: ControlConfig  # the preset's, or off with --no-control
    record: dict[str, Any]  # train_config.json: what a resumed run must match


def _plan(opts: DiffusionTrainOptions) -> _Plan:
    """The preset with the run's overrides, the ``--init`` weights and the frozen first stage; a resumed run must
    match what it started with."""
    preset = load_preset(opts.preset)
    tc, seed, ema_decay = run_settings(preset.train_diffusion, opts)
    latent = _latent_setting(preset.latent, opts.first_stage, opts.prior)
    init = _init_denoiser(opts.init, opts.resume)
    if init is not None:  # fine-tuning keeps the latent space the weights were trained in
        latent = dataclasses.replace(latent, residual_scale=latent_config(init).residual_scale)
    stage = _first_stage(latent, opts.vae)
    diffusion_cfg = schedule_for_steps(preset.diffusion, opts.steps)
    control_cfg = preset.control if opts.control else dataclasses.replace(preset.control, enabled=False)
    record = {"kind": "diffusion", "preset": preset.name, "vae_hash": stage.hash,
              "vae_path": str(stage.path) if stage.path else None, "steps": diffusion_cfg.num_steps,
              "control": control_cfg.enabled, "unet": dataclasses.asdict(preset.unet),
              "cache": str(opts.cache) if opts.cache else None, "first_stage": latent.first_stage,
              "prior": latent.prior, "train_diffusion": dataclasses.asdict(tc), "seed": seed}
    check_run_record(Path(opts.run_dir), record, opts.resume,
                     ("vae_hash", "steps", "control", "unet", "first_stage", "prior"))
    return _Plan(preset, tc, seed, ema_decay, latent, init, stage, diffusion_cfg, control_cfg, record)


def train_diffusion(train: Sequence[Volume | str | Path], val: Sequence[Volume | str | Path] | None,
                    opts: DiffusionTrainOptions) -> TrainResult:
    """Train the latent denoiser; ``result.models['denoiser']`` holds the final (EMA) weights."""
    plan = _plan(opts)
    preset, tc, seed, latent, stage = plan.preset, plan.tc, plan.seed, plan.latent, plan.stage
    d, h, w = (int(p) for p in tc.patch_size)
    patch = (d, h, w)
    ld, lh, lw = (p // s for p, s in zip(patch, stage.model.total_stride, strict=True))
    latent_crop = (ld, lh, lw)
    planes = None
    if latent.first_stage == "haar" or latent.prior != "cubic":
        planes = _prior_pipeline(latent, opts.planes, opts.device)
        degradations = opts.degradations or tuple((float(f), p) for f in preset.degradation.factors
                                                  for p in preset.degradation.profiles)
        batches, latent = _prior_batches(train, degradations, opts.prior_workers, planes, stage, latent_crop,
                                         (latent, tc.batch_size, seed))
    else:
        batches = _batches(opts.cache, train, preset.degradation, tc.batch_size, stage.model, patch, seed)
    record_preset = dataclasses.replace(preset, vae=stage.config or preset.vae, control=plan.control, latent=latent)
    build_preset = dataclasses.replace(record_preset, diffusion=plan.diffusion)

    torch.manual_seed(seed)
    denoiser = build_denoiser(build_preset)
    if plan.init is not None:
        _load_init(denoiser, plan.init, opts.init)
    if opts.gradient_checkpointing:
        denoiser.set_gradient_checkpointing(True)
    check_patch_fits(patch, stage.model, denoiser.size_multiple)

    val_volumes = list(val) if val else list(train)
    if not val:
        log.warning("no --val volumes; validation PSNR is measured on crops of the training volumes")
    val_crop = opts.val_crop or default_val_crop(patch)
    cases = validation_cases(val_volumes, size=max(val_crop[1:]), depth=val_crop[0])
    validate = make_validate_fn(stage.model, cases, latent=latent, planes=planes)
    export = _exporter(stage, record_preset, plan.diffusion.num_steps != preset.diffusion.num_steps, planes)
    loss_fn = DiffusionLoss(stage.model, make_schedule(denoiser.cfg), plan.diffusion.cfg_dropout, latent.residual_scale)
    trainer = Trainer({"denoiser": denoiser}, loss_fn, batches,
                      engine_config(Path(opts.run_dir), tc, opts, seed, plan.ema_decay),
                      validate_fn=validate, export_fn=export)
    stage.model.to(trainer.device)
    summary = {"steps": plan.diffusion.num_steps, "control": plan.control.enabled, "vae_hash": stage.hash,
               "first_stage": latent.first_stage, "prior": latent.prior, "residual_scale": latent.residual_scale}
    return fit_run(trainer, opts, plan.record, build_preset, summary)


def _exporter(stage: _FirstStage, record_preset: Preset, non_default_steps: bool, planes: Pipeline | None):
    """``export_fn``: the denoiser, and beside it what the bundle needs to run alone (the VAE file, or the planes
    weights of a planes prior)."""
    def export(eval_models: dict[str, nn.Module], out_dir: Path) -> None:
        denoiser_out = eval_models["denoiser"]
        meta = {"vae_hash": stage.hash}
        save_model(denoiser_out, "denoiser", record_preset, out_dir, meta)
        if non_default_steps:
            # Also the folder's default denoiser, so that this run's folder alone is a complete bundle; the
            # denoiser-<T>step file is the one to copy next to another bundle's default model.
            save_model(denoiser_out, "denoiser", record_preset, out_dir / network_kind("denoiser").file, meta)
        if stage.path is not None:
            copy_atomic(stage.path, out_dir / network_kind("vae").file)
        if planes is not None:  # the all-factor planes network and any per-factor ones (planes-x<k>)
            for source in sorted(planes.bundle().glob("planes*.safetensors")):
                copy_atomic(source, out_dir / source.name)

    return export
