"""The clinical case: the profile family, --profile auto, the data split, millimetre bench cases, selfcheck and
training examples whose true slice profile differs from the declared one."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch
from scipy.ndimage import gaussian_filter

from thinslice.checkpoints.bundle import save_model
from thinslice.cli.main import main
from thinslice.data.phantom import make_chest_phantom
from thinslice.data.split import HELD_OUT, TRAIN, materialise, parts
from thinslice.degrade.estimate import estimate_profile
from thinslice.degrade.pairs import simulate_pair
from thinslice.degrade.profiles import PROFILE_FAMILY, degrade, profile_matrix
from thinslice.errors import ThinsliceError
from thinslice.evaluate.bench import parse_methods, parse_mm_case, run_benchmark, volume_cases
from thinslice.examples.planes import PlaneSampler
from thinslice.infer.pipeline import Acquisition
from thinslice.infer.upsample import run_method
from thinslice.io import read_volume, write_volume
from thinslice.io.volume import Volume
from thinslice.models.factory import build_planes
from thinslice.models.planes import acquisition_vector
from thinslice.presets import load_preset


@pytest.fixture(scope="module")
def texture() -> Volume:
    """Isotropic texture (smoothed noise, 1 mm voxels): the one volume whose through-plane and in-plane statistics
    are equal by construction, so a profile estimate can be checked exactly."""
    rng = np.random.default_rng(0)
    return Volume(gaussian_filter(rng.normal(size=(136, 96, 96)).astype(np.float32), 1.0) * 300, (1.0, 1.0, 1.0))


def _fwhm(profile: str, thickness: float) -> float:
    """Measured FWHM (mm) of the response of densely overlapping slabs to one bright thin slice."""
    centres = np.arange(80.0, 120.0, 0.05)
    response = profile_matrix(np.arange(200, dtype=float), centres, thickness, profile)[:, 100]
    response = response / response.max()
    above = centres[response >= 0.5]
    return float(above[-1] - above[0])


@pytest.mark.parametrize("profile", ["triangle", "trapezoid", "tailed"])
def test_family_profiles_are_normalised_and_have_the_thickness_as_fwhm(profile: str) -> None:
    w = profile_matrix(np.arange(40) * 1.25, np.linspace(-0.5, 49.0, 23), 5.0, profile)
    assert np.all(w >= 0)
    np.testing.assert_allclose(w.sum(axis=1), 1.0, atol=1e-12)
    expected = 6.0 * (1.1 if profile == "tailed" else 1.0)  # the tails widen the half maximum a little
    assert _fwhm(profile, 6.0) == pytest.approx(expected, rel=0.08)


def test_family_profiles_simulate_and_project(thin_phantom: Volume) -> None:
    """Every family member degrades a volume and cubic-dc reproduces its slices when told that profile."""
    for profile in PROFILE_FAMILY:
        thick, _ = simulate_pair(thin_phantom, factor=4, profile=profile)
        out = run_method(thick, thin_phantom.slice_spacing, "cubic-dc", profile=profile)
        assert "consistency_hu" in out.report and out.volume.num_slices == 4 * thick.num_slices


@pytest.mark.parametrize(("profile", "ratio"), [("gaussian", 0.8), ("gaussian", 1.0), ("gaussian", 1.3),
                                                ("gaussian", 1.6), ("triangle", 1.0)])
def test_profile_estimate_recovers_the_fwhm(texture: Volume, profile: str, ratio: float) -> None:
    thick = degrade(texture, thickness=4 * ratio, spacing=4, profile=profile)
    found = estimate_profile(thick)
    assert found.profile == "gaussian"
    assert found.ratio == pytest.approx(ratio, rel=0.06)
    assert found.fwhm_mm == pytest.approx(4 * ratio, rel=0.06)


def test_profile_estimate_gives_a_box_as_the_gaussian_of_equal_width(texture: Volume) -> None:
    """A box of thickness T has the variance of a Gaussian of FWHM 0.68 T: that is what the spectrum tells."""
    found = estimate_profile(degrade(texture, thickness=4, spacing=4, profile="box"))
    assert 0.6 < found.ratio < 0.76


def test_profile_auto_is_used_and_reported(texture: Volume) -> None:
    thick = degrade(texture, thickness=5.2, spacing=4, profile="gaussian")
    thick.slice_thickness = 4.0  # the file's nominal thickness, not the true FWHM
    result = run_method(thick, 1.0, "cubic-dc", profile="auto")
    assert "estimated from the scan" in result.report["profile"]
    acquisition = Acquisition.of(thick, "auto")
    assert acquisition.thickness_mm == pytest.approx(5.2, rel=0.06)
    with pytest.raises(ThinsliceError, match="drop --thickness"):
        Acquisition.of(thick, "auto", 5.0)
    with pytest.raises(ThinsliceError, match="at least 8 slices"):
        estimate_profile(degrade(texture, thickness=20, spacing=20))


def test_profile_auto_on_the_command_line(tmp_path, thin_phantom: Volume, capsys) -> None:
    thick, _ = simulate_pair(thin_phantom, factor=2, profile="gaussian")
    write_volume(thick, tmp_path / "thick.nii.gz")
    rc = main(["upsample", str(tmp_path / "thick.nii.gz"), str(tmp_path / "thin.nii.gz"), "--spacing",
               str(thin_phantom.slice_spacing), "--method", "cubic-dc", "--profile", "auto"])
    assert rc == 0
    assert read_volume(tmp_path / "thin.nii.gz").num_slices == 2 * thick.num_slices


def test_family_members_share_the_gaussian_conditioning() -> None:
    assert acquisition_vector(1.0, "triangle") == acquisition_vector(1.0, "gaussian")
    assert acquisition_vector(1.0, "box") != acquisition_vector(1.0, "gaussian")


def _sampler(mismatch: float, volume: Volume) -> PlaneSampler:
    preset = load_preset("tiny")
    data = dataclasses.replace(preset.planes_data, profile_mismatch=mismatch, intensity_jitter=0.05,
                               kernel_sigma=1.0)
    return PlaneSampler([volume], data, preset.degradation, preset.planes, batch_size=4, seed=0)


def test_mismatch_draws_true_profiles_from_the_family(thin_phantom: Volume) -> None:
    always, never = _sampler(1.0, thin_phantom), _sampler(0.0, thin_phantom)
    draws = [always._true_slabs(("gaussian", 1.0)) for _ in range(200)]
    assert {p for p, _ in draws} == set(PROFILE_FAMILY)
    ratios = np.array([r for _, r in draws])
    assert ratios.min() >= 0.8 - 0.025 and ratios.max() <= 1.6 + 0.025 and ratios.std() > 0.1
    assert always._true_slabs(("decimate", 1.0)) == ("decimate", 1.0)
    assert never._true_slabs(("box", 1.1)) == ("box", 1.1)
    batch = next(always)  # examples are still made, the network told the declared profile
    assert batch["thick"].shape[0] == 4 and torch.isfinite(batch["base"]).all()


def test_init_from_a_network_with_fewer_factors(tmp_path) -> None:
    """--init a x4/x5 network from a x4 one: trunk and x4 head copied, the x5 head starts fresh (at zero)."""
    from thinslice.train.planes import initial_planes

    tiny = load_preset("tiny")
    x4 = dataclasses.replace(tiny, planes=dataclasses.replace(tiny.planes, factors=(4,)))
    both = dataclasses.replace(tiny, planes=dataclasses.replace(tiny.planes, factors=(4, 5)))
    source = build_planes(x4)
    for head in source.heads_out.values():
        torch.nn.init.normal_(head.weight, std=0.05)
    save_model(source, "planes", x4, tmp_path)
    model = initial_planes(both, str(tmp_path / "planes.safetensors"), resume=False)
    mine, theirs = model.state_dict(), source.state_dict()
    assert all(torch.equal(mine[k], v) for k, v in theirs.items())
    assert torch.count_nonzero(mine["heads_out.5.weight"]) == 0


def test_split_parts_and_files(tmp_path) -> None:
    """The split's sets, and the files it writes from a folder named like the shared one."""
    assert {p.prefix for p in parts("train_unseen")} == {p.prefix for p in TRAIN} - {"ct07", "ct08"}
    held = {p.prefix: p for p in HELD_OUT}
    trained = {p.prefix: p for p in TRAIN}
    for prefix, part in held.items():  # held-out slabs start where the training slabs stop
        assert part.start == trained[prefix].stop
    src = tmp_path / "ct"
    src.mkdir()
    sizes = {"ct02": 141, "ct04": 12, "ct05": 12, "ct06": 12, "ct07": 275, "ct08": 160, "ct09": 12, "ct10": 12}
    for prefix, n in sizes.items():
        write_volume(Volume(np.full((n, 4, 4), float(n), np.float32), (1.0, 1.0, 2.0)), src / f"{prefix}_x.nii.gz")
    files = materialise(src, tmp_path / "split", sets=("train", "heldout"))
    assert [f.name for f in files["heldout"]] == ["ct02_from80.nii.gz", "ct07_from175.nii.gz", "ct08_from100.nii.gz"]
    assert read_volume(files["heldout"][1]).num_slices == 100
    assert read_volume(files["train"][4]).num_slices == 175
    with pytest.raises(ThinsliceError, match="expected one ct03"):
        from thinslice.data.split import source_file

        source_file(src, "ct03")


