"""Training recipes (configs/recipes/*.toml) and ``thinslice reproduce``: every shipped recipe reads and checks, every
chain runs end to end (tiny preset, phantom volumes named like the shared CT folder, a few steps) to a weights file
the package loads, and a bad recipe is refused in one line before anything trains."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from thinslice.checkpoints.bundle import DEFAULT_BUNDLE_DIR, load_model, read_manifest
from thinslice.checkpoints.files import read_metadata, read_weights
from thinslice.cli.main import main
from thinslice.data import split
from thinslice.data.phantom import make_chest_phantom
from thinslice.io import write_volume
from thinslice.train import recipes
from thinslice.train.reproduce import Overrides, plan, settings_of

ROOT = Path(__file__).resolve().parents[2]
SHIPPED = ("baseline", "denoiser", "planes", "planes-x4", "planes-x5")
# The slice counts of the shared CT volumes (their MANIFEST.md), so the recipes' parts resolve as on the real data.
SLICES = {"ct02": 141, "ct04": 108, "ct05": 112, "ct06": 20, "ct07": 275, "ct08": 160, "ct09": 134, "ct10": 100}


@pytest.fixture(scope="module")
def ct_folder(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("ct")
    for seed, (prefix, slices) in enumerate(SLICES.items()):
        write_volume(make_chest_phantom(shape=(slices, 40, 40), spacing=(4.5, 4.5, 1.25), seed=seed),
                     folder / f"{prefix}_phantom.nii.gz")
    return folder


def test_every_shipped_network_has_a_recipe_that_checks() -> None:
    """One recipe per shipped weights file; each reads, checks, and its chain ends in that file; the manifest and
    the model cards point at them."""
    assert tuple(recipes.available()) == SHIPPED
    manifest = read_manifest()
    assert set(manifest["recipe"]) == set(manifest["weights"])
    for name in SHIPPED:
        recipe, order = recipes.load(name)
        assert order[-1].key == f"{name}:{recipe.product}" and (DEFAULT_BUNDLE_DIR / recipe.weights).is_file()
        assert manifest["recipe"][recipe.weights] == f"configs/recipes/{name}.toml"
        assert (ROOT / "configs" / "recipes" / f"{name}.toml").resolve() == recipe.path.resolve()
        card = (ROOT / "docs" / "models" / f"{name}.md").read_text(encoding="utf-8")
        assert f"configs/recipes/{name}.toml" in card


def test_recipes_say_what_the_shipped_files_record() -> None:
    """The product stage's preset is the one recorded in the shipped file (name, network, example mix), and the
    x5 chain starts from the planes-x4 recipe's mix network (an explicit stage, no file from version control)."""
    for name in ("planes", "planes-x4", "planes-x5"):
        recipe, order = recipes.load(name)
        product = order[-1]
        if product.trainer == "average":
            product = next(s for s in order if s.key == product.ref_key(product.settings["inputs"][0]))
        meta = json.loads(read_metadata(DEFAULT_BUNDLE_DIR / recipe.weights)["preset_config"])
        preset = product.preset_data
        assert preset is not None and meta["name"] == preset["name"]
        assert {k: meta["planes"][k] for k in ("channels", "num_blocks")} == \
            {k: preset["planes"][k] for k in ("channels", "num_blocks")}
        assert list(meta["planes"]["factors"]) == list(preset["planes"]["factors"])
        assert meta["planes_data"]["profile_mismatch"] == preset["planes_data"].get("profile_mismatch", 0.0)
    _, order = recipes.load("planes-x5")
    assert [s.key for s in order] == ["planes-x4:x4_2026_11_30", "planes-x4:clinical_mix", "planes-x5:deep_x5"]
    mix = settings_of(order[1], Overrides())
    assert mix["schedule"] == [[40000, 17000], [28000, 28000]] and mix["train"] == \
        [p.name.replace("_lower", " lower ") for p in split.TRAIN]


def _reproduce(names: list[str], ct_folder: Path, out: Path, *extra: str) -> int:
    return main(["-q", "reproduce", *names, "--data", str(ct_folder), "--out", str(out), "--preset", "tiny",
                 "--device", "cpu", *extra])


