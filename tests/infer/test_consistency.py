"""Data consistency: projection onto {x : A x = thick} for the slice-profile operator."""

from __future__ import annotations

import numpy as np
import pytest

from thinslice.data.phantom import make_chest_phantom
from thinslice.degrade import profile_matrix, simulate_pair
from thinslice.degrade.operators import thick_profile_operator
from thinslice.errors import ThinsliceError
from thinslice.infer import upsample
from thinslice.infer.consistency import (
    consistency_residual_hu,
    enforce_consistency,
    make_consistent,
)


def _gaussian_operator(n_thin: int = 20, factor: float = 3.0) -> np.ndarray:
    thin = np.arange(n_thin, dtype=np.float64)
    centres = np.arange(factor / 2 - 0.5, n_thin - factor / 2, factor)
    return profile_matrix(thin, centres, factor, "gaussian")


def test_enforced_volume_reproduces_thick_slices() -> None:
    rng = np.random.default_rng(0)
    a = _gaussian_operator()
    truth = rng.uniform(-1000, 1500, size=(a.shape[1], 5, 6)).astype(np.float32)
    thick = np.einsum("mn,nab->mab", a, truth).astype(np.float32)
    guess = rng.uniform(-1000, 1500, size=truth.shape).astype(np.float32)
    assert consistency_residual_hu(guess, thick, a)["mean_abs"] > 10
    fixed = enforce_consistency(guess, thick, a)
    assert fixed.dtype == np.float32 and fixed.shape == guess.shape
    residual = consistency_residual_hu(fixed, thick, a)
    assert residual["max_abs"] < 1e-3
    # A volume that is already consistent is left as it is (projection).
    np.testing.assert_allclose(enforce_consistency(truth, thick, a), truth, atol=1e-3)


def test_correction_is_the_minimum_norm_one() -> None:
    rng = np.random.default_rng(1)
    a = _gaussian_operator(n_thin=12, factor=2.0)
    x = rng.normal(0, 100, size=(a.shape[1], 2, 3))
    y = rng.normal(0, 100, size=(a.shape[0], 2, 3))
    fixed = enforce_consistency(x, y, a).astype(np.float64)
    residual = (y - np.einsum("mn,nab->mab", a, x)).reshape(a.shape[0], -1)
    min_norm, *_ = np.linalg.lstsq(a, residual, rcond=None)
    np.testing.assert_allclose((fixed - x).reshape(a.shape[1], -1), min_norm, atol=1e-3)
    # The correction is orthogonal to the null space of A: what thick slices cannot see is not touched.
    _, _, vt = np.linalg.svd(a)
    null_basis = vt[a.shape[0]:]
    assert np.abs(null_basis @ (fixed - x).reshape(a.shape[1], -1)).max() < 1e-3


@pytest.mark.parametrize("factor", [2, 3])
def test_decimate_keeps_the_sampled_slices_exactly(factor: int) -> None:
    thin = make_chest_phantom(shape=(24, 16, 16), spacing=(4.0, 4.0, 1.0), seed=3)
    thick, _ = simulate_pair(thin, factor=factor, profile="decimate")
    lr = upsample(thick, 1.0, method="linear")
    a = thick_profile_operator(thick, 1.0, "decimate").extended  # decimation reaches no slice beyond the grid
    assert np.all(np.isclose(a.max(axis=1), 1.0))  # every thick slice is one thin slice
    sampled = a.argmax(axis=1)
    fixed = enforce_consistency(lr.slices_first(), thick.slices_first(), a)
    np.testing.assert_allclose(fixed[sampled], thick.slices_first(), atol=1e-3)
    others = np.setdiff1d(np.arange(a.shape[1]), sampled)
    np.testing.assert_array_equal(fixed[others], lr.slices_first()[others])


@pytest.mark.parametrize("profile", ["gaussian", "box", "decimate"])
@pytest.mark.parametrize("factor", [2.0, 3.0])
def test_operator_matches_the_thick_slice_simulation(profile: str, factor: float) -> None:
    """The true thin slices on the upsampling grid are consistent with the simulated thick input."""
    thin = make_chest_phantom(shape=(30, 16, 16), spacing=(4.0, 4.0, 1.25), seed=4)
    thick, target = simulate_pair(thin, factor=factor, profile=profile)
    a = thick_profile_operator(thick, 1.25, profile)
    assert a.shape == (thick.num_slices, target.num_slices)
    assert consistency_residual_hu(target.slices_first(), thick.slices_first(), a)["max_abs"] < 0.05