def test_bench_millimetre_cases(thin_phantom: Volume) -> None:
    assert parse_mm_case("5/2.5") == (5.0, 2.5) and parse_mm_case("3") == (3.0, 3.0)
    with pytest.raises(ThinsliceError, match="THICKNESS/SPACING"):
        parse_mm_case("five")
    cases = volume_cases(1.25, [4], ["gaussian", "decimate"], mm_cases=[(5.0, 5.0), (5.0, 2.5), (1.0, 1.0)])
    labels = [(c.label, c.profile, c.factor, c.ratio) for c in cases]
    assert ("5/5 mm -> 1.25 mm", "gaussian", 4.0, 1.0) in labels
    assert ("5/2.5 mm -> 1.25 mm", "gaussian", 2.0, 2.0) in labels
    assert not any(label.startswith("1/1") for label, *_ in labels)  # thinner than the volume: skipped
    assert not any(p == "decimate" and "mm" in label for label, p, *_ in labels)
    lines: list[str] = []
    rows = run_benchmark([thin_phantom], [], ["box"], parse_methods(["cubic-dc", "cubic-dc@auto", "cubic-dc@gaussian"]),
                         mm_cases=[(5.0, 5.0)], log=lines.append)
    assert [r.method for r in rows] == ["cubic-dc", "cubic-dc@auto", "cubic-dc@gaussian"]
    assert all(r.case == "5/5 mm -> 1.25 mm" and r.factor == 4 for r in rows)
    assert rows[0].dc_residual_hu < 0.05 < rows[2].dc_residual_hu  # told the wrong profile: not consistent