@pytest.fixture(scope="module")
def reproduced(ct_folder, tmp_path_factory) -> Path:
    """Every shipped recipe run once, tiny preset, each schedule scaled by 1e-4 (34,000 steps -> 3; the x4 mix
    network's 17,000 of 40,000 then 28,000 -> 2 of 4, then 3)."""
    out = tmp_path_factory.mktemp("reproduced")
    assert _reproduce(["all"], ct_folder, out, "--steps-scale", "1e-4") == 0
    return out


def test_every_chain_runs_to_weights_the_package_loads(reproduced) -> None:
    """Each recipe writes its shipped file name, loadable as its kind: the x5 network deepened to 10 blocks from
    the planes-x4 recipe's stage, the all-factor one with the acquisition mix, the denoiser in fp16 with its planes
    prior trained first."""
    weights = reproduced / "weights"
    assert sorted(p.name for p in weights.iterdir()) == sorted(recipes.read_recipe(n).weights for n in SHIPPED)
    x5 = load_model("planes", weights / "planes-x5.safetensors")
    assert x5.cfg.num_blocks == 10 and tuple(x5.cfg.factors) == (5,)
    assert json.loads(read_metadata(weights / "planes.safetensors")["preset_config"])["planes_data"][
        "profile_mismatch"] == 0.3
    assert load_model("baseline", weights / "baseline.safetensors") is not None
    assert all(t.dtype == torch.float16 for t in read_weights(weights / "denoiser.safetensors").values()
               if t.is_floating_point())
    assert load_model("denoiser", weights / "denoiser.safetensors") is not None
    assert (reproduced / "denoiser" / "denoiser" / "best" / "planes.safetensors").is_file()  # the prior with it


def test_the_x4_chain_resumes_its_interrupted_leg_and_averages(reproduced) -> None:
    """planes-x4: the mix network stops at 2 of a 4-step schedule and resumes with one that ends at 3; the product
    is the average of the two clinical networks."""
    mix_run = reproduced / "planes-x4" / "clinical_mix"
    assert json.loads((mix_run / "final" / "summary.json").read_text())["step"] == 3
    assert [json.loads(line)["step"] for line in (mix_run / "metrics.jsonl").read_text().splitlines()
            if "train/loss" in line] == [1, 2, 3]
    soup = read_weights(reproduced / "weights" / "planes-x4.safetensors")
    mix, plain = (read_weights(reproduced / "planes-x4" / s / "final" / "planes.safetensors")
                  for s in ("clinical_mix", "clinical_plain"))
    assert any(not torch.equal(mix[k], plain[k]) for k in mix)  # two trained networks, not one copied
    assert all(torch.allclose(soup[k], (mix[k] + plain[k]) / 2) for k in soup if soup[k].is_floating_point())
    assert tuple(load_model("planes", reproduced / "weights" / "planes-x4.safetensors").cfg.factors) == (4, 5)
    assert (reproduced / "data" / "ct07_from175.nii.gz").is_file()  # the held-out validation part, by its split name


