"""``--method ldm`` end to end with a tiny randomly initialised model bundle (no trained weights needed)."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch

from thinslice.checkpoints.bundle import (
    DEFAULT_BUNDLE_DIR,
    load_denoiser,
    load_vae,
    save_model,
)
from thinslice.cli.main import main
from thinslice.data.phantom import make_chest_phantom
from thinslice.degrade import degrade
from thinslice.degrade.operators import thick_profile_operator
from thinslice.diffusion.resshift import ResShiftConfig
from thinslice.errors import ThinsliceError
from thinslice.infer import target_grid_volume, upsample
from thinslice.infer.consistency import consistency_residual_hu
from thinslice.infer.ldm import Ldm, LdmOptions
from thinslice.infer.upsample import get_method, run_method
from thinslice.io import read_volume, write_volume
from thinslice.io.writers import std_path_for
from thinslice.models.denoiser import LatentDenoiser
from thinslice.models.factory import build_denoiser
from thinslice.models.vae import AutoencoderKL3D
from thinslice.models.windows import estimate_sampling_bytes, latent_window
from thinslice.presets import load_preset

SPACING = 1.25


def _randomise_zero_layers(model: torch.nn.Module) -> None:
    """Zero-initialised output layers make an untrained denoiser ignore its noise; give them small weights."""
    with torch.no_grad():
        for p in model.parameters():
            if torch.count_nonzero(p) == 0:
                p.normal_(0.0, 0.05)



@pytest.fixture(scope="module")
def bundle(tmp_path_factory: pytest.TempPathFactory):
    torch.manual_seed(0)
    preset = load_preset("tiny")
    folder = tmp_path_factory.mktemp("bundle")
    vae_hash = save_model(AutoencoderKL3D(preset.vae), "vae", preset, folder)
    denoiser = build_denoiser(preset)
    _randomise_zero_layers(denoiser)
    save_model(denoiser, "denoiser", preset, folder, {"vae_hash": vae_hash})
    fast = LatentDenoiser(denoiser.unet, denoiser.control, ResShiftConfig.fast(num_steps=3))
    fast.load_state_dict(denoiser.state_dict())
    save_model(fast, "denoiser", preset, folder, {"vae_hash": vae_hash})
    return folder


@pytest.fixture(scope="module")
def thick():
    thin = make_chest_phantom(shape=(24, 32, 32), spacing=(4.5, 4.5, SPACING), seed=2)
    return degrade(thin, factor=2, profile="gaussian")


@pytest.fixture(scope="module")
def whole(bundle, thick):
    return upsample(thick, SPACING, "ldm", checkpoint=str(bundle), seed=0, progress=False)


def test_output_is_on_the_thin_grid_and_consistent(whole, thick) -> None:
    assert whole.grid_differences(target_grid_volume(thick, SPACING)) == []
    assert np.all(np.isfinite(whole.array))
    a = thick_profile_operator(thick, SPACING, "gaussian")
    assert consistency_residual_hu(whole.slices_first(), thick.slices_first(), a)["max_abs"] < 1.0
    assert "whole latent" in whole.metadata["ldm"] and "after mean" in whole.metadata["consistency_hu"]


def test_seed_reproducibility(bundle, thick, whole) -> None:
    again = upsample(thick, SPACING, method="ldm", checkpoint=str(bundle), seed=0, progress=False)
    np.testing.assert_array_equal(again.array, whole.array)
    other = upsample(thick, SPACING, "ldm", checkpoint=str(bundle), seed=1, progress=False)
    assert np.abs(other.array - whole.array).max() > 1.0


def test_samples_give_a_std_map_that_the_cli_writes(bundle, thick, tmp_path) -> None:
    result = run_method(thick, SPACING, "ldm", checkpoint=str(bundle), samples=2, progress=False)
    std = result.extras["std"]
    assert std.grid_differences(result.volume) == []
    assert std.array.min() >= 0 and std.array.max() > 0
    assert "std" not in run_method(thick, SPACING, "ldm", checkpoint=str(bundle), progress=False).extras
    src, out = tmp_path / "thick.nii.gz", tmp_path / "out.nii.gz"
    write_volume(thick, src)
    assert main(["upsample", str(src), str(out), "--spacing", str(SPACING), "--method", "ldm", "--checkpoint",
                 str(bundle), "--samples", "2", "--option", "progress=false"]) == 0
    written = read_volume(tmp_path / "out_std.nii.gz")
    assert written.grid_differences(read_volume(out)) == [] and written.array.max() > 0


def run_ldm(thick, spacing, vae, denoiser, options):  # noqa: ANN001, ANN201
    """The ldm pipeline around networks in hand (its prior: the denoiser's, cubic here)."""
    return Ldm.from_models(vae, denoiser, options)(thick, spacing)


class _ConditionCopy(LatentDenoiser):
    """A deterministic, local stand-in: predicts x0 = y, so any sampler returns the LR latent exactly."""

    def forward(self, x_t_scaled, t, y, factor=None, drop_mask=None):  # noqa: ANN001, ARG002
        return y


def test_windowed_sampling_matches_whole_for_a_deterministic_model(bundle, thick) -> None:
    vae = load_vae(bundle)
    base = load_denoiser(bundle)
    copy = _ConditionCopy(base.unet, base.control, base.cfg)
    whole = run_ldm(thick, SPACING, vae, copy, LdmOptions(consistency=False))
    windows = run_ldm(thick, SPACING, vae, copy, LdmOptions(patch_size=(16, 16, 32), consistency=False))
    assert "latent windows" in windows.report["ldm"] and "whole latent" in whole.report["ldm"]
    np.testing.assert_allclose(windows.volume.array, whole.volume.array, atol=0.05)
    # With the real (random) model, windows run with per-window seeds and give a finite volume on the same grid.
    real = run_ldm(thick, SPACING, vae, base, LdmOptions(patch_size=(16, 16, 32), seed=3))
    assert real.volume.grid_differences(whole.volume) == [] and np.all(np.isfinite(real.volume.array))
    operator = thick_profile_operator(thick, SPACING, "gaussian")
    after = consistency_residual_hu(real.volume.slices_first(), thick.slices_first(), operator)
    assert after["max_abs"] < 1.0 and "after mean" in real.volume.metadata["consistency_hu"]


def test_residual_decode_gives_cubic_when_the_model_adds_nothing(bundle, thick) -> None:
    """cubic + D(x0) - D(y) with x0 = y is the cubic image: the VAE's own error cancels; direct decoding keeps it."""
    vae = load_vae(bundle)
    base = load_denoiser(bundle)
    copy = _ConditionCopy(base.unet, base.control, base.cfg)
    cubic = upsample(thick, SPACING, method="cubic")
    residual = run_ldm(thick, SPACING, vae, copy, LdmOptions(consistency=False, decode="residual"))
    direct = run_ldm(thick, SPACING, vae, copy, LdmOptions(consistency=False, decode="direct"))
    np.testing.assert_allclose(residual.volume.array, cubic.array, atol=1e-2)
    assert np.abs(direct.volume.array - cubic.array).mean() > 10.0  # an untrained VAE is far from identity
    assert "residual decode" in residual.volume.metadata["ldm"] and "decode_lr" in residual.report["ldm_timing_s"]
    with pytest.raises(ThinsliceError, match="unknown decode mode"):
        run_ldm(thick, SPACING, vae, copy, LdmOptions(decode="sideways"))


def test_bf16_precision_is_close_to_fp32(bundle, thick) -> None:
    fp32 = upsample(thick, SPACING, "ldm", checkpoint=str(bundle), seed=1, progress=False, decode="direct")
    bf16 = upsample(thick, SPACING, "ldm", checkpoint=str(bundle), seed=1, progress=False, decode="direct",
                        precision="bf16")
    assert "bf16" in bf16.metadata["ldm"]
    spread = float(np.abs(fp32.array - fp32.array.mean()).mean())
    assert np.abs(bf16.array - fp32.array).mean() < 0.1 * spread
    with pytest.raises(ThinsliceError, match="unknown precision"):
        upsample(thick, SPACING, "ldm", checkpoint=str(bundle), progress=False, precision="fp8")


def test_steps_pick_the_matching_denoiser(bundle, thick) -> None:
    assert load_denoiser(bundle, steps=3).cfg.num_steps == 3
    assert load_denoiser(bundle).cfg.num_steps == load_preset("tiny").diffusion.num_steps
    out = upsample(thick, SPACING, "ldm", checkpoint=str(bundle), steps=3, progress=False)
    assert "3 steps" in out.metadata["ldm"]
    with pytest.raises(ThinsliceError, match="option steps must be int"):  # text is parsed by the CLI only
        upsample(thick, SPACING, "ldm", checkpoint=str(bundle), steps="3", progress=False)
    with pytest.raises(ThinsliceError, match="no denoiser for 15 steps"):
        upsample(thick, SPACING, "ldm", checkpoint=str(bundle), steps=15, progress=False)


def test_wrong_preset_and_wrong_pairing_are_refused(bundle, thick, tmp_path) -> None:
    with pytest.raises(ThinsliceError, match="preset 'tiny'"):
        upsample(thick, SPACING, "ldm", checkpoint=str(bundle), preset="small", progress=False)
    # A denoiser trained on another VAE's latents.
    other = tmp_path / "other"
    preset = load_preset("tiny")
    torch.manual_seed(5)
    save_model(AutoencoderKL3D(preset.vae), "vae", preset, other)
    save_model(build_denoiser(preset), "denoiser", preset, other, {"vae_hash": "0123456789abcdef"})
    with pytest.raises(ThinsliceError, match="trained on latents of VAE"):
        upsample(thick, SPACING, "ldm", checkpoint=str(other), progress=False)
    # A file of the wrong kind under the denoiser's name.
    (other / "denoiser.safetensors").write_bytes((other / "vae.safetensors").read_bytes())
    with pytest.raises(ThinsliceError, match="'vae' weights, but 'denoiser'"):
        load_denoiser(other)


def test_missing_weights_give_a_clear_error(tmp_path, thick, bundle) -> None:
    with pytest.raises(ThinsliceError, match="no trained weights for 'ldm'.*missing denoiser.safetensors"):
        get_method("ldm").bundle(tmp_path)
    lone = tmp_path / "lone"
    lone.mkdir()
    shutil.copyfile(bundle / "denoiser.safetensors", lone / "denoiser.safetensors")
    with pytest.raises(ThinsliceError, match="works on a VAE's latents, but the folder has no vae.safetensors"):
        upsample(thick, SPACING, "ldm", checkpoint=str(lone), progress=False)
    with pytest.raises(ThinsliceError, match="not found"):
        upsample(thick, SPACING, "ldm", checkpoint=str(tmp_path / "nowhere"), progress=False)
    if not get_method("ldm").has_weights():
        with pytest.raises(ThinsliceError, match=f"no trained weights for 'ldm' found in {DEFAULT_BUNDLE_DIR}"):
            upsample(thick, SPACING, method="ldm")


def test_std_path_naming() -> None:
    assert std_path_for("/a/ct.nii.gz").name == "ct_std.nii.gz"
    assert std_path_for("/a/ct.nrrd").name == "ct_std.nrrd"
    assert std_path_for("/a/series/").name == "series_std"


def test_cli_end_to_end_with_uncertainty(bundle, thick, tmp_path) -> None:
    src = tmp_path / "thick.nii.gz"
    write_volume(thick, src)
    out = tmp_path / "thin.nii.gz"
    std = tmp_path / "thin_std.nii.gz"  # written beside OUT without being asked for
    code = main(["upsample", str(src), str(out), "--method", "ldm", "--checkpoint", str(bundle), "--spacing",
                 str(SPACING), "--samples", "2", "--seed", "4", "--device", "cpu", "--option", "progress=false"])
    assert code == 0
    result, std_map = read_volume(out), read_volume(std)
    assert result.grid_differences(target_grid_volume(thick, SPACING)) == []
    assert std_map.grid_differences(result) == [] and std_map.array.min() >= 0


def test_window_choice_fits_the_memory_budget(bundle) -> None:
    denoiser = load_denoiser(bundle)
    latent = (64, 64, 64)
    need = estimate_sampling_bytes(denoiser, latent)
    train_patch = load_preset("tiny").train_diffusion.patch_size
    assert latent_window(denoiser, (1, 2, 2), latent, None, need, train_patch=train_patch) is None  # whole fits
    window = latent_window(denoiser, (1, 2, 2), latent, None, need // 3, train_patch=train_patch)
    assert window is not None and estimate_sampling_bytes(denoiser, window) <= need // 3
    assert all(w % m == 0 for w, m in zip(window, denoiser.size_multiple, strict=True))
    # A forced patch size (image voxels) is converted to latent voxels and clipped to the latent.
    assert latent_window(denoiser, (1, 2, 2), latent, (16, 40, 400), need) == (16, 20, 64)
