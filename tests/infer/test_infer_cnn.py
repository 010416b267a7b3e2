"""``--method cnn``: the residual CNN baseline over whole volumes in Gaussian-blended windows."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from thinslice.checkpoints.bundle import load_baseline, save_model
from thinslice.data.phantom import make_chest_phantom
from thinslice.degrade import degrade
from thinslice.degrade.operators import thick_profile_operator
from thinslice.errors import ThinsliceError
from thinslice.infer import target_grid_volume, upsample
from thinslice.infer.cnn import refine_cnn
from thinslice.infer.consistency import consistency_residual_hu
from thinslice.models.baseline import ResidualCNN3D
from thinslice.models.intensity import HU_MAX, HU_MIN
from thinslice.presets import load_preset

SPACING = 1.25



@pytest.fixture(scope="module")
def thick():
    thin = make_chest_phantom(shape=(24, 32, 32), spacing=(4.5, 4.5, SPACING), seed=6)
    return degrade(thin, factor=3, profile="box")


def _bundle(folder, trained: bool):
    preset = load_preset("tiny")
    torch.manual_seed(0)
    model = ResidualCNN3D(preset.baseline)
    if trained:  # stand-in for training: a non-zero last layer
        with torch.no_grad():
            model.tail.weight.normal_(0.0, 0.05)
    save_model(model, "baseline", preset, folder)
    return folder


def test_untrained_cnn_reproduces_cubic(tmp_path, thick) -> None:
    folder = _bundle(tmp_path, trained=False)
    out = upsample(thick, SPACING, method="cnn", checkpoint=str(folder), consistency=False)
    cubic = upsample(thick, SPACING, method="cubic")
    assert out.grid_differences(target_grid_volume(thick, SPACING)) == []
    np.testing.assert_allclose(out.array, np.clip(cubic.array, HU_MIN, HU_MAX), atol=1e-2)
    assert out.metadata["upsample"] == f"cnn to {SPACING:g} mm"
    # Data consistency is on by default: the output then reproduces the thick slices (gaussian profile assumed).
    default = upsample(thick, SPACING, method="cnn", checkpoint=str(folder))
    a = thick_profile_operator(thick, SPACING, "gaussian")
    assert consistency_residual_hu(default.slices_first(), thick.slices_first(), a)["max_abs"] < 1.0


def test_sliding_windows_cover_the_volume(tmp_path, thick) -> None:
    model = load_baseline(_bundle(tmp_path, trained=True))
    lr = upsample(thick, SPACING, method="cubic").slices_first()
    whole = refine_cnn(model, lr, roi=lr.shape)
    # Two windows along the slices (starts 0 and 8), whole in-plane: slices covered by one window only must
    # match the whole-volume result exactly; the overlap is a Gaussian blend of the two.
    windows = refine_cnn(model, lr, roi=(16, 32, 32))
    assert windows.shape == whole.shape == lr.shape
    assert np.all(np.isfinite(windows))
    assert np.abs(whole - np.clip(lr, HU_MIN, HU_MAX)).max() > 1.0  # the network changes the volume
    np.testing.assert_allclose(windows[:8], whole[:8], atol=1e-2)
    np.testing.assert_allclose(windows[16:], whole[16:], atol=1e-2)
    small = refine_cnn(model, lr, roi=(8, 16, 16))
    assert small.shape == lr.shape and np.all(np.isfinite(small))


def test_cnn_with_data_consistency(tmp_path, thick) -> None:
    folder = _bundle(tmp_path, trained=True)
    out = upsample(thick, SPACING, method="cnn", checkpoint=str(folder), consistency=True, profile="box",
                   patch_size=(16, 16, 16))
    a = thick_profile_operator(thick, SPACING, "box")
    assert consistency_residual_hu(out.slices_first(), thick.slices_first(), a)["max_abs"] < 1.0
    assert "box profile" in out.metadata["consistency_hu"]


def test_cnn_errors(tmp_path, thick) -> None:
    with pytest.raises(ThinsliceError, match="no trained weights for 'cnn'.*baseline.safetensors"):
        upsample(thick, SPACING, method="cnn", checkpoint=str(tmp_path))
    folder = _bundle(tmp_path, trained=False)
    with pytest.raises(ThinsliceError, match="option consistency must be bool"):  # text is the CLI's to parse
        upsample(thick, SPACING, method="cnn", checkpoint=str(folder), consistency="false")
    with pytest.raises(ThinsliceError, match="preset 'tiny'"):
        upsample(thick, SPACING, method="cnn", checkpoint=str(folder), preset="small")
    with pytest.raises(ThinsliceError, match="does not use option"):
        upsample(thick, SPACING, method="cnn", checkpoint=str(folder), samples=2)


def test_cli_cnn_with_adaptation(tmp_path, thick) -> None:
    from thinslice.cli.main import main
    from thinslice.io import read_volume, write_volume

    folder = _bundle(tmp_path / "bundle", trained=True)
    src, plain, adapted = tmp_path / "thick.nii.gz", tmp_path / "plain.nii.gz", tmp_path / "adapted.nii.gz"
    write_volume(thick, src, dtype="float32")
    common = ["--method", "cnn", "--checkpoint", str(folder), "--spacing", str(SPACING), "--dtype", "float32"]
    assert main(["upsample", str(src), str(plain), *common]) == 0
    assert main(["upsample", str(src), str(adapted), *common, "--adapt", "--adapt-steps", "3", "--seed", "1"]) == 0
    plain_vol, adapted_vol = read_volume(plain), read_volume(adapted)
    assert adapted_vol.grid_differences(plain_vol) == []
    assert np.abs(adapted_vol.array - plain_vol.array).max() > 0.01  # fine-tuning changed the network's output


def test_auto_method_prefers_shipped_weights(tmp_path, thick, monkeypatch, capsys) -> None:
    from thinslice.checkpoints import bundle as bundle_mod
    from thinslice.cli.main import main
    from thinslice.infer.upsample import default_method
    from thinslice.io import read_volume, write_volume

    monkeypatch.setattr(bundle_mod, "DEFAULT_BUNDLE_DIR", tmp_path / "shipped")
    (tmp_path / "shipped").mkdir()
    assert default_method() == "cubic"  # nothing shipped: interpolation
    _bundle(tmp_path / "shipped", trained=True)
    assert default_method() == "cnn"
    manifest = tmp_path / "shipped" / bundle_mod.MANIFEST_FILE
    manifest.write_text('{"default_method": "cubic", "why": "cnn did not beat cubic on the benchmark"}')
    assert default_method() == "cubic"  # weights shipped, but the benchmark says cubic
    manifest.write_text('{"default_method": "ldm"}')
    assert default_method() == "cnn"  # recommended method without its weights: fall back
    manifest.write_text("{not json")
    with pytest.raises(ThinsliceError, match="manifest.json"):
        default_method()
    manifest.write_text('{"default_method": "cnn"}')
    src, out = tmp_path / "thick.nii.gz", tmp_path / "out.nii.gz"
    write_volume(thick, src)
    assert main(["upsample", str(src), str(out), "--spacing", str(SPACING)]) == 0  # no --method, no --checkpoint
    assert "cnn" in capsys.readouterr().out
    assert read_volume(out).grid_differences(target_grid_volume(thick, SPACING)) == []


def test_bf16_refinement_stays_close_to_fp32(tmp_path, thick) -> None:
    model = load_baseline(_bundle(tmp_path, trained=True))
    lr = upsample(thick, SPACING, method="cubic").slices_first()
    fp32 = refine_cnn(model, lr)
    bf16 = refine_cnn(model, lr, precision="bf16")
    change = np.abs(fp32 - np.clip(lr, HU_MIN, HU_MAX)).mean()  # what the network adds
    assert np.abs(bf16 - fp32).mean() < 0.1 * change
    with pytest.raises(ThinsliceError, match="unknown precision"):
        refine_cnn(model, lr, precision="int4")
