"""Thick-slice simulation: profile weights, slab geometry, pairs, array/torch helpers and the degrade CLI."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from thinslice.cli.main import main
from thinslice.degrade import (
    apply_profile,
    apply_profile_torch,
    degrade,
    degrade_slices,
    degrade_slices_torch,
    profile_matrix,
    random_degradation,
    simulate_pair,
    thick_weights,
)
from thinslice.errors import ThinsliceError
from thinslice.infer import thin_grid
from thinslice.io.volume import Volume


@pytest.mark.parametrize("profile", ["box", "gaussian", "decimate"])
def test_weights_sum_to_one_and_are_nonnegative(profile: str) -> None:
    thin = np.arange(40) * 1.25
    centres = np.linspace(-0.5, 49.0, 23)  # includes centres near and beyond both ends
    w = profile_matrix(thin, centres, 5.0, profile)
    assert w.shape == (23, 40)
    assert np.all(w >= 0)
    np.testing.assert_allclose(w.sum(axis=1), 1.0, atol=1e-12)


def test_gaussian_response_has_fwhm_equal_to_thickness() -> None:
    thickness = 6.0
    thin = np.arange(200, dtype=float)  # 1 mm thin slices
    centres = np.arange(80.0, 120.0, 0.05)  # densely overlapping thick slices
    response = profile_matrix(thin, centres, thickness, "gaussian")[:, 100]  # one bright thin slice at 100 mm
    half = response.max() / 2
    above = np.flatnonzero(response >= half)
    lo, hi = above[0], above[-1]
    # Interpolate the half-maximum crossings on both flanks.
    left = np.interp(half, [response[lo - 1], response[lo]], [centres[lo - 1], centres[lo]])
    right = np.interp(half, [response[hi + 1], response[hi]], [centres[hi + 1], centres[hi]])
    assert right - left == pytest.approx(thickness, rel=0.02)
    assert centres[np.argmax(response)] == pytest.approx(100.0, abs=0.05)


def test_box_integer_factor_is_slab_mean_and_centres_are_slab_centres(thin_phantom: Volume) -> None:
    k = 3
    thick = degrade(thin_phantom, factor=k, profile="box")
    thin = thin_phantom.slices_first()
    m = thin.shape[0] // k
    assert thick.num_slices == m
    expected = thin[: m * k].reshape(m, k, *thin.shape[1:]).mean(axis=1)
    np.testing.assert_allclose(thick.slices_first(), expected, atol=1e-3)
    positions = thin_phantom.slice_positions_mm()[: m * k].reshape(m, k).mean(axis=1)
    np.testing.assert_allclose(thick.slice_positions_mm(), positions, atol=1e-6)
    assert thick.slice_spacing == pytest.approx(k * 1.25)
    assert thick.slice_thickness == pytest.approx(k * 1.25)
    assert thick.spacing[:2] == thin_phantom.spacing[:2]


@pytest.mark.parametrize(("k", "first"), [(2, 0), (3, 1), (4, 1), (5, 2)])
def test_decimate_picks_exact_thin_slices(thin_phantom: Volume, k: int, first: int) -> None:
    thick = degrade(thin_phantom, factor=k, profile="decimate")
    thin = thin_phantom.slices_first()
    picked = thin[first::k][: thick.num_slices]
    np.testing.assert_array_equal(thick.slices_first(), picked)
    # Geometry reports the slab centre (same thick grid as box/gaussian), see profiles.py.
    box = degrade(thin_phantom, factor=k, profile="box")
    assert thick.grid_differences(box) == []


def test_overlapping_slices(thin_phantom: Volume) -> None:
    s = thin_phantom.slice_spacing
    thick = degrade(thin_phantom, thickness=4 * s, spacing=2 * s, profile="box")
    thin = thin_phantom.slices_first()
    n = thin.shape[0]
    assert thick.num_slices == (n - 4) // 2 + 1
    for m in (0, 5, thick.num_slices - 1):
        np.testing.assert_allclose(thick.slices_first()[m], thin[2 * m: 2 * m + 4].mean(axis=0), atol=1e-3)
    assert thick.slice_spacing == pytest.approx(2 * s)
    assert thick.slice_thickness == pytest.approx(4 * s)
    # First slab [p0 - s/2, p0 + 3.5 s] has its centre at p0 + 1.5 s.
    assert thick.slice_positions_mm()[0] == pytest.approx(thin_phantom.slice_positions_mm()[0] + 1.5 * s)


def test_non_integer_factor_weights_partial_slices(thin_phantom: Volume) -> None:
    thick = degrade(thin_phantom, factor=2.5, profile="box")
    thin = thin_phantom.slices_first().astype(np.float64)
    s = thin_phantom.slice_spacing
    assert thick.num_slices == int(thin.shape[0] / 2.5)
    # Slab 0 = thin units [-0.5, 2.0]: slices 0 and 1 whole, half of slice 2.
    np.testing.assert_allclose(thick.slices_first()[0], (thin[0] + thin[1] + 0.5 * thin[2]) / 2.5, atol=1e-3)
    # Slab 1 = [2.0, 4.5]: half of slice 2, slices 3 and 4 whole.
    np.testing.assert_allclose(thick.slices_first()[1], (0.5 * thin[2] + thin[3] + thin[4]) / 2.5, atol=1e-3)
    assert thick.slice_positions_mm()[0] == pytest.approx(thin_phantom.slice_positions_mm()[0] + 0.75 * s)


def test_slice_axis_not_last_numpy_axis() -> None:
    """A sagittal stack: slices along index axis i (the last numpy axis), rotated orientation."""
    rng = np.random.default_rng(0)
    array = rng.normal(size=(10, 12, 18)).astype(np.float32)  # (k, j, i); i is the slice axis
    direction = np.array([[0.0, 0.0, 1.0], [1.0, 0.0, 0.0], [0.0, 1.0, 0.0]])  # columns: i along y, j along z
    vol = Volume(array, spacing=(2.0, 0.8, 0.8), origin=(5.0, -3.0, 7.0), direction=direction)
    assert vol.slice_axis == 0
    thick = degrade(vol, factor=3, profile="box")
    assert thick.shape_ijk == (6, 12, 10)
    np.testing.assert_allclose(thick.array, array.reshape(10, 12, 6, 3).mean(axis=3), atol=1e-5)
    # Origin moves by one thin slice along the i direction (first slab centre = mean of thin centres 0, 1, 2).
    np.testing.assert_allclose(thick.origin, np.array(vol.origin) + direction[:, 0] * 2.0, atol=1e-9)
    assert thick.spacing == (6.0, 0.8, 0.8)


def test_bad_requests_are_clear_errors(thin_phantom: Volume) -> None:
    with pytest.raises(ThinsliceError, match="finer than the input"):
        degrade(thin_phantom, thickness=5.0, spacing=1.0)  # 1.25 mm slices: a "thick" stack finer than the input
    with pytest.raises(ThinsliceError, match="only one"):
        degrade(thin_phantom, thickness=40.0, spacing=30.0)  # 60 mm deep: a single 40 mm slab
    with pytest.raises(ThinsliceError, match="thinner than the input slice spacing"):
        degrade(thin_phantom, thickness=0.5, profile="box")
    with pytest.raises(ThinsliceError, match="either a factor"):
        degrade(thin_phantom, factor=2, thickness=3.0)
    with pytest.raises(ThinsliceError, match="unknown slice profile"):
        degrade(thin_phantom, factor=2, profile="lorentzian")
    with pytest.raises(ThinsliceError, match="deep along the slice axis"):
        degrade(thin_phantom, thickness=100.0)


@pytest.mark.parametrize("profile", ["box", "gaussian", "decimate"])
def test_simulate_pair_target_is_on_the_upsampling_grid(thin_phantom: Volume, profile: str) -> None:
    thick, target = simulate_pair(thin_phantom, factor=4, profile=profile)
    n, offset = thin_grid(thick, thin_phantom.slice_spacing)
    assert target.num_slices == n == 4 * thick.num_slices
    assert target.slice_positions_mm()[0] == pytest.approx(thick.slice_positions_mm()[0] + offset)
    np.testing.assert_array_equal(target.slices_first(), thin_phantom.slices_first()[:n])
    # Non-integer factor: 48 / 2.5 -> 19 thick slices covering 47.5 thin slices; the centred grid would sit a quarter
    # slice off the thin slices, so the pair keeps 18 (45 thin slices, a whole number) and 45 targets.
    thick, target = simulate_pair(thin_phantom, factor=2.5, profile=profile)
    assert (thick.num_slices, target.num_slices) == (18, 45)
    np.testing.assert_array_equal(target.slices_first(), thin_phantom.slices_first()[:45])


def test_array_helpers_match_volume_degrade(thin_phantom: Volume) -> None:
    thin = thin_phantom.slices_first()
    for factor, profile in [(3, "gaussian"), (2.5, "box"), (4, "decimate")]:
        expected = degrade(thin_phantom, factor=factor, profile=profile).slices_first()
        np.testing.assert_allclose(degrade_slices(thin, factor, profile), expected, atol=1e-3)
    batch = torch.from_numpy(np.ascontiguousarray(thin[None, None, :, :8, :8])).requires_grad_(True)
    out = degrade_slices_torch(batch, 3, "gaussian", dim=2)
    np.testing.assert_allclose(out.detach().numpy()[0, 0], degrade_slices(thin[:, :8, :8], 3, "gaussian"), atol=1e-3)
    out.sum().backward()  # differentiable: each thin voxel gets the sum of its weights
    w = thick_weights(thin.shape[0], 3, "gaussian")
    np.testing.assert_allclose(batch.grad[0, 0, :, 0, 0].numpy(), w.sum(axis=0), atol=1e-5)


def test_apply_profile_on_non_contiguous_view() -> None:
    rng = np.random.default_rng(1)
    data = rng.normal(size=(7, 9, 20)).astype(np.float32)
    view = np.moveaxis(data, 2, 0)  # slices along the last numpy axis
    w = profile_matrix(np.arange(20.0), np.array([2.5, 7.5, 12.5]), 5.0, "box")
    expected = np.tensordot(w, view, axes=(1, 0))
    np.testing.assert_allclose(apply_profile(view, w, chunk_rows=2), expected, atol=1e-5)
    torch_out = apply_profile_torch(torch.from_numpy(data), w, dim=2)
    np.testing.assert_allclose(torch_out.numpy(), np.moveaxis(expected, 0, 2), atol=1e-5)


def test_random_degradation_samples_from_the_lists() -> None:
    rng = np.random.default_rng(0)
    draws = {random_degradation(rng, (2.0, 3.0), ("box", "gaussian")) for _ in range(50)}
    assert draws == {(2.0, "box"), (2.0, "gaussian"), (3.0, "box"), (3.0, "gaussian")}
    with pytest.raises(ThinsliceError):
        random_degradation(rng, (2.0,), ("sinc",))


def test_cli_degrade_writes_thick_volume_and_refuses_overwriting_input(thin_phantom, tmp_path, capsys) -> None:
    from thinslice.io import read_volume, write_volume

    src = tmp_path / "thin.nii.gz"
    write_volume(thin_phantom, src, dtype="float32")
    out = tmp_path / "thick.nii.gz"
    assert main(["degrade", str(src), str(out), "--factor", "4", "--profile", "box"]) == 0
    assert "12 slices" in capsys.readouterr().out
    thick = read_volume(out)
    expected = degrade(thin_phantom, factor=4, profile="box")
    assert thick.grid_differences(expected) == []
    np.testing.assert_allclose(thick.array, np.rint(expected.array), atol=1.0)
    assert thick.slice_thickness == pytest.approx(5.0)

    assert main(["degrade", str(src), str(src), "--thickness", "5"]) == 2
    assert "is the input" in capsys.readouterr().err
    assert main(["degrade", str(src), str(tmp_path / "x.nii.gz"), "--thickness", "0.5"]) == 2
    assert "thinner than the input" in capsys.readouterr().err


def test_overlap_with_half_a_slice_offset_stays_on_the_thin_lattice() -> None:
    """4 mm slices every 2 mm from 2 mm slices: the slabs start half a thin slice later, so that the upsampling grid
    lands on the thin slices and the case can be scored (it could not be before)."""
    from thinslice.data.phantom import make_chest_phantom
    from thinslice.degrade.pairs import simulate_pair
    from thinslice.evaluate.metrics import evaluate_volumes
    from thinslice.infer.upsample import upsample

    thin = make_chest_phantom(shape=(40, 32, 32), spacing=(4.0, 4.0, 2.0), seed=2)
    thick, truth = simulate_pair(thin, thickness=4.0, spacing=2.0, profile="gaussian")
    assert thick.slice_spacing == 2.0 and thick.slice_thickness == 4.0
    out = upsample(thick, 2.0, method="cubic-dc")
    assert out.grid_differences(truth) == []
    assert evaluate_volumes(out, truth)["psnr"] > evaluate_volumes(upsample(thick, 2.0, method="cubic"), truth)["psnr"]
