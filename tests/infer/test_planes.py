"""The planes method: thick-grid 2D network, its training examples, trainer, bundle and CLI."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch

from thinslice.checkpoints.bundle import load_planes, save_model
from thinslice.cli.main import main
from thinslice.degrade.operators import cell_operators, thick_profile_operator
from thinslice.degrade.pairs import simulate_pair
from thinslice.errors import ThinsliceError
from thinslice.examples.planes import PlaneSampler
from thinslice.infer.consistency import consistency_residual_hu
from thinslice.infer.pipeline import Acquisition
from thinslice.infer.planes import Planes, integer_factor
from thinslice.infer.planes_adapt import adapt_plan
from thinslice.infer.upsample import upsample
from thinslice.models.factory import build_planes
from thinslice.models.intensity import model_to_hu
from thinslice.models.planes import depth_to_space, space_to_depth
from thinslice.presets import load_preset
from thinslice.train.planes import PlanesTrainOptions, make_loss, train_planes


def test_space_to_depth_puts_each_cells_thin_rows_in_channels() -> None:
    thin = torch.arange(2 * 12 * 5, dtype=torch.float32).reshape(2, 1, 12, 5)
    cells = space_to_depth(thin, 3)
    assert cells.shape == (2, 3, 4, 5)
    assert torch.equal(cells[:, 2, 1], thin[:, 0, 1 * 3 + 2])  # thin row m*k + i -> channel i of thick row m
    assert torch.equal(depth_to_space(cells), thin)


@pytest.mark.parametrize("profile", ["gaussian", "box", "decimate"])
def test_cell_operators_are_the_inference_cubic_dc(thin_phantom, profile) -> None:
    thick, truth = simulate_pair(thin_phantom, factor=4, profile=profile)
    base = upsample(thick, thin_phantom.slice_spacing, method="cubic-dc", profile=profile).slices_first()
    a, b, pad = cell_operators(4, thick.num_slices, 1.0, profile)
    y = thick.slices_first().reshape(thick.num_slices, -1)
    assert np.abs(b @ y - base.reshape(base.shape[0], -1)).max() < 1e-2
    operator = thick_profile_operator(thick, thin_phantom.slice_spacing, profile)
    assert pad == operator.pad and np.allclose(a, operator.extended, atol=1e-6)


def test_untrained_network_returns_cubic_dc(thin_phantom) -> None:
    """The output heads start at zero: before training, planes is exactly cubic-dc (then projected again)."""
    thick, _ = simulate_pair(thin_phantom, factor=4, profile="box")
    model = build_planes("tiny").eval()
    pipeline = Planes.from_model(model, precision="fp32")
    out = pipeline(thick, thin_phantom.slice_spacing, Acquisition.of(thick, "box")).volume
    ref = upsample(thick, thin_phantom.slice_spacing, "cubic-dc", profile="box")
    assert out.grid_differences(ref) == []
    assert np.abs(out.array - ref.array).max() < 0.05


def test_sampler_examples_follow_the_forward_model_and_resume_exactly(thin_phantom) -> None:
    preset = load_preset("tiny")
    sampler = PlaneSampler([thin_phantom], preset.planes_data, preset.degradation,
                           dataclasses.replace(preset.planes, factors=(2, 3, 4)), 6, seed=3)
    batch = next(sampler)
    rows, width = preset.planes_data.rows, preset.planes_data.width
    k = batch["base"].shape[2] // rows
    assert batch["thick"].shape == (6, 1, rows, width) and batch["hr"].shape == (6, 1, rows * k, width)
    assert batch["cond"].shape == (6, 4) and torch.all(batch["cond"][:, 1:].sum(1) == 1)
    # The thick rows are a weighted average of each cell's neighbourhood in the truth: never outside its range.
    hr = model_to_hu(batch["hr"])
    assert float(model_to_hu(batch["thick"]).max()) <= float(hr.max()) + 1e-2
    state = sampler.state_dict()
    first = next(sampler)
    sampler.load_state_dict(state)
    again = next(sampler)
    assert all(torch.equal(first[key], again[key]) for key in first)


def _perturbed(seed: int = 0):
    """A network with random output heads, so that training has something to undo in a few steps."""
    torch.manual_seed(seed)
    model = build_planes("tiny")
    for head in model.heads_out.values():
        torch.nn.init.normal_(head.weight, std=0.05)
    return model


def _fixed_loss(model, volume) -> float:
    preset = load_preset("tiny")
    sampler = PlaneSampler([volume], preset.planes_data, preset.degradation, model.cfg, 8, seed=99)
    loss = make_loss("l1")
    with torch.no_grad():
        return float(np.mean([float(loss({"planes": model}, next(sampler), 0)[0]) for _ in range(4)]))


def test_training_lowers_the_loss_and_the_bundle_upsamples(tmp_path, thin_phantom, monkeypatch) -> None:
    import thinslice.train.planes as trainer

    monkeypatch.setattr(trainer, "build_planes", lambda preset: _perturbed())
    run = tmp_path / "run"
    opts = PlanesTrainOptions(run_dir=run, preset="tiny", max_steps=40, lr=2e-3, ema_decay=0.0, device="cpu",
                              progress=False, seed=0, val_every=40)
    result = train_planes([thin_phantom], None, opts)
    before, after = _fixed_loss(_perturbed(), thin_phantom), _fixed_loss(result.models["planes"], thin_phantom)
    assert after < 0.7 * before, (before, after)
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    val = [r for r in rows if "val/psnr" in r]
    assert len(val) == 1 and np.isfinite(val[0]["val/psnr"]) and np.isfinite(val[0]["val/psnr_cubic_dc"])
    model = load_planes(run / "final")
    for key, value in result.models["planes"].state_dict().items():
        assert torch.equal(value.cpu(), model.state_dict()[key])
    thick, _ = simulate_pair(thin_phantom, factor=3, profile="gaussian")
    out = upsample(thick, thin_phantom.slice_spacing, method="planes", checkpoint=str(run / "final"), device="cpu")
    base = upsample(thick, thin_phantom.slice_spacing, method="cubic-dc")
    assert out.grid_differences(base) == [] and np.abs(out.array - base.array).max() > 1.0
    operator = thick_profile_operator(thick, thin_phantom.slice_spacing, "gaussian")
    assert consistency_residual_hu(out.slices_first(), thick.slices_first(), operator)["max_abs"] < 0.05


def test_factor_and_spacing_errors_are_one_line(tmp_path, thin_phantom) -> None:
    save_model(build_planes("tiny"), "planes", "tiny", tmp_path)
    thick, _ = simulate_pair(thin_phantom, factor=4, profile="gaussian")
    with pytest.raises(ThinsliceError, match="divides the slice spacing"):
        upsample(thick, 2.0, method="planes", checkpoint=str(tmp_path))
    thick6, _ = simulate_pair(thin_phantom, factor=6, profile="gaussian")
    with pytest.raises(ThinsliceError, match="trained for factors 2, 3, 4"):
        upsample(thick6, thin_phantom.slice_spacing, method="planes", checkpoint=str(tmp_path))
    assert integer_factor(5.0, 1.25) == 4
    with pytest.raises(ThinsliceError, match="pass a folder holding planes.safetensors"):
        upsample(thick, thin_phantom.slice_spacing, method="planes", checkpoint=str(tmp_path / "nothing"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ThinsliceError, match="train-planes"):
        upsample(thick, thin_phantom.slice_spacing, method="planes", checkpoint=str(tmp_path / "empty"))


def test_cli_train_then_upsample(tmp_path, thin_data_folder) -> None:
    from thinslice.io import read_volume, write_volume

    out = tmp_path / "run"
    assert main(["train-planes", "--data", str(thin_data_folder), "--preset", "tiny", "--out", str(out),
                 "--max-steps", "3", "--device", "cpu", "--loss", "mse", "--precision", "fp32"]) == 0
    assert load_planes(out / "final").cfg == load_preset("tiny").planes
    thin = read_volume(thin_data_folder / "ct1.nii.gz")
    thick, _ = simulate_pair(thin, factor=2, profile="box")
    write_volume(thick, tmp_path / "thick.nii.gz")
    assert main(["upsample", str(tmp_path / "thick.nii.gz"), str(tmp_path / "thin.nii.gz"), "--spacing",
                 str(thin.slice_spacing), "--method", "planes", "--checkpoint", str(out / "final"),
                 "--profile", "box"]) == 0
    assert read_volume(tmp_path / "thin.nii.gz").num_slices == 2 * thick.num_slices


def test_adapt_fine_tunes_on_the_inputs_own_axial_slices(tmp_path, thin_phantom) -> None:
    from thinslice.infer.planes_adapt import adapt_planes

    model = _perturbed(1).eval()
    thick, _ = simulate_pair(thin_phantom, factor=2, profile="gaussian")
    tuned = adapt_planes(model, thick, 2, ("gaussian", 1.0), adapt_plan(30, 60, precision="fp32"))
    assert tuned is not model and not tuned.training
    # The copy moved, the original is untouched; fitting the input's own planes lowers their loss.
    changed = [k for k, v in tuned.state_dict().items() if not torch.equal(v, model.state_dict()[k])]
    assert any(k.startswith("heads_out.2") for k in changed) and not any(k.startswith("heads_out.3") for k in changed)
    preset = load_preset("tiny")
    sampling = __import__("dataclasses").replace(preset.planes_data, inplane_fraction=1.0)
    sampler = PlaneSampler([thick], sampling, preset.degradation, dataclasses.replace(preset.planes, factors=(2,)), 8,
                           seed=5, acquisition=("gaussian", 1.0))
    batches = [next(sampler) for _ in range(3)]
    loss = make_loss("l1")
    with torch.no_grad():
        before = np.mean([float(loss({"planes": model}, b, 0)[0]) for b in batches])
        after = np.mean([float(loss({"planes": tuned}, b, 0)[0]) for b in batches])
    assert after < before
    # Through upsample: a time cap of a fraction of a second still gives a consistent output.
    save_model(model, "planes", "tiny", tmp_path)
    out = upsample(thick, thin_phantom.slice_spacing, method="planes", checkpoint=str(tmp_path), adapt=True,
                   adapt_seconds=0.01, precision="fp32")
    operator = thick_profile_operator(thick, thin_phantom.slice_spacing, "gaussian")
    assert consistency_residual_hu(out.slices_first(), thick.slices_first(), operator)["max_abs"] < 0.05


def test_context_planes_feed_neighbours_and_keep_the_untrained_identity(thin_phantom) -> None:
    """2.5D: each plane comes with its neighbours as channels; the output is still the middle plane's."""
    import dataclasses

    from thinslice.models.planes import PlanesNet

    preset = load_preset("tiny")
    cfg = dataclasses.replace(preset.planes, context=1)
    sampler = PlaneSampler([thin_phantom], preset.planes_data, preset.degradation, cfg, 4, seed=1)
    batch = next(sampler)
    rows = preset.planes_data.rows
    assert batch["thick"].shape[:3] == (4, 3, rows) and batch["hr"].shape[1] == 1
    assert batch["base"].shape[1] == 3
    model = PlanesNet(cfg).eval()
    with torch.no_grad():
        out = model(batch["thick"], batch["base"], batch["cond"])
    assert torch.equal(out, batch["base"][:, 1:2])  # zero heads: the middle plane's cubic-dc
    thick, _ = simulate_pair(thin_phantom, factor=3, profile="box")
    ref = upsample(thick, thin_phantom.slice_spacing, "cubic-dc", profile="box")
    pipeline = Planes.from_model(model, precision="fp32")
    result = pipeline(thick, thin_phantom.slice_spacing, Acquisition.of(thick, "box")).volume
    assert np.abs(result.array - ref.array).max() < 0.05