def test_bench_skips_a_method_that_cannot_serve_a_case(thin_phantom: Volume) -> None:
    lines: list[str] = []
    rows = run_benchmark([thin_phantom], [2.5], ["gaussian"], parse_methods(["cubic", "planes"]), log=lines.append)
    assert [r.method for r in rows] == ["cubic"]
    assert any("planes skipped" in line for line in lines)


def test_selfcheck_json(tmp_path, capsys) -> None:
    scan = degrade(make_chest_phantom(shape=(64, 64, 64), spacing=(1.0, 1.0, 1.25), seed=2), factor=4)
    write_volume(scan, tmp_path / "thick.nii.gz")
    assert main(["selfcheck", str(tmp_path / "thick.nii.gz"), "--methods", "linear", "cubic-dc", "--factor", "2",
                 "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert set(report["methods"]) == {"linear", "cubic-dc"}
    assert set(report["methods"]["linear"]) == {"psnr", "ssim", "mae_hu_body"}
    assert report["recommended"] in report["methods"]
    assert set(report["checks"]) == {"through-plane", "in-plane"}
    assert report["methods"]["cubic-dc"]["psnr"] > report["methods"]["linear"]["psnr"]
    assert main(["selfcheck", str(tmp_path / "thick.nii.gz"), "--factor", "40"]) != 0


def test_a_network_without_x4_validates_at_its_own_factor(tmp_path, thin_phantom: Volume) -> None:
    """An x3-only network (as an x5 specialist) is validated at x3, not refused at the trainers' usual x4."""
    from thinslice.train.planes import PlanesTrainOptions, train_planes

    tiny = load_preset("tiny")
    preset = dataclasses.replace(tiny, name="tiny_x3", planes=dataclasses.replace(tiny.planes, factors=(3,)),
                                 degradation=dataclasses.replace(tiny.degradation, factors=(3.0,)))
    path = tmp_path / "tiny_x3.json"
    path.write_text(json.dumps(dataclasses.asdict(preset)))
    run = tmp_path / "run"
    opts = PlanesTrainOptions(run_dir=run, preset=str(path), max_steps=4, lr=2e-3, ema_decay=0.0, device="cpu",
                              progress=False, seed=0, val_every=4, mixed_precision="no")
    train_planes([thin_phantom], [thin_phantom], opts)
    logged = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert any(np.isfinite(r.get("val/psnr", np.nan)) for r in logged)