def test_a_rerun_reuses_every_stage_and_other_settings_are_refused(reproduced, ct_folder, capsys) -> None:
    before = (reproduced / "weights" / "planes-x5.safetensors").read_bytes()
    capsys.readouterr()
    assert main(["reproduce", "planes-x5", "--data", str(ct_folder), "--out", str(reproduced), "--preset", "tiny",
                 "--steps-scale", "1e-4"]) == 0
    err = capsys.readouterr().err
    assert err.count("done, reusing") == 3 and "train-planes ->" not in err
    assert main(["reproduce", "planes-x5", "--data", str(ct_folder), "--out", str(reproduced), "--preset", "tiny",
                 "--max-steps", "2"]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and "was made with other settings (schedule" in lines[0], lines
    assert (reproduced / "weights" / "planes-x5.safetensors").read_bytes() == before


GOOD_STAGE = '''
[[stages]]
name = "a"
trainer = "train-planes"
train = ["ct02 lower 80"]
steps = 10
[stages.preset]
base = "small"
'''


@pytest.mark.parametrize("text, message", [
    (GOOD_STAGE.replace("steps = 10", "stpes = 10"), "unknown key 'stpes' in stage 'a'"),
    ('name = "bad"\nweights = "planes.safetensors"\n', "missing 'stages'"),
    ('name = "bad"\nweights = "planes.safetensors"\nstages = []\n', "no stages"),
    (GOOD_STAGE.replace("steps = 10", 'steps = 10\ninit = "nowhere"'), "'nowhere', which is no stage of bad"),
    (GOOD_STAGE.replace('name = "a"', 'name = "a"\ninit = "b"')
     + GOOD_STAGE.replace('name = "a"', 'name = "b"\ninit = "a"'), "cycle: bad:b -> bad:a -> bad:b"),
    (GOOD_STAGE.replace('base = "small"', 'base = "smal"'), "unknown preset 'smal'"),
    (GOOD_STAGE + 'planes_data = { profile_mismach = 0.3 }\n', "unknown preset keys"),
    (GOOD_STAGE.replace('["ct02 lower 80"]', '["ct07"]'), "overlaps the held-out ct07_from175"),
    (GOOD_STAGE.replace('["ct02 lower 80"]', '["ct02 lowest 80"]'), "data part 'ct02 lowest 80'"),
    (GOOD_STAGE.replace("steps = 10", 'steps = 10\ninit = "planes-x9:a"'), "unknown recipe 'planes-x9'"),
    (GOOD_STAGE.replace("steps = 10", "schedule = [{ steps = 10, stop = 5 }]"), 'set export = "best"'),
])
def test_a_bad_recipe_is_refused_in_one_line(tmp_path, capsys, text: str, message: str) -> None:
    path = tmp_path / "bad.toml"
    header = "" if text.startswith("name =") else 'name = "bad"\nweights = "planes.safetensors"\n'
    path.write_text(header + text, encoding="utf-8")
    assert main(["reproduce", str(path), "--plan"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err


def test_plan_lists_the_chain_with_the_overrides() -> None:
    lines = plan("denoiser", Overrides(max_steps=5))
    assert lines[0].startswith("planes:first_all_factor: train-planes") and "steps 5" in lines[0]
    assert "denoiser:denoiser: train" in lines[1] and "prior planes:first_all_factor" in lines[1]
    assert lines[-1].endswith("weights/denoiser.safetensors (float16)")


def test_time_limit_stops_the_chain_and_the_same_command_continues(ct_folder, tmp_path, capsys) -> None:
    """--time-limit stops a stage with a checkpoint (exit 0, no weights yet); the same command without it resumes
    that stage from its checkpoint and finishes the chain."""
    out = tmp_path / "out"
    assert main(["reproduce", "baseline", "--data", str(ct_folder), "--out", str(out), "--preset", "tiny",
                 "--device", "cpu", "--max-steps", "12", "--time-limit", "0.01"]) == 0
    err = capsys.readouterr().err
    assert "time limit reached in stage baseline:cnn" in err
    assert not (out / "weights" / "baseline.safetensors").exists()
    stopped = json.loads((out / "baseline" / "cnn" / "reproduce.json").read_text())
    assert stopped["done"] is False and (out / "baseline" / "cnn" / "checkpoints").is_dir()
    assert _reproduce(["baseline"], ct_folder, out, "--max-steps", "12") == 0
    rows = [json.loads(line) for line in (out / "baseline" / "cnn" / "metrics.jsonl").read_text().splitlines()]
    assert max(r["step"] for r in rows) == 12 and (out / "weights" / "baseline.safetensors").is_file()
    assert json.loads((out / "baseline" / "cnn" / "reproduce.json").read_text())["done"] is True


def test_another_data_folder_with_the_same_out_is_refused(ct_folder, tmp_path, capsys) -> None:
    """A data part already cut from one CT folder is not silently reused for another."""
    out, other = tmp_path / "out", tmp_path / "other"
    assert _reproduce(["baseline"], ct_folder, out, "--max-steps", "1") == 0
    other.mkdir()
    for path in ct_folder.iterdir():
        (other / path.name).symlink_to(path)
    (other / "ct02_phantom.nii.gz").unlink()
    write_volume(make_chest_phantom(shape=(141, 40, 40), spacing=(4.5, 4.5, 1.0), seed=99),
                 other / "ct02_other.nii.gz")
    capsys.readouterr()
    assert _reproduce(["baseline"], other, out, "--max-steps", "1") == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and "ct02_lower80.nii.gz was cut from ct02_phantom.nii.gz" in lines[0], lines
