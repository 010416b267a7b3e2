"""Trust in what the program reads: a training run folder cannot run code on ``--resume`` (no pickle anywhere in
src/), weights files are checked against their content hash and their record against the kinds table's limits,
a NaN/inf result is never written, ``--checkpoint NAME`` means shipped weights, and plug-ins cannot end a command
or take a built-in method's name."""

from __future__ import annotations

import importlib
import importlib.metadata
import json
import pickle
import re
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from thinslice.checkpoints.bundle import DEFAULT_BUNDLE_DIR, load_model, locate_weights
from thinslice.data.phantom import make_chest_phantom
from thinslice.degrade import degrade
from thinslice.errors import ThinsliceError
from thinslice.examples.base import ExampleSampler
from thinslice.infer import registry
from thinslice.infer.upsample import available_methods, get_method, register_method, run_method
from thinslice.train.engine import EngineConfig, Trainer, list_checkpoints
from thinslice.train.run_state import read_state, write_state

SRC = Path(__file__).resolve().parents[1] / "src"

available_methods()  # the built-in methods registered before any test swaps the registry for a copy


# ------------------------------------------------------------------------------------------ resume: no pickle
class _Batches(ExampleSampler):
    def next_batch(self) -> torch.Tensor:
        return torch.from_numpy(self.rng.standard_normal((4, 3)).astype(np.float32))


def _loss(models, batch, step):
    return ((models["lin"](batch) - batch.sum(1, keepdim=True)) ** 2).mean(), {}


def _trainer(run_dir: Path) -> Trainer:
    torch.manual_seed(0)
    config = EngineConfig(run_dir=run_dir, max_steps=4, checkpoint_every=2, ema_decay=0.9, device="cpu",
                          progress=False, log_every=0)
    return Trainer({"lin": torch.nn.Linear(3, 1)}, _loss, _Batches(1), config)


class _Planted:
    """Unpickling this creates ``path`` (what a crafted checkpoint file would do, with a shell command)."""

    def __init__(self, path: Path) -> None:
        self.path = str(path)

    def __reduce__(self):
        return open, (self.path, "w")


@pytest.fixture(scope="module")
def saved_run(tmp_path_factory) -> Path:
    """A run stopped at step 2 (one checkpoint in the current format)."""
    run_dir = tmp_path_factory.mktemp("run")
    _trainer(run_dir).fit(stop_at_step=2)
    return run_dir


def _copy_run(saved: Path, tmp_path: Path) -> tuple[Path, Path]:
    import shutil

    run_dir = tmp_path / "run"
    shutil.copytree(saved, run_dir)
    return run_dir, list_checkpoints(run_dir)[-1]


def test_a_planted_pickle_is_refused_and_never_runs(saved_run, tmp_path) -> None:
    run_dir, checkpoint = _copy_run(saved_run, tmp_path)
    marker = tmp_path / "ran"
    (checkpoint / "custom_checkpoint_0.pkl").write_bytes(pickle.dumps(_Planted(marker)))
    with pytest.raises(ThinsliceError, match=r"refused .*custom_checkpoint_0\.pkl"):
        _trainer(run_dir).fit(resume=True)
    assert not marker.exists()


def test_a_checkpoint_of_the_older_format_is_refused_in_one_line(saved_run, tmp_path) -> None:
    run_dir, checkpoint = _copy_run(saved_run, tmp_path)
    info = json.loads((checkpoint / "trainer_state.json").read_text())
    del info["format"]  # what Accelerate's save_state checkpoints hold
    (checkpoint / "trainer_state.json").write_text(json.dumps(info))
    marker = tmp_path / "ran"
    (checkpoint / "random_states_0.pkl").write_bytes(pickle.dumps(_Planted(marker)))
    with pytest.raises(ThinsliceError, match="saved by an older thinslice .*random_states_0.pkl.*new run"):
        _trainer(run_dir).fit(resume=True)
    assert not marker.exists()


def test_an_intact_checkpoint_resumes(saved_run, tmp_path) -> None:
    run_dir, _ = _copy_run(saved_run, tmp_path)
    assert _trainer(run_dir).fit(resume=True).step == 4


def test_training_state_round_trips_without_pickle(tmp_path) -> None:
    state = {"step": 3, 7: {"exp_avg": torch.arange(6.0).reshape(2, 3)}, "groups": [{"lr": 1e-3, "name": "a"}],
             "numpy": ("MT19937", np.arange(5, dtype=np.uint32), 2, 0, 0.5), "big": 2**100, "none": None}
    write_state(tmp_path, "x", state)
    back = read_state(tmp_path, "x")
    assert back["step"] == 3 and back["big"] == 2**100 and back["none"] is None and back["groups"] == state["groups"]
    assert torch.equal(back[7]["exp_avg"], state[7]["exp_avg"])
    assert isinstance(back["numpy"], tuple) and back["numpy"][1].dtype == np.uint32
    assert np.array_equal(back["numpy"][1], state["numpy"][1])


