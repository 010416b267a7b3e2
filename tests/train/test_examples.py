"""The training-example package: one sampler base, exact resume of every sampler, and the package's import rule."""

from __future__ import annotations

import ast
import dataclasses
import importlib
import inspect
import pickle
import pkgutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

import thinslice.examples
from thinslice.data.phantom import make_chest_phantom
from thinslice.degrade.pairs import simulate_pair
from thinslice.examples.base import ExampleSampler
from thinslice.examples.inplane import adaptation_sampler
from thinslice.examples.pairs import PairSampler
from thinslice.examples.patches import PatchSampler
from thinslice.examples.planes import PlaneSampler
from thinslice.examples.prior_pairs import LatentPair, PriorPairSampler
from thinslice.presets import load_preset

EXAMPLES_DIR = Path(thinslice.examples.__file__).parent
FORBIDDEN = ("thinslice.infer", "thinslice.train", "thinslice.cli", "thinslice.checkpoints", "thinslice.evaluate")


def _example_modules() -> list[str]:
    return [f"thinslice.examples.{m.name}" for m in pkgutil.iter_modules([str(EXAMPLES_DIR)])]


@pytest.fixture(scope="module")
def phantom():
    return make_chest_phantom(shape=(40, 48, 48), spacing=(4.5, 4.5, 1.25), seed=2)


def _latent_pairs() -> list[LatentPair]:
    rng = np.random.default_rng(0)

    def latent(shape: tuple[int, ...]) -> np.ndarray:
        return rng.normal(size=shape).astype(np.float16)

    return [LatentPair(latent((2, 6, 8, 8)), latent((2, 6, 8, 8)), 4.0, "a"),
            LatentPair(latent((2, 5, 9, 7)), latent((2, 5, 9, 7)), 3.0, "b")]


def _builders(volume) -> dict[str, Any]:
    """Every sampler the package makes, each built by a function of its seed (cheap, on a small phantom)."""
    preset = load_preset("tiny")
    blocks = dataclasses.replace(preset.planes, dims=3)
    varied = dataclasses.replace(preset.planes_data, profile_mismatch=0.5, intensity_jitter=0.1, noise_hu=20.0)
    thick, _ = simulate_pair(volume, factor=4, profile="gaussian")
    return {
        "patches": lambda seed: PatchSampler([volume], (8, 16, 16), 2, seed=seed),
        "pairs": lambda seed: PairSampler([volume], (8, 24, 24), 2, preset.degradation, seed=seed),
        "planes": lambda seed: PlaneSampler([volume], varied, preset.degradation, preset.planes, 3, seed),
        "blocks": lambda seed: PlaneSampler([volume], preset.planes_data, preset.degradation, blocks, 2, seed),
        "prior pairs": lambda seed: PriorPairSampler(_latent_pairs(), (4, 4, 4), 3, seed=seed),
        "in-plane pairs": lambda seed: adaptation_sampler(thick, 1.25, "gaussian", (8, 8, 16), 2, seed=seed),
    }


def _same(a: dict[str, Any], b: dict[str, Any]) -> bool:
    if a.keys() != b.keys():
        return False
    for key in a:
        x, y = a[key], b[key]
        if isinstance(x, torch.Tensor):
            if not torch.equal(x, y):
                return False
        elif key == "info":
            if [(i.volume_index, i.corner) for i in x] != [(i.volume_index, i.corner) for i in y]:
                return False
        elif x != y:
            return False
    return True


def test_every_sampler_class_in_the_package_subclasses_the_base() -> None:
    found = []
    for name in _example_modules():
        for _, cls in inspect.getmembers(importlib.import_module(name), inspect.isclass):
            draws = any(hasattr(cls, attr) for attr in ("next_batch", "__next__", "state_dict"))
            if cls.__module__ == name and cls is not ExampleSampler and (draws or cls.__name__.endswith("Sampler")):
                assert issubclass(cls, ExampleSampler), f"{name}.{cls.__name__} does not subclass ExampleSampler"
                found.append(cls.__name__)
    assert {"PatchSampler", "PairSampler", "PlaneSampler", "CropBatches", "PriorPairSampler"} <= set(found)


def test_only_the_base_makes_or_saves_a_generator() -> None:
    """One checkpointed generator per sampler: no sampler module seeds its own or writes its own state code."""
    for path in EXAMPLES_DIR.glob("*.py"):
        if path.name == "base.py":
            continue
        tree = ast.parse(path.read_text(encoding="utf-8"))
        calls = {n.func.attr for n in ast.walk(tree) if isinstance(n, ast.Call) and isinstance(n.func, ast.Attribute)}
        defs = {n.name for n in ast.walk(tree) if isinstance(n, ast.FunctionDef)}
        assert "default_rng" not in calls, path.name
        assert not defs & {"state_dict", "load_state_dict", "__iter__", "__next__"}, path.name


@pytest.mark.parametrize("name", ["patches", "pairs", "planes", "blocks", "prior pairs", "in-plane pairs"])
def test_a_loaded_state_continues_the_same_stream(phantom, name) -> None:
    build = _builders(phantom)[name]
    original = build(11)
    assert isinstance(original, ExampleSampler) and iter(original) is original
    for _ in range(2):
        next(original)
    state = pickle.loads(pickle.dumps(original.state_dict()))  # as a training checkpoint stores it
    expected = [next(original) for _ in range(2)]
    other_seed = build(12)
    assert not _same(next(build(12)), expected[0])  # so the comparison below can fail
    other_seed.load_state_dict(state)
    resumed = [next(other_seed) for _ in range(2)]
    assert all(_same(a, b) for a, b in zip(expected, resumed, strict=True))


def test_planes_checkpoints_from_before_the_base_still_resume(phantom) -> None:
    """Planes runs saved their generator under "rng"; those checkpoints resume on the same stream."""
    build = _builders(phantom)["planes"]
    original = build(3)
    next(original)
    legacy = {"rng": original.state_dict()["bit_generator"]}
    expected = next(original)
    resumed = build(4)
    resumed.load_state_dict(legacy)
    assert _same(next(resumed), expected)


def _imported_modules(path: Path) -> set[str]:
    """Every module a file imports, at module level or inside functions (absolute and relative imports)."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative to thinslice.examples
                parent = ".".join(["thinslice", "examples"][: 3 - node.level])
                base = f"{parent}.{base}" if base else parent
            names.add(base)
            names |= {f"{base}.{alias.name}" for alias in node.names}
    return names


def test_examples_import_no_pipeline_trainer_cli_or_checkpoints() -> None:
    files = sorted(EXAMPLES_DIR.glob("*.py"))
    assert len(files) >= 6
    for path in files:
        imported = _imported_modules(path)
        assert any(name.startswith("thinslice.") for name in imported) or path.name == "base.py", path.name
        bad = sorted(name for name in imported if name.startswith(FORBIDDEN))
        assert not bad, f"thinslice/examples/{path.name} imports {bad}"


def test_the_import_check_sees_function_level_imports(tmp_path) -> None:
    """The rule's parser is not blind: a late import of a pipeline inside a function is found."""
    probe = tmp_path / "probe.py"
    probe.write_text("def f():\n    from thinslice.infer.planes import Planes\n    return Planes\n", encoding="utf-8")
    assert any(name.startswith(FORBIDDEN) for name in _imported_modules(probe))
