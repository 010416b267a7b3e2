"""The latent diffusion model on the lossless wavelet first stage, started from the planes estimate (residual
latents): pairs, residual scale, training, the bundle it exports and the pipeline that runs it."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from thinslice.checkpoints.bundle import load_denoiser, save_model
from thinslice.checkpoints.files import loaded_preset
from thinslice.degrade import degrade
from thinslice.degrade.pairs import simulate_pair
from thinslice.errors import ThinsliceError
from thinslice.evaluate.metrics import psnr
from thinslice.examples.prior_pairs import PriorPairSampler, build_pairs, encode_whole, residual_scale
from thinslice.infer import upsample
from thinslice.infer.ldm import Ldm, LdmOptions
from thinslice.models.factory import build_first_stage, build_planes
from thinslice.models.wavelet import HaarFirstStage
from thinslice.presets import load_preset
from thinslice.train.diffusion import DiffusionTrainOptions, train_diffusion


def _planes_bundle(folder) -> None:
    torch.manual_seed(0)
    save_model(build_planes("tiny").eval(), "planes", "tiny", folder)


def _cubic_prior(thick, spacing, profile):
    return upsample(thick, spacing, "cubic")


def test_pairs_hold_prior_and_truth_latents_and_the_scale_makes_the_residual_unit(thin_phantom) -> None:
    stage = HaarFirstStage()
    pairs = build_pairs([("ph", thin_phantom)], [(4.0, "gaussian"), (2.0, "box")], _cubic_prior, stage)
    assert [p.factor for p in pairs] == [4.0, 2.0]
    thick, target = simulate_pair(thin_phantom, factor=4.0, profile="gaussian")
    truth = encode_whole(stage, target.slices_first())
    np.testing.assert_array_equal(pairs[0].truth, truth)
    assert pairs[0].prior.shape == truth.shape and pairs[0].prior.shape[0] == 8
    s = residual_scale(pairs)
    rms = np.sqrt(np.mean(np.concatenate([(p.truth.astype(np.float32) - p.prior).ravel() for p in pairs]) ** 2))
    assert s * rms == pytest.approx(1.0, rel=1e-3)
    sampler = PriorPairSampler(pairs, (4, 8, 8), batch_size=3, seed=5)
    state = sampler.state_dict()
    batch = sampler.next_batch()
    assert batch["hr_latent"].shape == (3, 8, 4, 8, 8) and batch["lr_latent"].shape == (3, 8, 4, 8, 8)
    sampler.load_state_dict(state)
    assert torch.equal(sampler.next_batch()["hr_latent"], batch["hr_latent"])  # exact resume


@pytest.mark.slow  # about 10-50 s on 2 cores; `pytest -m 'not slow'` skips it in a quick loop
def test_train_on_wavelet_latents_from_the_planes_prior_then_upsample(tmp_path, thin_phantom) -> None:
    planes = tmp_path / "planes"
    _planes_bundle(planes)
    (planes / "planes-x4.safetensors").write_bytes((planes / "planes.safetensors").read_bytes())
    run = tmp_path / "run"
    opts = DiffusionTrainOptions(run_dir=run, preset="tiny", max_steps=4, device="cpu", first_stage="haar",
                                 prior="planes", planes=str(planes), degradations=((4.0, "gaussian"),),
                                 progress=False)
    result = train_diffusion([thin_phantom], [thin_phantom], opts)
    bundle = run / "final"
    assert {p.name for p in bundle.iterdir()} >= {"denoiser.safetensors", "planes.safetensors",
                                                  "planes-x4.safetensors"}  # the prior's networks travel along
    assert not (bundle / "vae.safetensors").exists()  # the Haar stage has no weights
    latent = loaded_preset(load_denoiser(bundle)).latent
    assert (latent.first_stage, latent.prior) == ("haar", "planes") and latent.residual_scale > 0
    summary = json.loads((bundle / "summary.json").read_text())
    assert summary["residual_scale"] == pytest.approx(latent.residual_scale) and result.step == 4

    thick = degrade(thin_phantom, factor=4, profile="gaussian")
    prior = upsample(thick, thin_phantom.slice_spacing, "planes", checkpoint=str(planes))
    out = upsample(thick, thin_phantom.slice_spacing, "ldm", checkpoint=str(bundle), samples=2)
    assert out.array.shape == prior.array.shape
    # Four steps of training leave the residual model near zero: the sample stays near the planes estimate.
    assert psnr(out.array, prior.array) > 40.0


def test_an_untrained_residual_model_returns_its_prior_exactly(thin_phantom) -> None:
    """Zero-initialised outputs predict a zero residual, so the sample is the prior, whatever the noise."""
    import dataclasses

    from thinslice.infer.pipeline import Acquisition
    from thinslice.models.factory import build_denoiser

    preset = load_preset("tiny")
    latent = dataclasses.replace(preset.latent, first_stage="haar", prior="cubic-dc", residual_scale=50.0)
    preset = dataclasses.replace(preset, latent=latent)
    denoiser = build_denoiser(preset).eval()
    pipeline = Ldm.from_models(build_first_stage(preset), denoiser, LdmOptions(progress=False, consistency=False),
                               latent)
    thick = degrade(thin_phantom, factor=4, profile="gaussian")
    out = pipeline(thick, thin_phantom.slice_spacing).volume
    prior = pipeline.prior(thick, thin_phantom.slice_spacing, Acquisition.of(thick)).volume
    np.testing.assert_allclose(out.array, prior.array, atol=1e-3)


def test_init_fine_tunes_from_a_bundle_and_refuses_another_architecture(tmp_path, thin_phantom) -> None:
    planes = tmp_path / "planes"
    _planes_bundle(planes)
    common = {"preset": "tiny", "device": "cpu", "first_stage": "haar", "prior": "planes", "planes": str(planes),
              "degradations": ((4.0, "gaussian"),), "progress": False}
    train_diffusion([thin_phantom], [thin_phantom], DiffusionTrainOptions(run_dir=tmp_path / "a", max_steps=3,
                                                                          **common))
    first = load_denoiser(tmp_path / "a" / "final")
    train_diffusion([thin_phantom], [thin_phantom], DiffusionTrainOptions(
        run_dir=tmp_path / "b", max_steps=1, lr=1e-12, init=str(tmp_path / "a" / "final"), **common))
    second = load_denoiser(tmp_path / "b" / "final")
    assert loaded_preset(second).latent.residual_scale == loaded_preset(first).latent.residual_scale
    for (name, a), b in zip(first.state_dict().items(), second.state_dict().values(), strict=True):
        assert torch.allclose(a.float(), b.float(), atol=1e-5), name
    with pytest.raises(ThinsliceError, match="another architecture"):
        train_diffusion([thin_phantom], [thin_phantom], DiffusionTrainOptions(
            run_dir=tmp_path / "c", max_steps=1, control=False, init=str(tmp_path / "a" / "final"), **common))


def test_channels_last_sampling_gives_the_same_latent() -> None:
    """The CPU layout switch is a speed change only."""
    from thinslice.diffusion.sampling import make_schedule, reverse_process
    from thinslice.models.factory import build_denoiser

    preset = load_preset("tiny")
    torch.manual_seed(0)
    denoiser = build_denoiser(preset).eval()
    with torch.no_grad():  # zero-initialised outputs would hide a layout bug: give every weight a value
        for p in denoiser.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    y = torch.randn(1, preset.latent_channels, 4, 16, 16)
    def sample_latent(y: torch.Tensor) -> torch.Tensor:
        return reverse_process(make_schedule(denoiser.cfg), lambda x, t, yy: denoiser.guided(x, t, yy, 4.0), y,
                               torch.Generator().manual_seed(3))

    a = sample_latent(y)
    assert not denoiser.channels_last
    denoiser.use_channels_last()
    assert denoiser.channels_last
    b = sample_latent(y.contiguous(memory_format=torch.channels_last_3d))
    torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