UNPICKLING = [
    re.compile(r"^\s*(import|from)\s+(pickle|cPickle|_pickle|dill|joblib|cloudpickle)\b", re.M),
    re.compile(r"\bpickle\.(load|loads|Unpickler)\b"),
    re.compile(r"allow_pickle\s*=\s*True"),
    re.compile(r"\.load_state\("),  # Accelerate's load_state reads registered objects with weights_only=False
]


def test_nothing_in_src_unpickles() -> None:
    """No pickle import or use, and every ``torch.load(`` passes ``weights_only=True``."""
    offences = []
    for path in sorted(SRC.rglob("*.py")):
        text = path.read_text(encoding="utf-8")
        offences += [f"{path.name}: {m.group(0).strip()}" for rx in UNPICKLING for m in rx.finditer(text)]
        for m in re.finditer(r"torch\.load\(", text):
            call = text[m.start(): text.find(")", m.end()) + 1]
            if "weights_only=True" not in call:
                offences.append(f"{path.name}: {call}")
    assert not offences, offences


def test_the_grep_would_catch_a_pickle() -> None:
    assert any(rx.search("import pickle\n") for rx in UNPICKLING)
    assert any(rx.search("x = pickle.loads(b)") for rx in UNPICKLING)


# ------------------------------------------------------------------------------------------- weights files
def _copy_weights(tmp_path: Path, name: str = "planes-x4.safetensors", **changes: str) -> Path:
    """A copy of a shipped file; ``changes`` replace metadata entries (None-valued keys are dropped)."""
    src = DEFAULT_BUNDLE_DIR / name
    with safe_open(str(src), framework="pt") as f:
        meta = dict(f.metadata())
    meta.update(changes)
    meta = {k: v for k, v in meta.items() if v is not None}
    out = tmp_path / name
    save_file(load_file(str(src)), str(out), metadata=meta)
    return out


def _flip(path: Path, count: int, seed: int = 0) -> None:
    """Flip ``count`` bits in the tensor data (past the header) of ``path``."""
    data = bytearray(path.read_bytes())
    header = 8 + int.from_bytes(data[:8], "little")
    rng = np.random.default_rng(seed)
    for index in rng.choice(np.arange(header, len(data)), size=count, replace=False):
        data[index] ^= 1 << int(rng.integers(8))
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("bits", [1, 200])
def test_flipped_bits_in_weights_are_refused(tmp_path, bits) -> None:
    path = _copy_weights(tmp_path)
    assert load_model("planes", path) is not None  # the copy itself loads
    _flip(path, bits)
    with pytest.raises(ThinsliceError, match=r"planes-x4.safetensors is damaged \(content hash mismatch"):
        load_model("planes", path)


def test_weights_without_a_hash_load_with_a_debug_note(tmp_path, caplog) -> None:
    path = _copy_weights(tmp_path, content_hash=None)
    with caplog.at_level("DEBUG", logger="thinslice"):
        assert load_model("planes", path) is not None
    assert "records no content hash" in caplog.text


def _record_with(section_changes: dict) -> str:
    with safe_open(str(DEFAULT_BUNDLE_DIR / "planes-x4.safetensors"), framework="pt") as f:
        record = json.loads(f.metadata()["preset_config"])
    record["planes"].update(section_changes)
    return json.dumps(record)


@pytest.mark.parametrize("changes, expected", [
    ({"channels": 200_000}, r"planes.channels = 200000, outside 0..1024"),
    ({"channels": -4}, r"planes.channels = -4"),
    ({"channels": 1000, "num_blocks": 60}, r"network of [\d,]+ parameters, above the limit"),
    ({"channels": "many"}, r"does not describe a buildable .planes. network"),
])
def test_a_record_outside_the_kinds_limits_is_refused_before_building(tmp_path, changes, expected) -> None:
    path = _copy_weights(tmp_path, preset_config=_record_with(changes))
    with pytest.raises(ThinsliceError, match=expected):
        load_model("planes", path)


# --------------------------------------------------------------------------------------------- results
@pytest.fixture(scope="module")
def thick():
    thin = make_chest_phantom(shape=(24, 32, 32), spacing=(4.5, 4.5, 1.25), seed=3)
    return degrade(thin, factor=4, profile="gaussian")


