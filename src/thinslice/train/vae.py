"""Train the 3D VAE on random CT patches (``thinslice train-vae``), on the shared engine.

After training, the latent ``scaling_factor`` (1 / std of the posterior means over training patches) is estimated
and stored in the final weights, so the diffusion model sees unit-variance latents.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import cast

import numpy as np
import torch
from torch import nn

from thinslice.checkpoints.bundle import save_model
from thinslice.checkpoints.files import load_state_strict, read_metadata, read_weights
from thinslice.errors import ThinsliceError
from thinslice.evaluate.metrics import psnr
from thinslice.examples.patches import PatchSampler, _source_from
from thinslice.io.atomic import write_text_atomic
from thinslice.io.volume import Volume
from thinslice.models.factory import build_vae
from thinslice.models.intensity import hu_to_model
from thinslice.models.tiling import decode_volume, encode_volume
from thinslice.models.vae import NON_ARCHITECTURE_FIELDS, AutoencoderKL3D
from thinslice.presets import Preset, load_preset, preset_from_dict
from thinslice.train.engine import EngineConfig, RunOptions, Trainer, TrainResult, run_settings
from thinslice.train.losses import VAELoss, VAELossWeights, make_discriminator

log = logging.getLogger(__name__)

# Window for the TensorBoard slice images (HU): lung to bone.
_IMG_WINDOW = (-1000.0, 1000.0)


@dataclass(kw_only=True)
class VAETrainOptions(RunOptions):
    """``val_crop`` default: twice the training patch."""

    init: str | None = None  # thinslice VAE weights or a diffusers 2D AutoencoderKL folder / hub id
    loss: VAELossWeights = dataclasses.field(default_factory=VAELossWeights)
    scaling_patches: int = 32


def _val_crops(volumes: Sequence[Volume | str | Path], crop: tuple[int, int, int]) -> list[tuple[str, np.ndarray]]:
    """Central crops (slices first, HU) of the validation volumes: fast, and always on the body."""
    out = []
    for i, item in enumerate(volumes):
        src = _source_from(item, i)
        hu = src.hu
        starts = [max(0, (n - c) // 2) for n, c in zip(hu.shape, crop, strict=True)]
        sl = tuple(slice(s, s + c) for s, c in zip(starts, crop, strict=True))
        out.append((src.name, hu[sl].astype(np.float32)))
    return out


def _window(img: np.ndarray) -> np.ndarray:
    lo, hi = _IMG_WINDOW
    return np.clip((img - lo) / (hi - lo), 0.0, 1.0)


def make_validate_fn(crops: list[tuple[str, np.ndarray]], tile: tuple[int, int, int]):
    def validate(models: dict[str, nn.Module], step: int) -> dict:
        vae = cast(AutoencoderKL3D, models["vae"])  # the engine's eval networks: the VAE itself, unwrapped
        psnrs, maes, image = [], [], None
        for _name, hu in crops:
            latent = encode_volume(vae, hu, tile=tile)
            recon = decode_volume(vae, latent, out_shape=hu.shape, tile=tile)
            psnrs.append(psnr(recon, hu))
            maes.append(float(np.mean(np.abs(np.clip(recon, -1024, 3071) - np.clip(hu, -1024, 3071)))))
            if image is None:
                mid = hu.shape[0] // 2
                image = np.concatenate([_window(hu[mid]), _window(recon[mid])], axis=1)
        results: dict = {"val/psnr": float(np.mean(psnrs)), "val/mae_hu": float(np.mean(maes))}
        if image is not None:
            results["val/slice_original_vs_recon"] = image
        return results

    return validate


@torch.no_grad()
def estimate_scaling_factor(vae: AutoencoderKL3D, sampler: PatchSampler, num_patches: int, seed: int) -> float:
    """1 / std of posterior means over ``num_patches`` training patches (own generator: the run's RNG is untouched)."""
    rng_state = sampler.state_dict()
    sampler.rng = np.random.default_rng(seed + 7919)
    device = next(vae.parameters()).device
    values = []
    vae.eval()
    try:
        for _ in range(num_patches):
            patch, _info = sampler.draw_patch()
            x = torch.from_numpy(hu_to_model(patch))[None, None].to(device)
            values.append(vae.encode(x)[0].float().flatten().cpu())
    finally:
        sampler.load_state_dict(rng_state)
    std = float(torch.cat(values).std())
    if not math.isfinite(std) or std <= 0:
        raise ThinsliceError("latent std is zero or not finite; the VAE did not train (check the data and the loss)")
    return 1.0 / std


def initialise_from(vae: AutoencoderKL3D, init: str) -> str:
    """``--init``: thinslice VAE weights (same architecture) or a diffusers 2D AutoencoderKL folder / hub id."""
    path = Path(init)
    if path.is_file() and path.suffix == ".safetensors":
        meta = read_metadata(path)
        if meta.get("thinslice_kind") == "vae":
            load_state_strict(vae, read_weights(path, meta), str(path))
            return f"initialised from thinslice VAE weights {path}"
        raise ThinsliceError(f"{path} is not thinslice VAE weights; for a diffusers model pass its folder")
    from thinslice.models.pretrained import import_diffusers_autoencoder

    return import_diffusers_autoencoder(vae, init).summary()


def _check_run_preset(run_dir: Path, preset: Preset, resume: bool) -> None:
    """A resumed run must use the preset it started with."""
    saved = run_dir / "preset.json"
    if resume and saved.is_file():
        old = preset_from_dict(json.loads(saved.read_text()))
        arch = [f.name for f in dataclasses.fields(old.vae) if f.name not in NON_ARCHITECTURE_FIELDS]
        if any(getattr(old.vae, k) != getattr(preset.vae, k) for k in arch):
            raise ThinsliceError(f"{run_dir} was started with preset '{old.name}'; pass --preset {old.name} to resume")


def train_vae(train: Sequence[Volume | str | Path], val: Sequence[Volume | str | Path] | None,
              opts: VAETrainOptions) -> TrainResult:
    """Train a VAE; returns the engine result (``models['vae']`` = final weights with the scaling factor set)."""
    preset = load_preset(opts.preset)
    tc, seed, ema_decay = run_settings(preset.train_vae, opts)
    run_dir = Path(opts.run_dir)
    _check_run_preset(run_dir, preset, opts.resume)

    torch.manual_seed(seed)
    vae = build_vae(preset)
    vae.config.gradient_checkpointing = bool(opts.gradient_checkpointing)
    models: dict[str, nn.Module] = {"vae": vae}
    if opts.init and not opts.resume:
        log.info(initialise_from(vae, opts.init))
    if opts.loss.adversarial > 0:
        models["disc"] = make_discriminator(tc.patch_size)

    sampler = PatchSampler(train, tc.patch_size, tc.batch_size, seed=seed)
    val_volumes = list(val) if val else list(train)
    if not val:
        log.warning("train-vae: no --val volumes; validation PSNR is measured on crops of the training volumes")
    d, h, w = (2 * p for p in tc.patch_size)
    crop = opts.val_crop or (d, h, w)
    validate = make_validate_fn(_val_crops(val_volumes, crop), tile=tc.patch_size)

    def export(eval_models: dict[str, nn.Module], out_dir: Path) -> None:
        save_model(eval_models["vae"], "vae", preset, out_dir / "vae.safetensors")

    cfg = EngineConfig(
        run_dir=run_dir, max_steps=tc.max_steps, lr=tc.lr, weight_decay=tc.weight_decay, betas=(0.5, 0.9)
        if opts.loss.adversarial > 0 else (0.9, 0.999), warmup_steps=tc.warmup_steps, grad_clip=1.0,
        ema_decay=ema_decay or None, val_every=tc.val_every, checkpoint_every=tc.checkpoint_every,
        log_every=tc.log_every, seed=seed, device=opts.device, mixed_precision=opts.mixed_precision,
        best_metric="val/psnr", best_mode="max", find_unused_parameters=False, progress=opts.progress,
    )
    trainer = Trainer(models, VAELoss(opts.loss, tc.patch_size), sampler, cfg, validate_fn=validate,
                      export_fn=export, trainable=list(models))
    if trainer.is_main:
        record = preset.to_dict()
        record["train_vae"] = dataclasses.asdict(tc)
        write_text_atomic(run_dir / "preset.json", json.dumps(record, indent=1))
    result = trainer.fit(resume=opts.resume, stop_at_step=opts.stop_at_step, time_limit_s=opts.time_limit_s)
    if result.step >= tc.max_steps and trainer.is_main:
        final_vae = cast(AutoencoderKL3D, result.models["vae"])
        factor = estimate_scaling_factor(final_vae, sampler, opts.scaling_patches, seed)
        final_vae.set_scaling_factor(factor)
        digest = save_model(final_vae, "vae", preset, run_dir / "final" / "vae.safetensors")
        best_path = run_dir / "best" / "vae.safetensors"
        if best_path.is_file():  # the best weights get their own scaling factor
            from thinslice.checkpoints.bundle import load_model

            best_vae = cast(AutoencoderKL3D, load_model("vae", best_path)).to(next(final_vae.parameters()).device)
            best_vae.set_scaling_factor(estimate_scaling_factor(best_vae, sampler, opts.scaling_patches, seed))
            save_model(best_vae, "vae", preset, best_path)
        summary = {"step": result.step, "scaling_factor": factor, "weights_hash": digest,
                   "best_val_psnr": result.best, "best_step": result.best_step,
                   **{k: v for k, v in result.last_logs.items() if isinstance(v, float)}}
        write_text_atomic(run_dir / "final" / "summary.json", json.dumps(summary, indent=1))
        log.info(f"train-vae: final weights {run_dir / 'final' / 'vae.safetensors'} (scaling factor {factor:.4f}, "
              f"best val PSNR {result.best if result.best is not None else float('nan'):.2f} dB)")
    return result
