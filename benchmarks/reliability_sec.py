"""Reliability cases on what the program trusts: a run folder cannot run code on ``--resume``, weights files are
checked (content hash, record limits), a NaN/inf result is never written, ``--checkpoint NAME`` means shipped
weights, and a plug-in can neither end a command nor take a built-in method's name."""

from __future__ import annotations

import json
import os
import pickle
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
from reliability_harness import THINSLICE, WORK, Case, Outcome, run

HERE = WORK / "sec"
SRC = Path(__file__).resolve().parents[1] / "src"
SHIPPED = SRC / "thinslice" / "weights"


class Planted:
    """Unpickling this runs a shell command that writes ``marker`` (what a crafted checkpoint file does)."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return os.system, (f"touch '{self.marker}'",)


def _inputs() -> dict[str, Path]:
    """A thin phantom (training data) and its 5 mm slices (x4 to 1.25 mm, the factor planes-x4 serves)."""
    paths = {"data": HERE / "data", "thick": HERE / "thick.nii.gz"}
    if paths["thick"].is_file():
        return paths
    from thinslice.data.phantom import make_chest_phantom
    from thinslice.degrade import degrade
    from thinslice.io import write_volume

    HERE.mkdir(parents=True, exist_ok=True)
    paths["data"].mkdir(exist_ok=True)
    thin = make_chest_phantom(shape=(48, 64, 64), spacing=(4.5, 4.5, 1.25), seed=5)
    write_volume(thin, paths["data"] / "ct.nii.gz")
    write_volume(degrade(thin, factor=4, profile="gaussian"), paths["thick"])
    return paths


# ------------------------------------------------------------------------------------------ resume: no pickle
def _trained(command: str, name: str) -> tuple[list[object], Path]:
    """A tiny run of ``command`` stopped after 2 steps: (its arguments without --max-steps, its newest checkpoint)."""
    run_dir = HERE / name
    shutil.rmtree(run_dir, ignore_errors=True)
    args = [command, "--data", _inputs()["data"], "--preset", "tiny", "--out", run_dir, "--device", "cpu"]
    first = run(*args, "--max-steps", "2")
    if first.rc != 0:
        raise RuntimeError(f"{command} did not train: {first.message}")
    return args, sorted((run_dir / "checkpoints").iterdir())[-1]


def planted_pickle_case(command: str, file_name: str = "custom_checkpoint_0.pkl", older: bool = False) -> Case:
    """A pickle whose loading runs a shell command, planted in the newest checkpoint of a tiny run; ``older``:
    the checkpoint is also made to look like one of the pickle-based format (no format mark)."""
    def check() -> tuple[bool, str]:
        args, checkpoint = _trained(command, f"run-{command}-{'old' if older else 'new'}")
        marker = HERE / f"ran-{command}-{older}"
        marker.unlink(missing_ok=True)
        (checkpoint / file_name).write_bytes(pickle.dumps(Planted(marker)))
        if older:
            info = json.loads((checkpoint / "trainer_state.json").read_text())
            info.pop("format", None)
            (checkpoint / "trainer_state.json").write_text(json.dumps(info))
        res = run(*args, "--max-steps", "4", "--resume")
        expect = "older thinslice" if older else "refused"
        ok = res.rc == 2 and res.clean and expect in res.message and file_name in res.message and not marker.exists()
        return ok, f"rc {res.rc}: {res.message[:150]}" + (" (THE PICKLE RAN)" if marker.exists() else "")

    what = "an older-format checkpoint with" if older else "a planted"
    return Case(f"--resume {command}: {what} {file_name} (runs a shell command when unpickled)",
                f"thinslice {command} ... --resume", "rc 2, one line naming the file; nothing ran", check)


def grep_case() -> Case:
    def check() -> tuple[bool, str]:
        patterns = [r"^\s*(import|from)\s+(pickle|cPickle|_pickle|dill|joblib|cloudpickle)\b",
                    r"\bpickle\.(load|loads|Unpickler)\b", r"allow_pickle\s*=\s*True", r"\.load_state\("]
        found = []
        for path in sorted(SRC.rglob("*.py")):
            text = path.read_text(encoding="utf-8")
            found += [f"{path.name}: {m.group(0).strip()}" for p in patterns for m in re.finditer(p, text, re.M)]
            for m in re.finditer(r"torch\.load\(", text):
                call = text[m.start(): text.find(")", m.end()) + 1]
                found += [] if "weights_only=True" in call else [f"{path.name}: {call}"]
        return not found, f"{len(found)} unpickling call(s)" + (f": {found[:3]}" if found else "")

    return Case("src/ never unpickles", "grep src/ for pickle and torch.load without weights_only=True",
                "nothing found", check)


# ------------------------------------------------------------------------------------------- weights files
def _bundle(name: str, edit=None) -> Path:
    """A copy of the shipped planes files in ``HERE/name``; ``edit(path)`` then changes planes-x4 there."""
    folder = HERE / name
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    for path in SHIPPED.glob("planes*.safetensors"):
        shutil.copy(path, folder / path.name)
    if edit is not None:
        edit(folder / "planes-x4.safetensors")
    return folder


def _flip(bits: int):
    def edit(path: Path) -> None:
        data = bytearray(path.read_bytes())
        header = 8 + int.from_bytes(data[:8], "little")
        rng = np.random.default_rng(bits)
        for index in rng.choice(np.arange(header, len(data)), size=bits, replace=False):
            data[index] ^= 1 << int(rng.integers(8))
        path.write_bytes(bytes(data))
    return edit


def _rewrite(tensors_fn=None, meta_fn=None):
    """An edit that saves the file again with changed tensors (hash recomputed: a valid file) or metadata."""
    def edit(path: Path) -> None:
        from safetensors import safe_open
        from safetensors.torch import load_file, save_file

        from thinslice.checkpoints.files import tensors_hash

        with safe_open(str(path), framework="pt") as f:
            meta = dict(f.metadata())
        tensors = load_file(str(path))
        if tensors_fn is not None:
            tensors_fn(tensors)
            meta["content_hash"] = tensors_hash(tensors)
        if meta_fn is not None:
            meta = meta_fn(meta)
        save_file(tensors, str(path), metadata=meta)
    return edit


def _nan_bias(tensors) -> None:
    for key in [k for k in tensors if k.endswith("bias")]:  # every head's (the file serves x4 and x5)
        tensors[key][...] = float("nan")


def _without_hash(meta: dict) -> dict:
    return {k: v for k, v in meta.items() if k != "content_hash"}


def _channels(count: int):
    def change(meta: dict) -> dict:
        record = json.loads(meta["preset_config"])
        record["planes"]["channels"] = count
        return {**meta, "preset_config": json.dumps(record)}
    return change


def planes_case(name: str, folder: str, edit, expect: str, ok: bool = False) -> Case:
    """``upsample --method planes`` (x4: planes-x4) with a bundle whose planes-x4 file is changed by ``edit``."""
    def check() -> tuple[bool, str]:
        bundle = _bundle(folder, edit)
        out = HERE / f"{folder}.nii.gz"
        out.unlink(missing_ok=True)
        res = run("upsample", _inputs()["thick"], out, "--spacing", "1.25", "--method", "planes",
                  "--checkpoint", bundle)
        if ok:
            passed = res.rc == 0 and res.clean and out.is_file()
        else:
            passed = res.rc == 2 and res.clean and expect in res.message and not out.exists()
        return passed, f"rc {res.rc}: {res.message[:150]}" + (" (OUTPUT WRITTEN)" if out.exists() and not ok else "")

    return Case(name, f"thinslice upsample thick.nii.gz out.nii.gz --method planes --checkpoint {folder}/",
                "rc 0" if ok else f"rc 2, one line: ...{expect}..., no output", check)


# ---------------------------------------------------------------------------------------- --checkpoint NAME
def _run_in(folder: Path, *args: object) -> Outcome:
    import time

    start = time.perf_counter()
    proc = subprocess.run([*THINSLICE, *map(str, args)], capture_output=True, text=True, timeout=300, cwd=folder)
    return Outcome(proc.returncode, proc.stderr, proc.stdout, time.perf_counter() - start)


def checkpoint_name_case() -> Case:
    """``--checkpoint small`` beside a folder ``./small`` holding damaged weights: the shipped ones are used."""
    def check() -> tuple[bool, str]:
        here = HERE / "cwd"
        here.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(here / "small", ignore_errors=True)
        shutil.copytree(_bundle("small-copy", _flip(1)), here / "small")
        res = _run_in(here, "upsample", _inputs()["thick"], "out.nii.gz", "--spacing", "1.25", "--method",
                      "planes", "--checkpoint", "small")
        passed = res.rc == 0 and res.clean and "--checkpoint ./small" in res.err
        return passed, f"rc {res.rc}: {res.message[:150]}"

    return Case("--checkpoint small with a folder ./small (damaged weights) here",
                "cd dir-with-small/ && thinslice upsample ... --method planes --checkpoint small",
                "rc 0 with the shipped weights, a note that ./small means the folder", check)


def checkpoint_folder_case() -> Case:
    def check() -> tuple[bool, str]:
        here = HERE / "cwd"
        shutil.rmtree(here / "mine", ignore_errors=True)
        shutil.copytree(_bundle("mine-copy"), here / "mine")
        res = _run_in(here, "upsample", _inputs()["thick"], "out2.nii.gz", "--spacing", "1.25", "--method",
                      "planes", "--checkpoint", "mine")
        passed = res.rc == 2 and res.clean and "--checkpoint ./mine" in res.message
        return passed, f"rc {res.rc}: {res.message[:150]}"

    return Case("--checkpoint mine (a folder here, not a shipped name)",
                "cd dir-with-mine/ && thinslice upsample ... --checkpoint mine",
                "rc 2, one line suggesting --checkpoint ./mine", check)


# ------------------------------------------------------------------------------------------------ plug-ins
def _plugin(name: str, module: str, source: str, value: str | None = None) -> Path:
    """A folder holding ``module`` and an installed distribution naming it in the ``thinslice.methods`` group."""
    folder = HERE / "plugins" / name
    shutil.rmtree(folder, ignore_errors=True)
    dist = folder / f"{name}-0.1.dist-info"
    dist.mkdir(parents=True)
    (folder / f"{module}.py").write_text(source)
    (dist / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text(f"[thinslice.methods]\n{module} = {value or module}\n")
    return folder


def _with_plugin(folder: Path, *args: object) -> Outcome:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(folder), os.environ.get("PYTHONPATH", "")])}
    import time

    start = time.perf_counter()
    proc = subprocess.run([*THINSLICE, *map(str, args)], capture_output=True, text=True, timeout=300, env=env)
    return Outcome(proc.returncode, proc.stderr, proc.stdout, time.perf_counter() - start)


def plugin_case(name: str, module: str, source: str, method: str, expect: str, value: str | None = None,
                same_as_builtin: bool = False) -> Case:
    def check() -> tuple[bool, str]:
        folder = _plugin(module.replace("_", "-"), module, source, value)
        out = HERE / f"plugin-{module}.nii.gz"
        res = _with_plugin(folder, "upsample", _inputs()["thick"], out, "--spacing", "1.25", "--method", method)
        passed = res.rc == 0 and res.clean and expect in res.err + res.out and out.is_file()
        if passed and same_as_builtin:
            from thinslice.io import read_volume

            plain = HERE / f"plugin-{module}-plain.nii.gz"
            run("upsample", _inputs()["thick"], plain, "--spacing", "1.25", "--method", method)
            passed = np.array_equal(read_volume(out).array, read_volume(plain).array)
        line = next((t for t in res.err.splitlines() if module in t), res.message)
        return passed, f"rc {res.rc}: {line[:150]}"

    return Case(name, f"thinslice upsample ... --method {method} (plug-in {module} installed)",
                f"rc 0, says ...{expect}...", check)


EXITING = "import sys\nsys.exit(3)\n"
IMPOSTOR = ("from thinslice.infer.pipeline import Result\nfrom thinslice.infer.upsample import Cubic, "
            "register_pipeline\n\n\n@register_pipeline\nclass Fake(Cubic):\n    name = 'cubic-dc'\n\n"
            "    def refine(self, thick, prior, acquisition):\n"
            "        return Result(prior.with_array(prior.array * 0))\n")
ATTR = "from thinslice.infer.upsample import Cubic\n\n\nclass Attr(Cubic):\n    name = 'toy-attr'\n"


def cases() -> list[Case]:
    return [
        planted_pickle_case("train-planes"),
        planted_pickle_case("train-baseline"),
        planted_pickle_case("train-vae", "random_states_0.pkl"),
        planted_pickle_case("train-planes", "custom_checkpoint_0.pkl", older=True),
        grep_case(),
        checkpoint_name_case(),
        checkpoint_folder_case(),
        planes_case("weights: 200 flipped bits in planes-x4", "flip200", _flip(200), "content hash mismatch"),
        planes_case("weights: one flipped bit in planes-x4", "flip1", _flip(1), "content hash mismatch"),
        planes_case("weights: a file saved without a content hash", "nohash", _rewrite(meta_fn=_without_hash), "",
                    ok=True),
        planes_case("weights: a valid file whose network gives NaN", "nan", _rewrite(tensors_fn=_nan_bias),
                    "method 'planes' produced"),
        planes_case("weights: a record asking for 200,000 channels", "wide", _rewrite(meta_fn=_channels(200_000)),
                    "planes.channels = 200000"),
        plugin_case("plug-in calling sys.exit(3) at import", "exiting_plugin", EXITING, "cubic",
                    "exiting_plugin was not loaded (SystemExit: 3)"),
        plugin_case("plug-in registering a method named cubic-dc", "impostor_plugin", IMPOSTOR, "cubic-dc",
                    "tried to replace the method 'cubic-dc'", same_as_builtin=True),
        plugin_case("plug-in named by a module:attr entry point", "attr_plugin", ATTR, "toy-attr", "",
                    value="attr_plugin:Attr"),
    ]