def test_a_non_finite_result_is_refused_naming_the_method(monkeypatch, thick) -> None:
    monkeypatch.setattr(registry, "UPSAMPLERS", dict(registry.UPSAMPLERS))

    def poisoned(volume, spacing_mm):
        out = run_method(volume, spacing_mm, "cubic").volume
        array = out.array.copy()
        array.flat[5] = np.nan
        return out.with_array(array)

    register_method("toy-nan", poisoned)
    with pytest.raises(ThinsliceError, match=r"method 'toy-nan' produced 1 non-finite voxels"):
        run_method(thick, 1.25, "toy-nan")


# ---------------------------------------------------------------------------------------- --checkpoint NAME
def test_a_bare_name_means_shipped_weights_whatever_the_folder_holds(tmp_path, monkeypatch, caplog) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "small").mkdir()
    _copy_weights(tmp_path / "small", "planes.safetensors")
    with caplog.at_level("WARNING", logger="thinslice"):
        assert locate_weights("small", "planes") == DEFAULT_BUNDLE_DIR
    assert "--checkpoint ./small" in caplog.text
    assert locate_weights("./small", "planes") == Path("small")
    (tmp_path / "mine").mkdir()
    with pytest.raises(ThinsliceError, match=r"not a shipped name .*--checkpoint ./mine"):
        locate_weights("mine", "planes")
    with pytest.raises(ThinsliceError, match="neither a shipped name"):
        locate_weights("elsewhere", "planes")


# ------------------------------------------------------------------------------------------------ plug-ins
def _install(tmp_path: Path, monkeypatch, module: str, source: str, value: str | None = None) -> None:
    """``module`` on the path and named by a ``thinslice.methods`` entry point (``value``: e.g. module:attr)."""
    (tmp_path / f"{module}.py").write_text(source)
    monkeypatch.syspath_prepend(str(tmp_path))
    point = importlib.metadata.EntryPoint(module, value or module, registry.ENTRY_POINT_GROUP)
    real = importlib.metadata.entry_points
    monkeypatch.setattr(importlib.metadata, "entry_points",
                        lambda group=None: [point] if group == registry.ENTRY_POINT_GROUP else real(group=group))
    monkeypatch.setattr(registry, "_plugins_loaded", False)
    monkeypatch.setattr(registry, "UPSAMPLERS", dict(registry.UPSAMPLERS))
    monkeypatch.delitem(sys.modules, module, raising=False)


def test_a_plugin_calling_sys_exit_is_skipped_with_a_warning(tmp_path, monkeypatch, caplog) -> None:
    _install(tmp_path, monkeypatch, "exiting_plugin", "import sys\nsys.exit(3)\n")
    with caplog.at_level("WARNING", logger="thinslice"):
        assert {"planes", "cubic-dc"} <= set(available_methods())
    assert "exiting_plugin was not loaded (SystemExit: 3)" in caplog.text


def test_an_upsampler_of_a_built_in_method_still_loads_and_checks_the_plugins(tmp_path, monkeypatch, caplog) -> None:
    """Naming an interpolation method must not skip the plug-ins: a broken one is reported whatever the method."""
    from thinslice.infer.upsample import Upsampler

    _install(tmp_path, monkeypatch, "exiting_plugin", "import sys\nsys.exit(3)\n")
    with caplog.at_level("WARNING", logger="thinslice"):
        Upsampler("cubic")
    assert "exiting_plugin was not loaded (SystemExit: 3)" in caplog.text


def test_a_plugin_cannot_take_a_built_in_name(tmp_path, monkeypatch, caplog) -> None:
    builtin = registry.UPSAMPLERS["cubic-dc"].pipeline
    source = ("from thinslice.infer.upsample import Cubic, register_pipeline\n\n\n@register_pipeline\n"
              "class Fake(Cubic):\n    name = 'cubic-dc'\n\n\n@register_pipeline\nclass Other(Cubic):\n"
              "    name = 'toy-other'\n")
    _install(tmp_path, monkeypatch, "impostor_plugin", source)
    with caplog.at_level("WARNING", logger="thinslice"):
        assert get_method("cubic-dc").pipeline is builtin
    assert "toy-other" in available_methods()  # its other methods are kept
    assert "impostor_plugin tried to replace the method 'cubic-dc'" in caplog.text


def test_a_module_attr_entry_point_registers_its_pipeline(tmp_path, monkeypatch, thick) -> None:
    source = ("from thinslice.infer.upsample import Cubic\n\n\nclass Attr(Cubic):\n    name = 'toy-attr'\n")
    _install(tmp_path, monkeypatch, "attr_plugin", source, value="attr_plugin:Attr")
    assert "toy-attr" in available_methods()
    assert np.allclose(run_method(thick, 1.25, "toy-attr").volume.array, run_method(thick, 1.25, "cubic").volume.array)
