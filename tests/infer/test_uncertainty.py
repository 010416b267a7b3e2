"""Uncertainty maps: split-conformal calibration, stored fits tied to the weights, and the command line."""

from __future__ import annotations

import numpy as np
import pytest

from thinslice.checkpoints.bundle import DEFAULT_BUNDLE_DIR, save_model
from thinslice.cli.main import main
from thinslice.degrade.pairs import simulate_pair
from thinslice.errors import ThinsliceError
from thinslice.infer.uncertainty import (
    Entry,
    Features,
    StdModel,
    Welford,
    conformal_scale,
    coverage,
    find_calibration,
    fit_model,
    read_calibrations,
    write_calibrations,
)
from thinslice.io import read_volume, write_volume
from thinslice.models.factory import build_planes


def _synthetic(seed: int, true_scale: float) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """A raw spread map and errors whose std is exactly ``true_scale`` times it (so the right answer is known)."""
    rng = np.random.default_rng(seed)
    spread = rng.uniform(30.0, 150.0, (32, 40, 40)).astype(np.float32)
    mean = np.full(spread.shape, 40.0, np.float32)
    truth = mean - rng.standard_normal(spread.shape).astype(np.float32) * true_scale * spread
    return {"mean": mean, "spread": spread}, truth


def test_conformal_scale_of_a_gaussian_is_its_std() -> None:
    error = np.random.default_rng(0).standard_normal(200_000) * 2.0
    assert conformal_scale(error, np.ones_like(error)) == pytest.approx(2.0, rel=0.02)


def test_calibration_recovers_a_known_scale_and_covers_fresh_data() -> None:
    maps, truth = _synthetic(0, true_scale=3.0)
    model, multipliers, _ = fit_model([(maps, truth)], Features(("spread",), (1, 1, 1)), k=4)
    ratio = model.std(maps) / (3.0 * maps["spread"])
    assert float(np.median(ratio)) == pytest.approx(1.0, abs=0.05)
    assert multipliers["0.5"] == pytest.approx(0.674, abs=0.03)  # Gaussian errors: Gaussian multipliers
    fresh, fresh_truth = _synthetic(1, true_scale=3.0)
    observed = coverage(fresh["mean"] - fresh_truth, model.std(fresh))
    assert observed["0.9"] == pytest.approx(0.9, abs=0.01)
    assert observed["0.5"] == pytest.approx(0.5, abs=0.02)


def test_a_calibration_for_other_weights_is_refused(tmp_path) -> None:
    model = StdModel(Features(("spread",), (1, 1, 1)), (0.0, 1.0), 2.0)
    write_calibrations(tmp_path, [Entry("planes", 4, {"planes.safetensors": "aaaa"}, model)])
    found = find_calibration(tmp_path, "planes", 4, {"planes.safetensors": "aaaa"})
    assert found.entry is not None and found.entry.model == model
    stale = find_calibration(tmp_path, "planes", 4, {"planes.safetensors": "bbbb"})
    assert stale.entry is None and "weights changed" in stale.note
    assert "python -m thinslice.evaluate.fit_uncertainty" in stale.note
    assert find_calibration(tmp_path, "planes", 3, {"planes.safetensors": "aaaa"}).entry is None


def test_planes_uncertainty_writes_a_map_with_the_outputs_geometry(tmp_path, thin_phantom, capsys) -> None:
    bundle = tmp_path / "bundle"
    save_model(build_planes("tiny"), "planes", "tiny", bundle)
    thick, _ = simulate_pair(thin_phantom, factor=2, profile="gaussian")
    write_volume(thick, tmp_path / "thick.nii.gz")
    args = ["upsample", str(tmp_path / "thick.nii.gz"), str(tmp_path / "thin.nii.gz"), "--spacing",
            str(thin_phantom.slice_spacing), "--method", "planes", "--checkpoint", str(bundle), "--uncertainty",
            "--precision", "fp32"]
    assert main(args) == 0
    assert "UNCALIBRATED (no calibration for planes x2" in capsys.readouterr().out
    out, std = read_volume(tmp_path / "thin.nii.gz"), read_volume(tmp_path / "thin_std.nii.gz")
    assert std.array.shape == out.array.shape and std.grid_differences(out) == []
    assert np.all(std.array >= 0)
    from thinslice.infer.planes import Planes

    hashes = Planes.from_pretrained(bundle).network_hashes(2)
    # every feature the shipped planes calibration uses must be computable in a run (zero weights: std 7 HU)
    shipped = [e for e in read_calibrations(DEFAULT_BUNDLE_DIR) if e.method == "planes"]
    names = shipped[0].model.features.names if shipped else Features().names
    flat = StdModel(Features(names, (3, 7, 7)), (np.log(7.0), *[0.0] * len(names)), 1.0)
    write_calibrations(bundle, [Entry("planes", 2, hashes, flat)])
    assert main([*args, "--overwrite"]) == 0  # the same output and std map again
    printed = capsys.readouterr().out
    assert "calibrated for planes x2" in printed and "wider than 50 HU in 0.0% of body voxels" in printed
    assert np.allclose(read_volume(tmp_path / "thin_std.nii.gz").array, 7.0, rtol=1e-4)