def test_auto_falls_back_to_cubic_dc_where_the_recommended_method_cannot_serve(thin_phantom, monkeypatch) -> None:
    import importlib

    registry = importlib.import_module("thinslice.infer.upsample")  # the module, not the function of that name

    monkeypatch.setattr(registry, "default_method", lambda: "planes")
    thick, _ = simulate_pair(thin_phantom, factor=4, profile="gaussian")
    method, note = registry.choose_auto(thick, 2.0)  # 5 mm slices to 2 mm: not a whole number of thin slices per slice
    assert method == "cubic-dc" and "planes cannot serve this input" in note and "divides" in note


def test_block_network_examples_tiles_and_bundle(tmp_path, thin_phantom, monkeypatch) -> None:
    """dims 3: thick-grid blocks in training follow the forward model; inference over in-plane tiles equals one pass
    over the whole stack (the halo covers the receptive field); the saved bundle rebuilds a 3D network."""
    import dataclasses

    import thinslice.infer.planes as planes_infer
    from thinslice.models.planes import PlanesNet

    preset = load_preset("tiny")
    cfg = dataclasses.replace(preset.planes, dims=3)
    sampler = PlaneSampler([thin_phantom], preset.planes_data, preset.degradation, cfg, 3, seed=2)
    batch = next(sampler)
    rows, size = preset.planes_data.rows, preset.planes_data.block
    k = batch["base"].shape[2] // rows
    assert batch["thick"].shape == (3, 1, rows, size, size) and batch["hr"].shape == (3, 1, rows * k, size, size)
    assert float(model_to_hu(batch["thick"]).max()) <= float(model_to_hu(batch["hr"]).max()) + 1e-2
    torch.manual_seed(0)
    model = PlanesNet(cfg).eval()
    for head in model.heads_out.values():
        torch.nn.init.normal_(head.weight, std=0.05)
    with torch.no_grad():
        assert model(batch["thick"], batch["base"], batch["cond"]).shape == batch["hr"].shape
    thick, _ = simulate_pair(thin_phantom, factor=3, profile="gaussian")
    pipeline = Planes.from_model(model, precision="fp32", consistency=False)
    whole = pipeline(thick, thin_phantom.slice_spacing).volume
    monkeypatch.setattr(planes_infer, "BLOCK_TILE", 7)
    tiled = pipeline(thick, thin_phantom.slice_spacing).volume
    assert np.abs(whole.array - tiled.array).max() < 1e-2
    base = upsample(thick, thin_phantom.slice_spacing, "cubic-dc")
    assert np.abs(whole.array - base.array).max() > 1.0
    save_model(model, "planes", dataclasses.replace(preset, planes=cfg), tmp_path)
    assert load_planes(tmp_path).cfg.dims == 3


