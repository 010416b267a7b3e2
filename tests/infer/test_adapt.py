"""Self-supervised adaptation of the CNN baseline (SMORE): in-plane pairs, the model changes, its loss goes down."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from thinslice.data.phantom import make_chest_phantom
from thinslice.degrade.profiles import degrade
from thinslice.errors import ThinsliceError
from thinslice.examples.inplane import adaptation_factor, adaptation_sampler, inplane_views
from thinslice.infer.cnn_adapt import adapt_baseline, default_plan
from thinslice.models.factory import build_baseline
from thinslice.train.baseline import l1_loss


@pytest.fixture(scope="module")
def thick():
    """4 mm slices of a 1 mm thin phantom (in-plane 1 mm): the in-plane axes are 4x finer than the slices."""
    thin = make_chest_phantom(shape=(48, 56, 64), spacing=(1.0, 1.0, 1.0), seed=3)
    return degrade(thin, factor=4.0, profile="gaussian")


def test_views_and_factor(thick) -> None:
    assert thick.slice_spacing == pytest.approx(4.0) and adaptation_factor(thick, 1.0) == pytest.approx(4.0)
    n, a, b = thick.slices_first().shape
    views = inplane_views(thick, 1.0)
    assert [v.slices_first().shape for v in views] == [(a, n, b), (b, n, a)]
    np.testing.assert_array_equal(views[0].slices_first()[5], thick.slices_first()[:, 5, :])
    # Another output spacing resamples the borrowed in-plane axis to it (same physical length).
    assert inplane_views(thick, 0.5)[0].slices_first().shape[0] == 2 * a
    with pytest.raises(ThinsliceError, match="coarser than the output spacing"):
        adaptation_factor(thick, 5.0)


def test_adaptation_changes_the_model_and_lowers_its_loss(thick) -> None:
    torch.manual_seed(0)
    model = build_baseline("tiny")
    # A random last layer: an untrained network is exactly cubic, which a tiny CNN cannot beat in a test's steps.
    torch.nn.init.normal_(model.tail.weight, std=0.02)
    original = {k: v.clone() for k, v in model.state_dict().items()}
    probe = adaptation_sampler(thick, 1.0, patch_size=(8, 16, 32), batch_size=4, seed=77)
    batches = [probe.next_batch() for _ in range(3)]
    assert batches[0]["hr"].shape == (4, 1, 8, min(16, thick.num_slices), 32)
    assert set(batches[0]["factor"].tolist()) == {4.0}

    def loss() -> float:
        with torch.no_grad():
            return float(np.mean([float(l1_loss({"baseline": model}, b, 0)[0]) for b in batches]))

    before = loss()
    adapted = adapt_baseline(model, thick, 1.0, plan=default_plan(25, lr=1e-3), device="cpu", seed=0,
                             sampling=((8, 16, 32), 4))
    assert adapted is model and not adapted.training
    assert any(not torch.equal(original[k], v) for k, v in adapted.state_dict().items())
    after = loss()
    assert after < 0.85 * before, (before, after)
    with pytest.raises(ThinsliceError, match="adapt-steps"):
        adapt_baseline(model, thick, 1.0, plan=default_plan(0))
