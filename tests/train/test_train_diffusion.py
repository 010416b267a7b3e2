"""Diffusion trainer: pairs, loss going down, bundle export, exact resume, schedules, CFG dropout, cache, CLI."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch

from thinslice.checkpoints.bundle import load_denoiser, load_vae, save_model
from thinslice.checkpoints.files import record_of
from thinslice.cli.main import main
from thinslice.diffusion.sampling import make_schedule
from thinslice.errors import ThinsliceError
from thinslice.examples.pairs import PairSampler, make_pair, pair_margin
from thinslice.models.factory import build_denoiser, build_vae
from thinslice.presets import load_preset
from thinslice.train.diffusion import (
    DiffusionLoss,
    DiffusionTrainOptions,
    schedule_for_steps,
    train_diffusion,
)

VAL_CROP = (8, 32, 32)



@pytest.fixture(scope="module")
def vae_file(tmp_path_factory):
    folder = tmp_path_factory.mktemp("vae")
    torch.manual_seed(0)
    vae = build_vae("tiny")
    vae.set_scaling_factor(1.5)
    save_model(vae, "vae", "tiny", folder)
    return folder / "vae.safetensors"


def _opts(run_dir, vae_file, **kw) -> DiffusionTrainOptions:
    base = dict(run_dir=run_dir, vae=vae_file, preset="tiny", device="cpu", progress=False, val_crop=VAL_CROP,
                seed=0)
    base.update(kw)
    return DiffusionTrainOptions(**base)


# ---------------------------------------------------------------------------------------------------- pairs
def test_pairs_shapes_factors_and_alignment(thin_phantom) -> None:
    deg = load_preset("tiny").degradation
    sampler = PairSampler([thin_phantom], (8, 32, 32), 3, deg, seed=0)
    assert sampler.patch_size == (8 + 2 * pair_margin(max(deg.factors)), 32, 32)
    factors = []
    for _ in range(6):
        batch = sampler.next_batch()
        assert batch["hr"].shape == batch["lr"].shape == (3, 1, 8, 32, 32)
        assert batch["factor"].shape == (3,) and isinstance(batch["seed"], int)
        assert batch["hr"].min() >= -1 and batch["hr"].max() <= 1
        factors += batch["factor"].tolist()
        # The LR patch is a blurred version of the HR one: close but not equal.
        assert 0 < float((batch["hr"] - batch["lr"]).abs().mean()) < 0.1
    assert set(factors) <= set(deg.factors) and len(set(factors)) > 1
    # On a linear ramp every slab average sits exactly on the ramp and cubic B-splines reproduce lines: the
    # interpolated LR equals HR wherever the thick grid reaches (any phase): checks the slab/centre alignment.
    ramp = np.tile(np.linspace(-600, 600, 60, dtype=np.float32)[:, None, None], (1, 3, 3))
    for factor, phase in [(2.0, 1), (3.0, 2), (4.0, 0), (5.0, 4)]:
        hr, lr = make_pair(ramp, factor, "box", 20, phase)
        assert np.abs(hr - lr).max() < 1.0, (factor, phase)


def test_pair_sampler_resume_is_exact(thin_phantom) -> None:
    deg = load_preset("tiny").degradation
    a = PairSampler([thin_phantom], (8, 32, 32), 2, deg, seed=4)
    a.next_batch()
    state = a.state_dict()
    expected = [a.next_batch() for _ in range(2)]
    b = PairSampler([thin_phantom], (8, 32, 32), 2, deg, seed=99)
    b.load_state_dict(state)
    for want in expected:
        got = b.next_batch()
        assert got["seed"] == want["seed"]
        for key in ("hr", "lr", "factor"):
            assert torch.equal(got[key], want[key])


# ------------------------------------------------------------------------------------------ configuration
def test_schedules_and_no_control() -> None:
    small = load_preset("paper").diffusion  # the paper's 15-step schedule
    fast = schedule_for_steps(small, 4)
    assert (fast.num_steps, fast.min_noise, fast.kappa, fast.cfg_dropout) == (4, 0.2, small.kappa, small.cfg_dropout)
    assert schedule_for_steps(small, None) == small and schedule_for_steps(small, 15) == small
    tiny15 = schedule_for_steps(load_preset("tiny").diffusion, 15)
    assert (tiny15.num_steps, tiny15.min_noise) == (15, 0.04)
    with pytest.raises(ThinsliceError, match="at least 2"):
        schedule_for_steps(small, 1)
    p = load_preset("tiny")
    assert build_denoiser(p).control is not None
    assert build_denoiser(dataclasses.replace(p, control=dataclasses.replace(p.control, enabled=False))).control is None


class _Spy(torch.nn.Module):
    """Records the CFG drop masks the loss hands to the denoiser."""

    def __init__(self, inner) -> None:
        super().__init__()
        self.inner = inner
        self.masks: list[torch.Tensor] = []

    def forward(self, x, t, y, factor=None, drop_mask=None):  # noqa: ANN001
        self.masks.append(drop_mask.clone())
        return self.inner(x, t, y, factor, drop_mask=drop_mask)


def test_cfg_dropout_is_active_in_the_training_loss() -> None:
    preset = load_preset("tiny")
    denoiser = build_denoiser(preset)
    spy = _Spy(denoiser)
    loss_fn = DiffusionLoss(None, make_schedule(denoiser.cfg), preset.diffusion.cfg_dropout)
    latent = torch.randn(64, 4, 2, 4, 4)
    with torch.no_grad():
        for seed in range(10):
            batch = {"hr_latent": latent, "lr_latent": latent + 0.1, "factor": torch.full((64,), 2.0), "seed": seed}
            loss, _ = loss_fn({"denoiser": spy}, batch, 0)
            assert torch.isfinite(loss)
    rate = float(torch.cat(spy.masks).float().mean())
    assert preset.diffusion.cfg_dropout == 0.1 and 0.05 < rate < 0.16


# --------------------------------------------------------------------------------------------------- train
def _fixed_loss(denoiser, vae, thin_phantom) -> float:
    sampler = PairSampler([thin_phantom], (8, 32, 32), 4, load_preset("tiny").degradation, seed=123)
    loss_fn = DiffusionLoss(vae, make_schedule(denoiser.cfg), 0.0)
    with torch.no_grad():
        return float(np.mean([float(loss_fn({"denoiser": denoiser}, sampler.next_batch(), 0)[0]) for _ in range(3)]))


def test_training_lowers_the_loss_and_writes_a_bundle(tmp_path, vae_file, thin_phantom) -> None:
    run = tmp_path / "run"
    result = train_diffusion([thin_phantom], None, _opts(run, vae_file, max_steps=14, lr=3e-3, ema_decay=0.0,
                                                         val_every=7))
    vae = load_vae(run / "final")
    torch.manual_seed(0)
    initial = build_denoiser(dataclasses.replace(load_preset("tiny"), vae=vae.config))
    before = _fixed_loss(initial, vae, thin_phantom)
    after = _fixed_loss(result.models["denoiser"], vae, thin_phantom)
    assert after < 0.7 * before, (before, after)
    # RUN/final is a complete bundle: VAE copy + denoiser tied to it; best/ too.
    den = load_denoiser(run / "final")
    meta = record_of(den).metadata
    assert meta["vae_hash"] == record_of(vae).content_hash and meta["steps"] == "4"
    assert den.control is not None and den.cfg.num_steps == 4
    assert (run / "best" / "denoiser.safetensors").is_file() and (run / "best" / "vae.safetensors").is_file()
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    val = [r for r in rows if "val/psnr" in r]
    assert [r["step"] for r in val] == [7, 14] and all(np.isfinite(r["val/psnr_cubic_dc"]) for r in val)


def test_resume_gives_the_same_weights(tmp_path, vae_file, thin_phantom) -> None:
    kw = dict(max_steps=4, lr=1e-3, val_every=0)
    straight = train_diffusion([thin_phantom], None, _opts(tmp_path / "a", vae_file, **kw))
    train_diffusion([thin_phantom], None, _opts(tmp_path / "b", vae_file, stop_at_step=2, **kw))
    resumed = train_diffusion([thin_phantom], None, _opts(tmp_path / "b", vae_file, resume=True, **kw))
    want, got = straight.models["denoiser"].state_dict(), resumed.models["denoiser"].state_dict()
    for key in want:
        assert torch.equal(want[key], got[key]), key
    # Resuming with other settings is refused.
    with pytest.raises(ThinsliceError, match="started with steps"):
        train_diffusion([thin_phantom], None, _opts(tmp_path / "b", vae_file, resume=True, steps=15, **kw))


def test_fast_schedule_no_control_and_latent_cache(tmp_path, vae_file, thin_phantom) -> None:
    from thinslice.checkpoints.bundle import load_model
    from thinslice.checkpoints.files import read_metadata
    from thinslice.train.latents import build_latent_cache

    vae = load_model("vae", vae_file)
    cache = tmp_path / "cache"
    build_latent_cache([("thin", thin_phantom)], vae, record_of(vae).content_hash, cache, factors=[2.0],
                       tile=(16, 32, 32), progress=None)
    run = tmp_path / "fast"
    # tiny's own schedule has 4 steps, so 15 steps is the non-default one here (named denoiser-15step).
    train_diffusion([thin_phantom], None, _opts(run, vae_file, max_steps=2, steps=15, control=False, cache=cache,
                                                val_every=0))
    den = load_denoiser(run / "final", steps=15)
    assert den.cfg.num_steps == 15 and den.control is None
    # The run folder alone is a bundle (default denoiser = this schedule), plus the file to add to another bundle.
    assert load_denoiser(run / "final").cfg.num_steps == 15
    assert read_metadata(run / "final" / "denoiser-15step.safetensors")["steps"] == "15"
    # A cache from another VAE is refused.
    torch.manual_seed(1)
    save_model(build_vae("tiny"), "vae", "tiny", tmp_path / "othervae")
    other = tmp_path / "othervae" / "vae.safetensors"
    with pytest.raises(ThinsliceError, match="latent cache .* was made with VAE"):
        train_diffusion([thin_phantom], None, _opts(tmp_path / "x", other, max_steps=1, cache=cache))


@pytest.mark.slow  # about 10-50 s on 2 cores; `pytest -m 'not slow'` skips it in a quick loop
def test_cli_end_to_end(tmp_path, vae_file, thin_data_folder) -> None:
    data = thin_data_folder
    out = tmp_path / "run"
    args = ["train", "--data", str(data), "--vae", str(vae_file), "--preset", "tiny", "--out", str(out),
            "--max-steps", "3", "--device", "cpu", "--seed", "1"]
    assert main(args) == 0
    vae_hash = record_of(load_vae(out / "final")).content_hash
    assert record_of(load_denoiser(out / "final")).metadata["vae_hash"] == vae_hash
    assert main(args) == 2  # existing checkpoints without --resume: one-line error
    assert main([*args[:-2], "--steps", "4", "--resume"]) == 0  # tiny's default is 4 steps: same run
