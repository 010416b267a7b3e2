"""The method contract, held for every registered pipeline: what it declares (options, weights, profile use) is what it
does; ``applicable`` answers cheaply; a tiny run gives a volume on the thin grid with a report; and a method added
from outside the package (a plug-in module named by an entry point) registers with its module alone."""

from __future__ import annotations

import dataclasses
import importlib
import importlib.metadata
import sys

import numpy as np
import pytest
import torch

from thinslice.checkpoints.bundle import load_model, save_model
from thinslice.data.phantom import make_chest_phantom
from thinslice.degrade import degrade
from thinslice.degrade.grid import target_grid_volume
from thinslice.degrade.operators import thick_profile_operator
from thinslice.errors import ThinsliceError
from thinslice.infer import registry
from thinslice.infer.consistency import consistency_residual_hu
from thinslice.infer.pipeline import LearnedOptions, Pipeline, Result
from thinslice.infer.upsample import available_methods, get_method, register_pipeline, run_method
from thinslice.models import kinds
from thinslice.models.factory import build_model
from thinslice.models.kinds import NetworkKind, register_kind

SPACING = 1.25
METHODS = available_methods()


@pytest.fixture(scope="module")
def thick():
    """5 mm slices from a 1.25 mm phantom (x4, the clinical factor every shipped network serves)."""
    thin = make_chest_phantom(shape=(40, 48, 48), spacing=(4.5, 4.5, SPACING), seed=3)
    return degrade(thin, factor=4, profile="gaussian")


@pytest.mark.parametrize("name", METHODS)
def test_declared_options_are_what_the_method_accepts(name):
    entry = get_method(name)
    fields = [f.name for f in dataclasses.fields(entry.pipeline.Options)]
    assert entry.options[:len(fields)] == tuple(fields)
    assert ("profile" in entry.options) == entry.uses_profile == ("thickness" in entry.options)
    entry.pipeline.Options()  # every option has a default
    with pytest.raises(ThinsliceError, match="does not use option"):
        run_method(make_chest_phantom(shape=(8, 16, 16), spacing=(4.5, 4.5, 5.0)), SPACING, name, no_such_option=1)


@pytest.mark.parametrize("name", METHODS)
def test_applicable_answers_without_running(name, thick):
    entry = get_method(name)
    assert entry.refuses(thick, SPACING) is None  # every method serves x4
    too_fine = entry.refuses(thick, thick.slice_spacing / 64)
    assert too_fine is None or isinstance(too_fine, str) and too_fine


@pytest.mark.parametrize("name", METHODS)
def test_a_tiny_run_keeps_the_contract(name, thick):
    """The thin grid, finite values, a report copied into the metadata, and data consistency where declared."""
    entry = get_method(name)
    options = {"precision": "bf16"} if "precision" in entry.options else {}
    result = run_method(thick, SPACING, name, **options)
    assert isinstance(result, Result)
    grid = target_grid_volume(thick, SPACING)
    assert result.volume.array.shape == grid.array.shape
    assert np.allclose(result.volume.spacing, grid.spacing) and np.allclose(result.volume.origin, grid.origin)
    assert np.allclose(result.volume.direction, grid.direction)
    assert np.isfinite(result.volume.array).all()
    assert all(isinstance(v, str) and result.volume.metadata.get(k) == v for k, v in result.report.items())
    assert result.volume.metadata["upsample"].startswith(name)
    if entry.pipeline(entry.pipeline.Options()).consistent:  # the skeleton projects: it says so
        assert "consistency_hu" in result.report
    if "consistency_hu" in result.report:  # a method that says it projected did: A x = the thick slices
        operator = thick_profile_operator(thick, SPACING, "gaussian")
        residual = consistency_residual_hu(result.volume.slices_first(), thick.slices_first(), operator)
        assert residual["mean_abs"] < 0.05, residual


PLUGIN = '''
from thinslice.infer.pipeline import Pipeline, Result
from thinslice.infer.upsample import register_pipeline


@register_pipeline
class Doubled(Pipeline):
    """A toy method from outside the package: twice the cubic prior's deviation from -1000 HU, no projection."""

    name = "toy-doubled"
    uses_profile = False

    def refine(self, thick, prior, acquisition):
        return Result(prior.with_array(2 * (prior.array + 1000) - 1000), report={"toy": "doubled"})
'''