def test_validation_scores_what_inference_gives_with_the_saved_weights(tmp_path, thin_phantom) -> None:
    """The trainer's val/psnr is the shipped pipeline's PSNR: upsampling the validation case with the exported
    weights gives the same number."""
    from thinslice.evaluate.metrics import psnr
    from thinslice.train.validation import VAL_PROFILE, validation_cases

    run = tmp_path / "run"
    opts = PlanesTrainOptions(run_dir=run, preset="tiny", max_steps=6, lr=2e-3, ema_decay=0.0, device="cpu",
                              progress=False, seed=0, val_every=6, mixed_precision="no")
    train_planes([thin_phantom], [thin_phantom], opts)
    logged = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    val_psnr = [r["val/psnr"] for r in logged if "val/psnr" in r][-1]
    case = validation_cases([thin_phantom], 256)[0]
    out = upsample(case.thick, case.truth.slice_spacing, "planes", checkpoint=str(run / "final"), precision="fp32",
                   profile=VAL_PROFILE)
    assert psnr(out.slices_first(), case.truth.slices_first()) == pytest.approx(val_psnr, abs=1e-3)


def test_init_starts_training_from_existing_weights(tmp_path) -> None:
    """--init: fine-tuning starts from a bundle's weights; a bundle of another architecture is refused."""
    from thinslice.train.planes import initial_planes

    source = _perturbed(seed=3)
    save_model(source, "planes", "tiny", tmp_path / "bundle")
    model = initial_planes(load_preset("tiny"), str(tmp_path / "bundle"), resume=False)
    assert all(torch.equal(v, source.state_dict()[k]) for k, v in model.state_dict().items())
    fresh = initial_planes(load_preset("tiny"), str(tmp_path / "bundle"), resume=True)  # resume: own checkpoint
    assert not all(torch.equal(v, source.state_dict()[k]) for k, v in fresh.state_dict().items())
    with pytest.raises(ThinsliceError, match="preset"):
        initial_planes(load_preset("small"), str(tmp_path / "bundle"), resume=False)


