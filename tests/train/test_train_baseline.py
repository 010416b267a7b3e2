"""CNN baseline trainer: the loss goes down, the bundle runs through ``upsample --method cnn``, CLI end to end."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from thinslice.checkpoints.bundle import load_baseline, save_model
from thinslice.cli.main import main
from thinslice.degrade.pairs import simulate_pair
from thinslice.examples.pairs import PairSampler
from thinslice.infer.upsample import upsample
from thinslice.models.factory import build_baseline
from thinslice.presets import load_preset
from thinslice.train.baseline import BaselineTrainOptions, l1_loss, train_baseline


def _fixed_l1(model, thin_phantom) -> float:
    sampler = PairSampler([thin_phantom], (8, 32, 32), 4, load_preset("tiny").degradation, seed=321)
    with torch.no_grad():
        return float(np.mean([float(l1_loss({"baseline": model}, sampler.next_batch(), 0)[0]) for _ in range(3)]))


def _perturbed(seed: int = 0):
    """A baseline whose last layer is random (an untrained network returns its input exactly, and a tiny CNN needs
    far more steps than a test can afford to beat cubic interpolation): training must first undo the damage."""
    torch.manual_seed(seed)
    model = build_baseline("tiny")
    torch.nn.init.normal_(model.tail.weight, std=0.02)
    return model


def test_training_lowers_the_loss_and_the_bundle_upsamples(tmp_path, thin_phantom) -> None:
    start = tmp_path / "start"
    save_model(_perturbed(), "baseline", "tiny", start)
    run = tmp_path / "run"
    opts = BaselineTrainOptions(run_dir=run, preset="tiny", max_steps=15, lr=1e-3, ema_decay=0.0, device="cpu",
                                progress=False, seed=0, val_every=15, init=start)
    result = train_baseline([thin_phantom], None, opts)
    before, after = _fixed_l1(_perturbed(), thin_phantom), _fixed_l1(result.models["baseline"], thin_phantom)
    assert after < 0.7 * before, (before, after)
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    val = [r for r in rows if "val/psnr" in r]
    assert len(val) == 1 and np.isfinite(val[0]["val/psnr"]) and np.isfinite(val[0]["val/psnr_cubic_dc"])
    # The exported bundle is what --method cnn loads.
    model = load_baseline(run / "final")
    for k, v in result.models["baseline"].state_dict().items():
        assert torch.equal(v.cpu(), model.state_dict()[k])
    thick, _target = simulate_pair(thin_phantom, factor=4.0, profile="gaussian")
    cubic = upsample(thick, thin_phantom.slice_spacing, method="cubic")
    out = upsample(thick, thin_phantom.slice_spacing, method="cnn", checkpoint=str(run / "final"), device="cpu")
    assert out.grid_differences(cubic) == [] and np.abs(out.array - cubic.array).max() > 1.0


def test_cli_end_to_end(tmp_path, thin_data_folder) -> None:
    data = thin_data_folder
    out = tmp_path / "run"
    args = ["train-baseline", "--data", str(data), "--val", str(data / "ct2.nii.gz"), "--preset", "tiny",
            "--out", str(out), "--max-steps", "3", "--device", "cpu"]
    assert main(args) == 0
    assert load_baseline(out / "final").cfg == load_preset("tiny").baseline
    assert (out / "best" / "baseline.safetensors").is_file() and (out / "final" / "summary.json").is_file()
    # Fine-tuning from those weights in a new run folder.
    assert main([*args[:-6], "--out", str(tmp_path / "ft"), "--init", str(out / "final"), "--max-steps", "2",
                 "--device", "cpu"]) == 0
    assert main([*args[:-6], "--out", str(tmp_path / "fp16"), "--device", "cpu", "--mixed-precision", "fp16"]) == 2


def test_cnn_validation_scores_what_inference_gives(tmp_path, thin_phantom) -> None:
    """val/psnr of the CNN trainer is the cnn pipeline's PSNR (cubic -> network -> data consistency) with the
    exported weights on the same validation case."""
    from thinslice.evaluate.metrics import psnr
    from thinslice.train.validation import VAL_PROFILE, validation_cases

    run = tmp_path / "run"
    opts = BaselineTrainOptions(run_dir=run, preset="tiny", max_steps=4, ema_decay=0.0, device="cpu",
                                progress=False, seed=0, val_every=4, val_crop=(12, 32, 32))
    train_baseline([thin_phantom], [thin_phantom], opts)
    logged = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    val_psnr = [r["val/psnr"] for r in logged if "val/psnr" in r][-1]
    case = validation_cases([thin_phantom], 32, depth=12)[0]
    out = upsample(case.thick, case.truth.slice_spacing, "cnn", checkpoint=str(run / "final"), profile=VAL_PROFILE)
    assert psnr(out.slices_first(), case.truth.slices_first()) == pytest.approx(val_psnr, abs=1e-3)