def test_uncertainty_on_a_method_without_it_is_one_clear_line(tmp_path, thin_phantom, capsys) -> None:
    thick, _ = simulate_pair(thin_phantom, factor=2, profile="gaussian")
    write_volume(thick, tmp_path / "thick.nii.gz")
    rc = main(["upsample", str(tmp_path / "thick.nii.gz"), str(tmp_path / "thin.nii.gz"), "--spacing",
               str(thin_phantom.slice_spacing), "--method", "cubic-dc", "--uncertainty"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1
    assert "method 'cubic-dc' gives no uncertainty map: use --method planes --uncertainty" in err[0]
    assert not (tmp_path / "thin_std.nii.gz").exists()


def test_ldm_uncertainty_means_samples() -> None:
    from thinslice.infer.upsample import Upsampler

    assert Upsampler("ldm", uncertainty=True).options_of("ldm")["samples"] == 4
    assert Upsampler("ldm", uncertainty=True, samples=8).options_of("ldm")["samples"] == 8
    assert Upsampler("planes", uncertainty=True).options_of("planes")["uncertainty"] is True
    with pytest.raises(ThinsliceError, match="gives no uncertainty map"):
        Upsampler("cubic-dc", uncertainty=True)


def test_welford_matches_the_mean_and_std_of_held_samples() -> None:
    """ldm's running mean/std (the samples are never held at once) equals numpy's over the held samples."""
    samples = np.random.default_rng(3).normal(-500.0, 40.0, (5, 4, 6, 7)).astype(np.float32)
    acc, mean_only = Welford(samples.shape[1:], True), Welford(samples.shape[1:], False)
    for x in samples:
        acc.add(x)
        mean_only.add(x)
    np.testing.assert_allclose(acc.mean, samples.mean(axis=0), rtol=1e-5, atol=1e-3)
    np.testing.assert_allclose(acc.std(), samples.std(axis=0, ddof=1), rtol=1e-4, atol=1e-3)
    assert mean_only.std() is None and np.array_equal(mean_only.mean, acc.mean)
    single = Welford((2, 2), False)
    single.add(samples[0, 0, :2, :2])
    assert np.array_equal(single.mean, samples[0, 0, :2, :2])  # one sample: its own values, bit for bit


def test_intensity_class_features_let_one_fit_serve_both_classes() -> None:
    """Errors twice as wide in lung as in soft tissue at the same spread: with the ``lung`` feature the fitted std
    follows the class, so each class's 90% interval covers 90% (without it, lung under-covers, tissue over-covers)."""
    rng = np.random.default_rng(3)
    shape = (32, 40, 40)
    mean = np.full(shape, 40.0, np.float32)
    mean[:, 10:30, 10:30] = -850.0  # a lung inside the body (the body mask fills it)
    spread = np.full(shape, 20.0, np.float32)
    scale = np.where(mean < -500, 2.0, 1.0).astype(np.float32) * spread
    truth = mean - rng.standard_normal(shape).astype(np.float32) * scale
    cases = [({"mean": mean, "spread": spread}, truth)]
    lung = mean < -500
    for names, ok in ((("spread",), False), (("spread", "lung"), True)):
        model, _, _ = fit_model(cases, Features(names, (1, 3, 3)), k=4)
        std, error = model.std({"mean": mean, "spread": spread}), mean - truth
        inner = np.ones(shape, bool)
        inner[:, 8:32, 8:32] = False  # away from the class border, where the window mixes them
        inner[:, 12:28, 12:28] = True
        by_class = [coverage(error[m & inner], std[m & inner])["0.9"] for m in (lung, ~lung)]
        assert all(abs(c - 0.9) < 0.02 for c in by_class) == ok, (names, by_class)
