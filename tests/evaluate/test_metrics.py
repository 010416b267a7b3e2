"""Metrics (PSNR, separable 3D SSIM vs MONAI, HU-MAE, body mask), grid checks and the evaluate CLI."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from thinslice.cli.main import main
from thinslice.errors import ThinsliceError
from thinslice.evaluate import body_mask, evaluate_volumes, mae_hu, psnr, ssim3d
from thinslice.io.volume import Volume
from thinslice.models.intensity import HU_MIN, HU_RANGE


def test_separable_ssim_matches_monai() -> None:
    from monai.metrics import SSIMMetric

    rng = np.random.default_rng(0)
    ref = rng.uniform(-1100, 3200, size=(16, 20, 24)).astype(np.float32)
    ref = ref + np.linspace(-500, 500, 24, dtype=np.float32)  # some structure beyond noise
    pred = ref + rng.normal(0, 300, size=ref.shape).astype(np.float32)
    metric = SSIMMetric(spatial_dims=3, data_range=1.0, kernel_type="gaussian", win_size=11, kernel_sigma=1.5)

    def scaled(hu: np.ndarray) -> torch.Tensor:
        return torch.from_numpy((np.clip(hu, -1024, 3071) - HU_MIN) / HU_RANGE)[None, None]

    expected = float(metric(scaled(pred), scaled(ref)).mean())
    assert 0.1 < expected < 0.99
    assert ssim3d(pred, ref) == pytest.approx(expected, abs=1e-4)
    assert ssim3d(pred, ref, chunk_slices=2) == pytest.approx(expected, abs=1e-4)  # chunking changes nothing
    assert ssim3d(ref, ref) == pytest.approx(1.0, abs=1e-6)
    with pytest.raises(ThinsliceError, match="at least 11"):
        ssim3d(ref[:8], ref[:8])


def test_psnr_and_mae_on_known_errors() -> None:
    ref = np.full((4, 5, 6), 100.0, dtype=np.float32)
    assert psnr(ref + 40.95, ref) == pytest.approx(40.0, abs=1e-4)  # 20 log10(4095 / 40.95)
    assert psnr(ref, ref) == math.inf
    assert mae_hu(ref - 12.5, ref) == pytest.approx(12.5)
    # HU are clipped to [-1024, 3071] first: -3000 and -1024 are the same air.
    assert mae_hu(np.full_like(ref, -3000.0), np.full_like(ref, -1024.0)) == 0.0
    mask = np.zeros(ref.shape, bool)
    mask[0] = True
    pred = ref.copy()
    pred[0] += 10.0
    assert mae_hu(pred, ref, mask) == pytest.approx(10.0)


def test_body_mask_fills_lungs_and_drops_table(thin_phantom: Volume) -> None:
    hu = thin_phantom.slices_first().copy()
    hu[:, -3:, 10:50] = 200.0  # a "table" strip, not touching the body
    mask = body_mask(hu)
    centre = hu.shape[0] // 2
    assert not mask[:, -3:, 10:50].any()
    assert not mask[:, 0, 0].any()  # corner air
    lungs = (hu[centre] < -700) & mask[centre]
    assert (hu[centre] < -700).sum() > lungs.sum() > 50  # lungs inside the mask, outside air not
    assert mask[centre, 32, 32]


def _shifted(vol: Volume, start: int, stop: int) -> Volume:
    return vol.with_slices(vol.slices_first()[start:stop], vol.slice_spacing, start * vol.slice_spacing,
                           vol.slice_thickness)


def test_evaluate_volumes_scores_and_grid_errors(thin_phantom: Volume) -> None:
    ref = thin_phantom
    noisy = ref.with_array(ref.array + 20.0)
    scores = evaluate_volumes(noisy, ref)
    assert scores["psnr"] == pytest.approx(20 * math.log10(4095 / 20.0), abs=1e-3)
    assert scores["mae_hu"] == pytest.approx(20.0, abs=0.05) and scores["mae_hu_body"] == pytest.approx(20.0, abs=0.05)
    assert scores["n_slices"] == 48 and 0.2 < scores["body_fraction"] < 0.9
    assert evaluate_volumes(ref, ref, trim_slices=3)["n_slices"] == 42

    part = _shifted(ref, 5, 40)
    with pytest.raises(ThinsliceError, match=r"shape.*origin.*--overlap"):
        evaluate_volumes(part, ref)
    common = evaluate_volumes(part, ref, overlap=True, trim_slices=1)
    assert common["n_slices"] == 33 and common["psnr"] == math.inf and common["ssim"] == pytest.approx(1.0)
    assert common["slice_range_ref"] == [6, 39] and common["slice_range_pred"] == [1, 34]

    half_off = ref.with_slices(ref.slices_first(), ref.slice_spacing, 0.5 * ref.slice_spacing)
    with pytest.raises(ThinsliceError, match="origin") as err:
        evaluate_volumes(half_off, ref, overlap=True)
    assert "one lattice" in str(err.value)
    coarse = Volume(ref.array, spacing=(4.5, 4.5, 2.5), origin=ref.origin)
    with pytest.raises(ThinsliceError, match="spacing"):
        evaluate_volumes(coarse, ref)


def test_cli_chain_degrade_upsample_evaluate(thin_phantom: Volume, tmp_path, capsys) -> None:
    from thinslice.io import write_volume

    thin = tmp_path / "thin.nii.gz"
    write_volume(thin_phantom, thin)
    thick, up = tmp_path / "thick.nii.gz", tmp_path / "up.nii.gz"
    # 2.5 x 1.25 mm: 19 thick slices would cover 47.5 thin ones; degrade keeps 18 (45 thin ones, a whole number) so
    # that the upsampled grid, centred on the stack, has 45 of the 48 thin slices.
    assert main(["degrade", str(thin), str(thick), "--thickness", "3.125", "--profile", "gaussian"]) == 0
    assert main(["upsample", str(thick), str(up), "--spacing", "1.25", "--method", "linear"]) == 0
    capsys.readouterr()
    assert main(["evaluate", str(up), str(thin), "--json"]) == 2
    err = capsys.readouterr().err
    assert "different grids" in err and "pass --overlap" in err and "45 of them overlap" in err
    assert main(["evaluate", str(up), str(thin), "--json", "--overlap", "--trim", "2"]) == 0
    scores = json.loads(capsys.readouterr().out)
    assert scores["n_slices"] == 41 and 25 < scores["psnr"] < 60 and 0.5 < scores["ssim"] < 1.0
    assert main(["evaluate", str(up), str(up)]) == 0
    table = capsys.readouterr().out
    assert table.splitlines()[0].split() == ["PSNR", "(dB)", "inf"] and "HU-MAE body    0.00" in table


def test_through_plane_sharpness_is_one_for_the_truth_and_low_for_interpolation(thin_phantom: Volume) -> None:
    """Truth scores 1; cubic from 4x thicker slices has far less power above the thick Nyquist; adding the truth's
    own fine detail back restores it."""
    from thinslice.degrade.pairs import simulate_pair
    from thinslice.evaluate.metrics import through_plane_sharpness
    from thinslice.infer.upsample import upsample

    thick, truth = simulate_pair(thin_phantom, factor=4, profile="gaussian")
    ref = truth.slices_first()
    cubic = upsample(thick, truth.slice_spacing, "cubic").slices_first()
    assert through_plane_sharpness(ref, ref, 4) == pytest.approx(1.0)
    blurred = through_plane_sharpness(cubic, ref, 4)
    assert blurred < 0.5
    assert through_plane_sharpness(cubic + (ref - cubic), ref, 4) == pytest.approx(1.0, rel=1e-4)
    with pytest.raises(ThinsliceError, match="one shape"):
        through_plane_sharpness(cubic[:-1], ref, 4)
