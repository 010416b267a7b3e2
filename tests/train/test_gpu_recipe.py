"""The one-call GPU recipe, end to end on the CPU with the tiny preset: packed arrays in, weights and scores out."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from thinslice.checkpoints.bundle import save_model
from thinslice.models.factory import build_planes

BENCH = Path(__file__).resolve().parents[2] / "benchmarks"


def _module(name: str):
    spec = importlib.util.spec_from_file_location(name, BENCH / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def test_packed_arrays_keep_geometry_and_body(thin_phantom, tmp_path) -> None:
    pack = _module("pack_arrays")
    cropped = pack.body_crop(thin_phantom)
    assert cropped.num_slices == thin_phantom.num_slices
    pack.save_npz(cropped, tmp_path / "a.npz")
    recipe = _module("gpu_recipe")
    pack.save_npz(cropped, tmp_path / "b_heldout.npz")
    (train, held) = recipe.load_arrays(tmp_path)
    back = train[0][1]
    np.testing.assert_array_equal(back.array, np.rint(cropped.array))
    np.testing.assert_allclose(back.origin, cropped.origin)
    assert back.spacing == cropped.spacing and held[0][0] == "b_heldout"


@pytest.mark.slow  # about 10-50 s on 2 cores; `pytest -m 'not slow'` skips it in a quick loop
def test_recipe_trains_and_scores_with_the_tiny_preset(thin_phantom, tmp_path) -> None:
    pack, recipe = _module("pack_arrays"), _module("gpu_recipe")
    data = tmp_path / "data"
    data.mkdir()
    pack.save_npz(thin_phantom, data / "ph.npz")
    pack.save_npz(thin_phantom, data / "ph_heldout.npz")
    torch.manual_seed(0)
    save_model(build_planes("tiny").eval(), "planes", "tiny", tmp_path / "planes")
    out = tmp_path / "out"
    code = recipe.main(["--data", str(data), "--out", str(out), "--run-root", str(tmp_path / "runs"), "--preset",
                        "tiny", "--planes", str(tmp_path / "planes"), "--variants", "control", "--max-steps", "3",
                        "--batch-size", "2", "--workers", "1", "--device", "cpu"])
    assert code == 0
    scores = json.loads((out / "scores.json").read_text())
    assert (out / "control" / "denoiser.safetensors").is_file()
    row = scores["control"]
    assert row["ldm-mean4"]["psnr"] > 20 and row["planes"]["seconds"] > 0
    assert set(row) >= {"cubic-dc", "planes", "ldm-1", "ldm-mean4"}