def _install_plugin(tmp_path, monkeypatch, module: str, source: str) -> None:
    """``module`` (with ``source``) on the path and named by a ``thinslice.methods`` entry point, the registry
    reset to load plug-ins again (both restored after the test)."""
    (tmp_path / f"{module}.py").write_text(source)
    monkeypatch.syspath_prepend(str(tmp_path))
    point = importlib.metadata.EntryPoint(module, module, registry.ENTRY_POINT_GROUP)
    real = importlib.metadata.entry_points
    monkeypatch.setattr(importlib.metadata, "entry_points",
                        lambda group=None: [point] if group == registry.ENTRY_POINT_GROUP else real(group=group))
    monkeypatch.setattr(registry, "_plugins_loaded", False)
    monkeypatch.setattr(registry, "UPSAMPLERS", dict(registry.UPSAMPLERS))


def test_a_plugin_method_registers_by_its_entry_point(tmp_path, monkeypatch, thick):
    _install_plugin(tmp_path, monkeypatch, "toy_thinslice_plugin", PLUGIN)
    try:
        assert "toy-doubled" in available_methods()
        cubic = run_method(thick, SPACING, "cubic").volume.array
        toy = run_method(thick, SPACING, "toy-doubled")
        assert np.allclose(toy.volume.array, 2 * (cubic + 1000) - 1000, atol=1e-3)
        assert toy.report == {"toy": "doubled"} and issubclass(get_method("toy-doubled").pipeline, Pipeline)
    finally:
        sys.modules.pop("toy_thinslice_plugin", None)


def test_a_broken_plugin_is_skipped_with_a_warning(tmp_path, monkeypatch, caplog):
    _install_plugin(tmp_path, monkeypatch, "broken_thinslice_plugin",
                    "raise ImportError('needs a package that is missing')\n")
    with caplog.at_level("WARNING", logger="thinslice"):
        assert {"planes", "cubic-dc"} <= set(available_methods())
    assert "broken_thinslice_plugin was not loaded" in caplog.text


# ------------------------------------------------------------------ a new network kind: table row, model, pipeline
@dataclasses.dataclass
class ShiftConfig:
    """The toy network's config (a plug-in's own, not a preset section)."""

    channels: int = 4


class ShiftNet(torch.nn.Module):
    """The model module of the toy kind: a residual 1x3x3 convolution of the thin-grid prior (HU / 1000)."""

    def __init__(self, config: ShiftConfig) -> None:
        super().__init__()
        self.config = config
        self.body = torch.nn.Sequential(torch.nn.Conv3d(1, config.channels, (1, 3, 3), padding=(0, 1, 1)),
                                        torch.nn.ReLU(), torch.nn.Conv3d(config.channels, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.body(x)


@dataclasses.dataclass(frozen=True)
class ShiftOptions(LearnedOptions):
    consistency: bool = True


class Shift(Pipeline):
    """The pipeline of the toy kind: loads its network through the one load function and runs it on the prior."""

    name = "toy-shift"
    Options = ShiftOptions
    weights = ("toy-shift",)

    def load(self) -> None:
        self.model = load_model("toy-shift", self.bundle())

    def refine(self, thick, prior, acquisition):
        with torch.no_grad():
            x = torch.from_numpy(prior.slices_first() / 1000.0).float()[None, None]
            out = self.model(x)[0, 0].numpy() * 1000.0
        return Result(prior.with_slices(out, prior.slice_spacing, 0.0, prior.slice_thickness), report={"toy": "shift"})


def test_a_new_network_kind_needs_its_row_its_model_and_its_pipeline(tmp_path, monkeypatch, thick):
    """Nothing else: the row gives the file name, the locator, the loader, the builder and the training hint."""
    monkeypatch.setattr(kinds, "_KINDS", dict(kinds._KINDS))
    monkeypatch.setattr(registry, "UPSAMPLERS", dict(registry.UPSAMPLERS))
    register_kind(NetworkKind("toy-shift", ("toy-shift",), ShiftNet, "train-toy-shift", config_type=ShiftConfig))
    register_pipeline(Shift)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ThinsliceError, match="thinslice train-toy-shift"):
        run_method(thick, SPACING, "toy-shift", checkpoint=str(tmp_path / "empty"))
    torch.manual_seed(0)
    net = build_model("toy-shift", ShiftConfig(channels=3))
    save_model(net, "toy-shift", "tiny", tmp_path / "run" / "final")
    result = run_method(thick, SPACING, "toy-shift", checkpoint=str(tmp_path / "run"))
    x = torch.from_numpy(run_method(thick, SPACING, "cubic").volume.slices_first() / 1000.0).float()[None, None]
    with torch.no_grad():
        expected = net(x)[0, 0].numpy() * 1000.0
    assert result.report["toy"] == "shift" and "consistency_hu" in result.report
    assert get_method("toy-shift").has_weights(str(tmp_path / "run"))
    # before the projection the output is the network's; the projection moves it only by the thick-slice residual
    raw = Shift.from_pretrained(tmp_path / "run", consistency=False)(thick, SPACING).volume.slices_first()
    assert np.allclose(raw, expected, atol=1e-2)