def test_make_consistent_volume_level() -> None:
    thin = make_chest_phantom(shape=(24, 16, 16), spacing=(4.0, 4.0, 1.25), seed=5)
    thick, _ = simulate_pair(thin, factor=3.0, profile="box")
    cubic = upsample(thick, 1.25, method="cubic")
    fixed, report = make_consistent(cubic, thick, profile="box")
    assert fixed.grid_differences(cubic) == []
    assert report["before_mean_abs"] > report["after_mean_abs"]
    assert report["after_max_abs"] < 1e-2


def test_mismatched_shapes_are_refused() -> None:
    a = _gaussian_operator()
    with pytest.raises(ThinsliceError, match="does not map"):
        enforce_consistency(np.zeros((a.shape[1] + 1, 2, 2)), np.zeros((a.shape[0], 2, 2)), a)
    with pytest.raises(ThinsliceError, match="in-plane"):
        enforce_consistency(np.zeros((a.shape[1], 2, 2)), np.zeros((a.shape[0], 3, 2)), a)


@pytest.mark.parametrize("profile", ["gaussian", "box"])
def test_cubic_dc_is_consistent_and_closer_to_the_truth_than_cubic(profile: str, tmp_path) -> None:
    from thinslice.cli.main import main
    from thinslice.evaluate.metrics import evaluate_volumes
    from thinslice.io import read_volume, write_volume

    thin = make_chest_phantom(shape=(48, 48, 48), spacing=(4.0, 4.0, 1.25), seed=5)
    thick, truth = simulate_pair(thin, factor=4, profile=profile)
    cubic = upsample(thick, 1.25, method="cubic")
    dc = upsample(thick, 1.25, method="cubic-dc", profile=profile)
    assert dc.grid_differences(cubic) == []
    a = thick_profile_operator(thick, 1.25, profile)
    assert consistency_residual_hu(dc.slices_first(), thick.slices_first(), a)["max_abs"] < 0.5
    assert consistency_residual_hu(cubic.slices_first(), thick.slices_first(), a)["mean_abs"] > 1.0
    assert evaluate_volumes(dc, truth)["psnr"] > evaluate_volumes(cubic, truth)["psnr"] + 0.1
    # Through the CLI, with the profile as an option; an unknown profile is a one-line error.
    write_volume(thick, tmp_path / "thick.nii.gz", dtype="float32")
    out = tmp_path / "dc.nii.gz"
    assert main(["upsample", str(tmp_path / "thick.nii.gz"), str(out), "--spacing", "1.25", "--method", "cubic-dc",
                 "--profile", profile, "--dtype", "float32"]) == 0
    np.testing.assert_allclose(read_volume(out).array, dc.array, atol=1e-2)
    with pytest.raises(ThinsliceError, match="profile"):
        upsample(thick, 1.25, method="cubic-dc", profile="lorentzian")


@pytest.mark.parametrize("profile", ["gaussian", "box"])
@pytest.mark.parametrize(("factor", "ratio"), [(1, 3.0), (2, 2.0), (2, 3.0), (4, 3.0)])
def test_overlapping_slices_never_make_cubic_dc_worse_than_cubic(profile: str, factor: int, ratio: float) -> None:
    """Heavily overlapping slabs make the profile operator ill-conditioned; the end slabs reach beyond the grid.
    The regularised projection on the extended grid must stay at least as good as plain cubic interpolation."""
    from thinslice.evaluate.metrics import psnr

    thin = make_chest_phantom(shape=(96, 40, 40), spacing=(4.0, 4.0, 1.0), seed=6)
    thick, truth = simulate_pair(thin, thickness=ratio * factor, spacing=factor, profile=profile)
    op = thick_profile_operator(thick, 1.0, profile)
    assert op.pad > 0 and 0 < op.inside_rows.size < thick.num_slices  # the end slabs reach beyond the grid
    cubic = upsample(thick, 1.0, method="cubic").slices_first()
    dc = upsample(thick, 1.0, method="cubic-dc", profile=profile).slices_first()
    assert psnr(dc, truth.slices_first()) >= psnr(cubic, truth.slices_first())
    assert consistency_residual_hu(truth.slices_first(), thick.slices_first(), op)["max_abs"] < 0.05