def test_init_deepens_a_network_with_identity_blocks(tmp_path) -> None:
    """--init with a preset of more residual blocks: the source's blocks are copied and the new ones start as the
    identity, so the deeper network computes what the source did; fewer blocks than the source is refused."""
    from thinslice.train.planes import initial_planes

    tiny = load_preset("tiny")
    source = _random_heads(build_planes(tiny), 5)
    save_model(source, "planes", tiny, tmp_path / "bundle")
    deeper = dataclasses.replace(tiny, planes=dataclasses.replace(tiny.planes, num_blocks=tiny.planes.num_blocks + 2))
    model = initial_planes(deeper, str(tmp_path / "bundle"), resume=False).eval()
    assert len(model.body) == len(source.body) + 2
    k = tiny.planes.factors[0]
    m, w = 6, 20
    thick = torch.randn(1, source.cfg.planes, m, w)
    base = torch.randn(1, source.cfg.planes, m * k, w)
    cond = torch.tensor([[0.0, 1.0, 0.0, 0.0]])
    with torch.no_grad():
        assert torch.allclose(model(thick, base, cond), source(thick, base, cond), atol=1e-6)
    save_model(model, "planes", deeper, tmp_path / "deep")
    with pytest.raises(ThinsliceError, match="num_blocks"):
        initial_planes(tiny, str(tmp_path / "deep"), resume=False)


