"""Shared training engine: exact resume, checkpoints, best weights, schedule, device checks; patch sampler."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from thinslice.checkpoints.bundle import load_model, save_model
from thinslice.errors import ThinsliceError
from thinslice.examples.patches import PatchSampler
from thinslice.models.factory import build_vae
from thinslice.train.engine import EngineConfig, Trainer, list_checkpoints, make_accelerator, warmup_cosine
from thinslice.train.losses import VAELoss, VAELossWeights


def _trainer(run_dir, volumes, validate_fn=None, export_fn=None, **overrides) -> Trainer:
    torch.manual_seed(0)
    vae = build_vae("tiny")
    sampler = PatchSampler(volumes, (4, 16, 16), batch_size=2, seed=3)
    cfg = dict(run_dir=run_dir, max_steps=6, lr=1e-3, warmup_steps=2, ema_decay=0.9, checkpoint_every=2,
               log_every=1, val_every=2, seed=5, device="cpu", progress=False, best_metric="val/score")
    cfg.update(overrides)
    return Trainer({"vae": vae}, VAELoss(VAELossWeights(), (4, 16, 16)), sampler, EngineConfig(**cfg),
                   validate_fn=validate_fn, export_fn=export_fn)


def _flat_state(trainer: Trainer) -> dict[str, torch.Tensor]:
    state = {f"model.{k}": v.clone() for k, v in trainer.unwrapped("vae").state_dict().items()}
    state.update({f"ema.{k}": v.clone() for k, v in trainer.ema["vae"].state_dict().items()})
    return state


def test_resume_continues_exactly(tmp_path, thin_phantom):
    vols = [thin_phantom]
    # The validation draws torch random numbers too: resume must restore that stream as well.
    def validate(models, step):
        return {"val/score": float(torch.rand(()))}

    straight = _trainer(tmp_path / "a", vols, validate)
    straight.fit()
    first = _trainer(tmp_path / "b", vols, validate)
    first.fit(stop_at_step=3)
    assert [p.name for p in list_checkpoints(tmp_path / "b")] == ["step_000002", "step_000003"]
    seen = []

    def validate_resumed(models, step):
        seen.append(step)
        return validate(models, step)

    resumed = _trainer(tmp_path / "b", vols, validate_resumed)
    result = resumed.fit(resume=True)
    assert result.step == 6 and seen == [4, 6]  # really continued from step 3
    a, b = _flat_state(straight), _flat_state(resumed)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert straight.batches.state_dict() == resumed.batches.state_dict()
    assert straight.scheduler.get_last_lr() == resumed.scheduler.get_last_lr()
    # Only the last two checkpoints are kept; no temp folders are left behind.
    names = sorted(p.name for p in (tmp_path / "b" / "checkpoints").iterdir())
    assert names == ["step_000004", "step_000006"]


def test_existing_run_needs_resume_and_best_weights_are_exported(tmp_path, thin_phantom):
    scores = iter([1.0, 3.0, 2.0])

    def validate(models, step):
        return {"val/score": next(scores), "val/image": np.zeros((8, 8))}

    def export(models, out_dir):
        save_model(models["vae"], "vae", "tiny", out_dir / "vae.safetensors")

    trainer = _trainer(tmp_path, [thin_phantom], validate, export, ema_decay=None)
    result = trainer.fit()
    assert result.best == 3.0 and result.best_step == 4
    assert load_model("vae", tmp_path / "best" / "vae.safetensors") is not None
    assert (tmp_path / "final" / "vae.safetensors").is_file()
    with pytest.raises(ThinsliceError, match="--resume"):
        _trainer(tmp_path, [thin_phantom]).fit()


def test_warmup_cosine_schedule():
    f = warmup_cosine(warmup_steps=4, max_steps=14, min_ratio=0.1)
    assert [round(f(s), 3) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert f(9) == pytest.approx(0.55)
    assert f(14) == pytest.approx(0.1) and f(100) == pytest.approx(0.1)


def test_device_and_precision_errors(tmp_path):
    with pytest.raises(ThinsliceError, match="fp16 needs a GPU"):
        make_accelerator("cpu", "fp16", tmp_path)
    with pytest.raises(ThinsliceError, match="unknown --device"):
        make_accelerator("tpu", "no", tmp_path)
    if not torch.cuda.is_available():
        with pytest.raises(ThinsliceError, match="no CUDA GPU"):
            make_accelerator("cuda", "no", tmp_path)


def test_patch_sampler_body_bias_padding_and_state(thin_phantom):
    hu = thin_phantom.slices_first()
    sampler = PatchSampler([thin_phantom], (8, 24, 24), batch_size=3, seed=1)
    assert sampler.sources[0].hu.dtype == np.int16
    state = sampler.state_dict()
    batch = sampler.next_batch()
    assert batch["hu"].shape == (3, 1, 8, 24, 24) and batch["hu"].dtype == torch.float32
    for info, patch in zip(batch["info"], batch["hu"], strict=True):
        d, h, w = info.corner
        np.testing.assert_allclose(patch[0].numpy(), np.rint(hu[d:d + 8, h:h + 24, w:w + 24]))
        assert float((patch < -950).float().mean()) <= 0.8
        assert info.slice_spacing_mm == pytest.approx(1.25)
    sampler.load_state_dict(state)
    again = sampler.next_batch()
    assert torch.equal(again["hu"], batch["hu"])
    # A volume thinner than the patch is padded with air.
    small = PatchSampler([thin_phantom.with_slices(hu[:3], 1.25, 0.0)], (8, 16, 16), batch_size=1, seed=0)
    patch = small.next_batch()["hu"][0, 0]
    assert patch.shape == (8, 16, 16) and float(patch[3:].max()) == -1024.0


def test_vae_training_with_patch_gan(tmp_path, thin_phantom):
    import json

    from thinslice.presets import load_preset
    from thinslice.train.vae import VAETrainOptions, train_vae

    opts = VAETrainOptions(run_dir=tmp_path, preset=load_preset("tiny"), max_steps=4, device="cpu", progress=False,
                           loss=VAELossWeights(adversarial=0.1, adversarial_start=2))
    result = train_vae([thin_phantom], None, opts)
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    adv_steps = [r["step"] for r in rows if "train/d_loss" in r]
    assert adv_steps == [3, 4]  # on from optimiser step index 2 (the third step)
    assert result.step == 4 and (tmp_path / "final" / "vae.safetensors").is_file()


def test_ema_warms_up_so_short_runs_follow_the_model():
    from torch.optim.swa_utils import AveragedModel

    from thinslice.train.engine import warmup_ema_fn

    model = torch.nn.Linear(1, 1, bias=False)
    with torch.no_grad():
        model.weight.fill_(0.0)
    ema = AveragedModel(model, multi_avg_fn=warmup_ema_fn(0.999), use_buffers=True)
    for _ in range(200):  # the model walks from 0 to 200
        with torch.no_grad():
            model.weight.add_(1.0)
        ema.update_parameters(model)
    lag = 200.0 - float(ema.module.weight.detach())
    # torch's plain EMA at 0.999 would still be at about 18 (lag ~180); with the warm-up it lags about 20 steps
    assert 5.0 < lag < 40.0


def test_run_settings_apply_and_check_overrides(tmp_path):
    from thinslice.presets import load_preset
    from thinslice.train.engine import RunOptions, run_settings

    base = load_preset("tiny").train_vae
    tc, seed, ema = run_settings(base, RunOptions(run_dir=tmp_path, max_steps=7, lr=1e-3, seed=3, ema_decay=0.0))
    assert (tc.max_steps, tc.lr, seed, ema) == (7, 1e-3, 3, 0.0)
    assert tc.batch_size == base.batch_size and base.max_steps != 7  # the preset itself is untouched
    tc, seed, ema = run_settings(base, RunOptions(run_dir=tmp_path))  # nothing given on the command line
    assert (tc.max_steps, seed, ema) == (base.max_steps, base.seed, base.ema_decay)
    with pytest.raises(ThinsliceError, match="--max-steps must be at least 1"):
        run_settings(base, RunOptions(run_dir=tmp_path, max_steps=0))
    with pytest.raises(ThinsliceError, match="--lr must be positive"):
        run_settings(base, RunOptions(run_dir=tmp_path, lr=-1.0))


def test_resume_skips_a_damaged_checkpoint_and_logs_no_row_twice(tmp_path, thin_phantom, caplog):
    import json

    vols = [thin_phantom]
    straight = _trainer(tmp_path / "a", vols, lambda models, step: {"val/score": 1.0})
    straight.fit()
    first = _trainer(tmp_path / "b", vols, lambda models, step: {"val/score": 1.0})
    first.fit(stop_at_step=5)  # checkpoints at steps 4 and 5; rows logged up to step 5
    for weights in list_checkpoints(tmp_path / "b")[-1].glob("*.safetensors"):
        weights.write_bytes(weights.read_bytes()[:100])  # a copy cut short
    resumed = _trainer(tmp_path / "b", vols, lambda models, step: {"val/score": 1.0})
    with caplog.at_level("INFO", logger="thinslice"):
        assert resumed.fit(resume=True).step == 6
    printed = caplog.text
    assert "step_000005 is damaged" in printed and "resumed from" in printed and "step_000004" in printed
    a, b = _flat_state(straight), _flat_state(resumed)
    assert all(torch.equal(a[k], b[k]) for k in a)  # steps 5 and 6 redone exactly
    rows = [json.loads(r) for r in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()]
    train_steps = [r["step"] for r in rows if "train/loss" in r]
    assert train_steps == sorted(set(train_steps)) == [1, 2, 3, 4, 5, 6]
