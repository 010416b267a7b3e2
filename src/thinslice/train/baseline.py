"""Train the supervised CNN baseline (``thinslice train-baseline``) on the same on-the-fly pairs and engine.

:class:`~thinslice.models.baseline.ResidualCNN3D` maps the cubic-upsampled simulated thick patch to the thin patch
(L1 in model range). It shows what a plain supervised network achieves through the same data pipeline as the
diffusion model, and is the network ``thinslice upsample --method cnn`` runs (optionally adapted to each input,
see :mod:`thinslice.infer.cnn_adapt`). ``RUN_DIR/final`` and ``RUN_DIR/best`` hold ``baseline.safetensors``.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from thinslice.checkpoints.bundle import save_model
from thinslice.examples.pairs import PairSampler
from thinslice.infer.cnn import Cnn
from thinslice.io.volume import Volume
from thinslice.models.baseline import ResidualCNN3D
from thinslice.models.factory import build_baseline
from thinslice.presets import Preset, load_preset
from thinslice.train.diffusion import default_val_crop
from thinslice.train.engine import (
    RunOptions,
    Trainer,
    TrainResult,
    check_run_record,
    engine_config,
    fit_run,
    run_settings,
)
from thinslice.train.validation import make_pipeline_validate, validation_cases

log = logging.getLogger(__name__)


@dataclass(kw_only=True)
class BaselineTrainOptions(RunOptions):
    """``val_crop`` default: DEFAULT_VAL_CROP, at most the training patch. ``gradient_checkpointing`` is accepted
    for a uniform CLI; the small CNN does not need it."""

    init: str | Path | None = None  # start from existing baseline weights (fine-tuning)


def l1_loss(models: dict[str, nn.Module], batch: dict[str, Any], step: int) -> tuple[torch.Tensor, dict[str, float]]:
    """L1 between the refined cubic patch and the thin patch (model range); logs the cubic input's own L1."""
    pred = models["baseline"](batch["lr"])
    loss = F.l1_loss(pred.float(), batch["hr"].float())
    return loss, {"l1_cubic": float(F.l1_loss(batch["lr"], batch["hr"]).detach())}


def initial_baseline(preset: Preset, init: str | Path | None, resume: bool) -> ResidualCNN3D:
    """A fresh network, or ``init`` weights (a baseline.safetensors or a folder holding one) when not resuming."""
    model = build_baseline(preset)
    if init and not resume:
        from thinslice.checkpoints.bundle import load_model
        from thinslice.checkpoints.files import record_of

        loaded = load_model("baseline", init, preset=preset)
        model.load_state_dict(loaded.state_dict())
        log.info("train-baseline: initialised from %s", getattr(record_of(loaded), "path", init))
    return model


def train_baseline(train: Sequence[Volume | str | Path], val: Sequence[Volume | str | Path] | None,
                   opts: BaselineTrainOptions) -> TrainResult:
    """Train the CNN baseline; ``result.models['baseline']`` holds the final (EMA) weights."""
    preset = load_preset(opts.preset)
    tc, seed, ema_decay = run_settings(preset.train_baseline, opts)
    run_dir = Path(opts.run_dir)
    record = {"kind": "baseline", "preset": preset.name, "baseline": asdict(preset.baseline),
              "train_baseline": asdict(tc), "seed": seed}
    check_run_record(run_dir, record, opts.resume, ("baseline",))

    if opts.gradient_checkpointing:
        log.warning("train-baseline: --gradient-checkpointing has no effect on the small CNN (its memory is small)")
    torch.manual_seed(seed)
    model = initial_baseline(preset, opts.init, opts.resume)
    d, h, w = (int(p) for p in tc.patch_size)
    patch = (d, h, w)
    sampler = PairSampler(train, patch, tc.batch_size, preset.degradation, seed=seed)
    val_volumes = list(val) if val else list(train)
    if not val:
        log.warning("train-baseline: no --val volumes; validation PSNR is measured on crops of the training volumes")
    crop = opts.val_crop or default_val_crop(patch)
    cases = validation_cases(val_volumes, size=max(crop[1:]), depth=crop[0])
    precision = "bf16" if opts.mixed_precision == "bf16" else "fp32"
    validate = make_pipeline_validate(cases, lambda models: Cnn.from_model(models["baseline"], precision=precision),
                                      "val/truth_cubic-dc_cnn")

    def export(eval_models: dict[str, nn.Module], out_dir: Path) -> None:
        save_model(eval_models["baseline"], "baseline", preset, out_dir)

    trainer = Trainer({"baseline": model}, l1_loss, sampler, engine_config(run_dir, tc, opts, seed, ema_decay),
                      validate_fn=validate, export_fn=export)
    return fit_run(trainer, opts, record, preset)