def test_weights_saved_before_a_config_field_existed_still_match_their_preset(tmp_path) -> None:
    """A file whose preset record lacks a newer field (e.g. planes.dims) has that field's default: --preset with the
    same architecture is accepted, not refused as another preset."""
    from thinslice.checkpoints.files import convert_weights, read_metadata

    save_model(build_planes("tiny"), "planes", "tiny", tmp_path / "new")
    record = json.loads(read_metadata(tmp_path / "new" / "planes.safetensors")["preset_config"])
    del record["planes"]["dims"]
    (tmp_path / "old").mkdir()
    convert_weights(tmp_path / "new" / "planes.safetensors", tmp_path / "old" / "planes.safetensors",
                    dtype=torch.float32, metadata={"preset_config": json.dumps(record)})
    assert load_planes(tmp_path / "old", preset="tiny").cfg.dims == 2


def _random_heads(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """A network whose zero-initialised output heads are given random weights, so it differs from cubic-dc."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * 0.05)
    return model.eval()


def test_a_factors_own_network_serves_that_factor(tmp_path, thin_phantom) -> None:
    """planes-x<k>.safetensors beside the all-factor file serves factor k (even one the all-factor model lacks);
    other factors keep the all-factor network."""
    tiny = load_preset("tiny")
    general = dataclasses.replace(tiny, planes=dataclasses.replace(tiny.planes, factors=(2, 3)))
    x4 = dataclasses.replace(tiny, planes=dataclasses.replace(tiny.planes, factors=(4,)))
    save_model(_random_heads(build_planes(general), 1), "planes", general, tmp_path / "b")
    save_model(_random_heads(build_planes(x4), 2), "planes", x4, tmp_path / "alone")
    (tmp_path / "b" / "planes-x4.safetensors").write_bytes((tmp_path / "alone" / "planes.safetensors").read_bytes())
    spacing = thin_phantom.slice_spacing
    thick4, _ = simulate_pair(thin_phantom, factor=4, profile="gaussian")
    assert Planes.applicable(thick4, spacing, str(tmp_path / "b")) is None
    out = upsample(thick4, spacing, "planes", checkpoint=str(tmp_path / "b"), precision="fp32")
    alone = upsample(thick4, spacing, "planes", checkpoint=str(tmp_path / "alone"), precision="fp32")
    np.testing.assert_array_equal(out.array, alone.array)
    assert "x4 network" in out.metadata["planes"]
    thick2, _ = simulate_pair(thin_phantom, factor=2, profile="gaussian")
    two = upsample(thick2, spacing, "planes", checkpoint=str(tmp_path / "b"), precision="fp32")
    assert "x4 network" not in two.metadata["planes"]
    # A specialist under the wrong factor's name is refused in one line.
    (tmp_path / "b" / "planes-x4.safetensors").rename(tmp_path / "b" / "planes-x2.safetensors")
    with pytest.raises(ThinsliceError, match="serves factors 4, not 2: rename it"):
        upsample(thick2, spacing, "planes", checkpoint=str(tmp_path / "b"))


def test_skip_air_runs_the_network_only_on_planes_that_hold_more_than_air(tmp_path, monkeypatch) -> None:
    """A phantom in a wide field of air: with ``skip_air`` the network sees fewer planes, the body is refined the
    same, and the planes of air keep the estimate."""
    from thinslice.data.phantom import make_chest_phantom
    from thinslice.degrade import degrade
    from thinslice.models.planes import PlanesNet

    torch.manual_seed(0)
    save_model(build_planes("tiny").eval(), "planes", "tiny", tmp_path)
    thin = make_chest_phantom(shape=(24, 48, 48), spacing=(4.5, 4.5, 1.25), seed=3)
    wide = np.full((24, 80, 80), -1000.0, np.float32)
    wide[:, 16:64, 16:64] = thin.slices_first()
    thick = degrade(thin.with_slices(wide, 1.25, 0.0, 1.25), factor=4, profile="gaussian")
    seen = []
    forward = PlanesNet.forward
    monkeypatch.setattr(PlanesNet, "forward", lambda self, t, *a: (seen.append(t.shape[0]), forward(self, t, *a))[1])
    outs = {}
    for skip in (False, True):
        seen.clear()
        outs[skip] = upsample(thick, 1.25, "planes", checkpoint=str(tmp_path), skip_air=skip).slices_first()
        outs[f"planes {skip}"] = sum(seen)
    assert outs["planes True"] < 0.8 * outs["planes False"]
    body = (slice(None), slice(20, 60), slice(20, 60))
    np.testing.assert_allclose(outs[True][body], outs[False][body], atol=2.0)
