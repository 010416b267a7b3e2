"""Calibration of an uncertainty map: right on a synthetic posterior, wrong where it must be wrong."""

from __future__ import annotations

import numpy as np
import pytest

from thinslice.errors import ThinsliceError
from thinslice.evaluate.calibration import calibration


def _case(seed: int = 0):
    rng = np.random.default_rng(seed)
    truth = np.full((16, 64, 64), -1000.0, np.float32)
    truth[:, 8:56, 8:56] = 40.0  # a body
    std = np.exp(rng.normal(2.5, 0.8, truth.shape)).astype(np.float32)  # voxel-varying uncertainty
    mean = truth + rng.normal(0.0, 1.0, truth.shape).astype(np.float32) * std  # errors drawn from N(0, std^2)
    return mean, std, truth


def test_a_calibrated_map_covers_95_percent_and_ranks_the_errors() -> None:
    mean, std, truth = _case()
    c = calibration(mean, std, truth)
    assert c["coverage_2std"] == pytest.approx(0.954, abs=0.01)
    assert c["coverage_1std"] == pytest.approx(0.683, abs=0.01)
    assert c["spearman_voxel"] > 0.4 and c["spearman_block"] > 0.4


def test_an_overconfident_or_uninformative_map_is_caught() -> None:
    mean, std, truth = _case()
    assert calibration(mean, std / 4, truth)["coverage_2std"] < 0.5  # over-confident
    shuffled = np.random.default_rng(1).permutation(std.ravel()).reshape(std.shape)
    assert abs(calibration(mean, shuffled, truth)["spearman_voxel"]) < 0.05  # says nothing about where errors are
    with pytest.raises(ThinsliceError, match="differ in shape"):
        calibration(mean[:4], std, truth)
