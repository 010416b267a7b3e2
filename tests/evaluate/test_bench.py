import importlib
import json

import pytest
import torch

from thinslice.checkpoints.bundle import save_model
from thinslice.cli.main import main
from thinslice.data.phantom import make_chest_phantom
from thinslice.errors import ThinsliceError
from thinslice.evaluate.bench import MethodSpec, parse_methods, run_benchmark
from thinslice.io import write_volume
from thinslice.models.baseline import ResidualCNN3D
from thinslice.presets import load_preset


@pytest.fixture(scope="module")
def thin():
    return make_chest_phantom(shape=(24, 40, 40), spacing=(5.0, 5.0, 1.25), seed=4)


def test_benchmark_rows_and_scores(thin, tmp_path):
    rows = run_benchmark([thin], factors=[2.0], profiles=["gaussian", "decimate"],
                         methods=[MethodSpec("linear", "linear"), MethodSpec("cubic", "cubic")],
                         figure_path=tmp_path / "fig.png", log=lambda _: None)
    assert [(r.profile, r.method) for r in rows] == [("gaussian", "linear"), ("gaussian", "cubic"),
                                                      ("decimate", "linear"), ("decimate", "cubic")]
    for r in rows:
        assert 20 < r.psnr < 80 and 0 < r.ssim <= 1 and r.seconds >= 0 and r.peak_rss_mb > 10
    # decimate keeps thin slices; interpolation passes through its samples, so only the half-slice label offset
    # (docs/design/interpolation-baselines.md) keeps the residual from being zero; gaussian inputs are not reproduced
    assert all(r.dc_residual_hu >= 0 for r in rows)
    assert (tmp_path / "fig.png").stat().st_size > 5000


def test_parse_methods():
    specs = parse_methods(["cubic", "ldm-4", "cnn"], checkpoint="ck", device="cpu")
    assert specs[1] == MethodSpec("ldm-4", "ldm", {"checkpoint": "ck", "device": "cpu", "steps": 4,
                                                   "progress": False})
    assert parse_methods(["cnn"], precision="bf16")[0].options == {"precision": "bf16"}
    mean4, cfg = parse_methods(["ldm-mean4", "ldm-cfg1.5"])
    assert mean4.options == {"samples": 4, "progress": False}
    assert cfg.options == {"guidance_scale": 1.5, "progress": False}
    for bad in ("bicubic", "ldm-cfgx", "ldm-meanx"):
        with pytest.raises(ThinsliceError, match="unknown benchmark method"):
            parse_methods([bad])


def test_bench_cli_with_cnn_and_missing_ldm(thin, tmp_path, capsys):
    src = tmp_path / "thin.nii.gz"
    write_volume(thin, src)
    preset = load_preset("tiny")
    torch.manual_seed(0)
    save_model(ResidualCNN3D(preset.baseline), "baseline", preset, tmp_path / "bundle")
    out = tmp_path / "bench"
    assert main(["bench", "--data", str(src), "--out", str(out), "--factors", "2", "--profiles", "box",
                 "--methods", "cubic-dc", "cnn", "ldm", "--checkpoint", str(tmp_path / "bundle")]) == 0
    assert "no weights for 'ldm'" in capsys.readouterr().err  # a note, through logging (-q silences it)
    payload = json.loads((out / "bench.json").read_text())
    assert [r["method"] for r in payload["rows"]] == ["cubic-dc", "cnn"]
    # an untrained CNN (zero-initialised last layer) returns cubic, then data consistency: cubic-dc's scores
    assert payload["rows"][0]["psnr"] == pytest.approx(payload["rows"][1]["psnr"], abs=0.05)
    assert "| thin | x2 | 2 | box | 1 | cnn |" in (out / "bench.md").read_text()


def test_every_method_that_models_the_profile_receives_the_cases_profile(thin, monkeypatch):
    """A method declaring a ``profile`` option gets the simulated input's profile (and overlap cases run)."""
    registry = importlib.import_module("thinslice.infer.upsample")

    seen = []
    original = registry.CubicDC.__call__

    def spy(self, thick, spacing_mm, acquisition=None):
        seen.append((acquisition.profile, round(acquisition.ratio_to(thick.slice_spacing), 3)))
        return original(self, thick, spacing_mm, acquisition)

    monkeypatch.setattr(registry.CubicDC, "__call__", spy)
    rows = run_benchmark([thin], factors=[2.0], profiles=["box", "decimate"], overlaps=[2.0],
                         methods=[MethodSpec("cubic-dc", "cubic-dc"), MethodSpec("cubic", "cubic")],
                         log=lambda _: None)
    assert seen == [("box", 1.0), ("decimate", 1.0), ("box", 2.0)]
    assert [(r.profile, r.thickness_ratio) for r in rows[::2]] == [("box", 1.0), ("decimate", 1.0), ("box", 2.0)]
