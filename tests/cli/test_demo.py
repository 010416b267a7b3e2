import json

import numpy as np

from thinslice.cli.main import main
from thinslice.data.phantom import make_chest_phantom
from thinslice.io import read_volume, write_volume


def test_demo_on_builtin_phantom(tmp_path):
    out = tmp_path / "demo"
    assert main(["demo", "--out", str(out), "--method", "cubic"]) == 0
    scores = json.loads((out / "metrics.json").read_text())
    assert 30.0 < scores["cubic"]["psnr"] < 60.0
    assert 0.8 < scores["cubic"]["ssim"] <= 1.0
    assert (out / "views.png").stat().st_size > 10_000
    truth, result = read_volume(out / "thin_truth.nii.gz"), read_volume(out / "result_cubic.nii.gz")
    assert truth.grid_differences(result) == []  # result lands exactly on the thin truth's grid


def test_demo_on_user_thin_and_thick_volumes(tmp_path):
    thin = make_chest_phantom(shape=(32, 48, 48), spacing=(5.0, 5.0, 1.25), seed=2)
    write_volume(thin, tmp_path / "thin.nii.gz")
    assert main(["demo", "--input", str(tmp_path / "thin.nii.gz"), "--out", str(tmp_path / "a"),
                 "--method", "linear", "--factor", "2", "--profile", "box"]) == 0
    assert "linear" in json.loads((tmp_path / "a" / "metrics.json").read_text())

    thick = make_chest_phantom(shape=(8, 48, 48), spacing=(5.0, 5.0, 5.0), seed=2)
    write_volume(thick, tmp_path / "thick.nii.gz")
    assert main(["demo", "--input", str(tmp_path / "thick.nii.gz"), "--out", str(tmp_path / "b"),
                 "--method", "cubic"]) == 0
    result = read_volume(tmp_path / "b" / "result_cubic.nii.gz")
    assert np.isclose(result.slice_spacing, 1.25) and result.num_slices == 32
    assert json.loads((tmp_path / "b" / "metrics.json").read_text()) == {}  # no truth, nothing scored


def test_demo_missing_input_is_one_line_error(tmp_path, capsys):
    assert main(["demo", "--input", str(tmp_path / "nope.nii.gz"), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("thinslice demo: error:") and "\n" not in err


def test_demo_runs_every_learned_method_of_a_bundle(tmp_path):
    import torch

    from thinslice.checkpoints.bundle import save_model
    from thinslice.models.baseline import ResidualCNN3D
    from thinslice.models.factory import build_denoiser
    from thinslice.models.vae import AutoencoderKL3D
    from thinslice.presets import load_preset

    torch.manual_seed(0)
    preset, bundle = load_preset("tiny"), tmp_path / "bundle"
    vae_hash = save_model(AutoencoderKL3D(preset.vae), "vae", preset, bundle)
    save_model(build_denoiser(preset), "denoiser", preset, bundle, {"vae_hash": vae_hash})
    save_model(ResidualCNN3D(preset.baseline), "baseline", preset, bundle)
    thin = make_chest_phantom(shape=(32, 48, 48), spacing=(5.0, 5.0, 1.25), seed=3)
    write_volume(thin, tmp_path / "thin.nii.gz")
    assert main(["demo", "--input", str(tmp_path / "thin.nii.gz"), "--out", str(tmp_path / "d"),
                 "--checkpoint", str(bundle), "--precision", "bf16"]) == 0
    scores = json.loads((tmp_path / "d" / "metrics.json").read_text())
    assert set(scores) == {"cubic", "cubic-dc", "cnn", "ldm"}
    assert scores["cubic-dc"]["psnr"] > scores["cubic"]["psnr"]  # consistency with the thick slices helps
    assert all(np.isfinite(s["psnr"]) for s in scores.values())
    assert (tmp_path / "d" / "result_ldm.nii.gz").is_file()
