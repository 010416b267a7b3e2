"""Run a recipe's whole chain (``thinslice reproduce NAME``): from the shared CT folder to the shipped weights file.

Why one ``reproduce`` command rather than a ``--recipe`` option on each trainer: a chain crosses trainers (the
denoiser's prior is a planes network, so its recipe runs ``train-planes`` before ``train``) and holds a stage that
no trainer runs (the weight average behind ``planes-x4``). One command that knows every stage kind runs any chain;
the trainers stay as they are and are called with the options their command lines would give them.

Layout under ``--out`` (default ``runs/reproduce``)::

    data/<part>.nii.gz              the data parts the stages read (thinslice.data.split names: ct02_lower80, ...)
    <recipe>/<stage>/               each stage's run folder (checkpoints, logs, final/ or best/), plus
    <recipe>/<stage>/reproduce.json the settings it runs with and whether it is done
    weights/<file>                  the product under its shipped name (planes-x4.safetensors, ...)

Running the same command again continues: a finished stage is reused (also by other recipes that start from it),
an unfinished one resumes from its last checkpoint (the trainers' exact resume). A stage folder made with other
settings (another ``--max-steps``, an edited recipe) is refused in one line instead of being silently reused.
``--time-limit`` bounds the whole invocation; ``--steps-scale`` and ``--max-steps`` shorten every schedule (and
the validation and stop steps with it) for a quick run.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from thinslice.data import split
from thinslice.errors import ThinsliceError
from thinslice.io.atomic import atomic_output, write_text_atomic
from thinslice.train import recipes
from thinslice.train.recipes import Leg, PartSpec, Recipe, Stage

log = logging.getLogger(__name__)

DEFAULT_OUT = Path("runs/reproduce")
DATA_ENV = "THINSLICE_CT_DATA"
# Where the project's commands expect the shared CT folder (docs/design/clinical.md: --data ../shared/data/ct).
DEFAULT_DATA = Path("../shared/data/ct")
RECORD = "reproduce.json"


@dataclass
class Overrides:
    """What the command line changes in every stage; the rest is the recipe's."""

    steps_scale: float = 1.0
    max_steps: int | None = None
    preset: str | None = None  # replaces every stage's base preset (the tests: tiny), keeping its changed sections
    device: str = "auto"
    time_limit_s: float | None = None


def default_data_dir() -> Path:
    """``$THINSLICE_CT_DATA``, else ``../shared/data/ct`` (the shared CT folder beside the checkout)."""
    return Path(os.environ.get(DATA_ENV) or DEFAULT_DATA)


# ---------------------------------------------------------------------------------------------- settings
def scaled(n: int, ov: Overrides) -> int:
    """A step count under ``--steps-scale`` and ``--max-steps`` (at least 1)."""
    value = max(1, round(n * ov.steps_scale))
    return min(value, ov.max_steps) if ov.max_steps else value


def stage_legs(stage: Stage, ov: Overrides) -> tuple[Leg, ...]:
    return tuple(Leg(scaled(leg.steps, ov), scaled(leg.stop, ov)) for leg in stage.legs)


def stage_preset(stage: Stage, ov: Overrides) -> dict[str, Any]:
    """The stage's preset as a dict; with ``--preset`` its base replaced, the recipe's changed sections kept."""
    assert stage.preset_data is not None
    if ov.preset is None:
        return stage.preset_data
    changes = dict(stage.settings.get("preset", {}))
    changes["base"] = ov.preset
    return recipes.resolve_preset(changes, f"{stage.key} with --preset {ov.preset}", recipes.RECIPE_DIR)


def settings_of(stage: Stage, ov: Overrides) -> dict[str, Any]:
    """What a stage runs with (recorded in its folder; a rerun with other settings is refused)."""
    s = {k: v for k, v in stage.settings.items() if k not in ("preset", "steps", "schedule", "note")}
    if stage.trainer == "average":
        return {"trainer": stage.trainer, "inputs": [stage.ref_key(r) for r in stage.settings["inputs"]]}
    s.update(trainer=stage.trainer, preset=stage_preset(stage, ov),
             schedule=[[leg.steps, leg.stop] for leg in stage_legs(stage, ov)])
    if "val_every" in s:
        s["val_every"] = scaled(int(s["val_every"]), ov)
    for role in ("init", "prior"):
        if role in s:
            s[role] = stage.ref_key(s[role])
    s["train"] = [p.text for p in stage.parts["train"]]
    s["val"] = [p.text for p in stage.parts.get("val", ())]
    return s


def plan(name: str, ov: Overrides | None = None, out: Path = DEFAULT_OUT) -> list[str]:
    """One line per stage of the chain, in the order they run (``thinslice reproduce NAME --plan``)."""
    ov = ov or Overrides()
    recipe, order = recipes.load(name)
    lines = [f"{stage.key}: {stage.trainer}, {_summary(stage, settings_of(stage, ov))} -> {run_dir(out, stage)}"
             for stage in order]
    lines.append(f"product: {recipe.product} as {out / 'weights' / recipe.weights} ({recipe.dtype})")
    return lines


def _summary(stage: Stage, s: dict[str, Any]) -> str:
    if stage.trainer == "average":
        return "average of " + ", ".join(s["inputs"])
    legs = ", ".join(f"{a}" if a == b else f"{a} (stop at {b})" for a, b in s["schedule"])
    items = [f"preset {s['preset']['name']}", f"steps {legs}"]
    items += [f"{key} {s[key]:g}" if key == "lr" else f"{key} {s[key]}" for key in ("lr", "batch") if key in s]
    items += [f"{role} {_describe(stage.parts[role])}" for role in ("train", "val") if role in stage.parts]
    items += [f"{word} {s[key]}" for key, word in (("init", "from"), ("prior", "prior")) if key in s]
    return ", ".join(items)


def _describe(parts: Iterable[PartSpec]) -> str:
    return " + ".join(p.text for p in parts)


def run_dir(out: Path, stage: Stage) -> Path:
    return Path(out) / stage.recipe / stage.name


def stage_output(out: Path, stage: Stage) -> Path:
    """The weights file a stage writes (in its final/ or, for ``export = "best"``, its best/ bundle)."""
    folder = "best" if stage.settings.get("export") == "best" else "final"
    return run_dir(out, stage) / folder / f"{stage.kind}.safetensors"


# ------------------------------------------------------------------------------------------------- data
class DataParts:
    """The data parts as files: whole volumes are read where they are, slice ranges written once under
    ``out/data`` (the split's names, so ``ct02 upper 61`` is ``ct02_from80.nii.gz``)."""

    def __init__(self, source: Path, out: Path) -> None:
        self.source, self.out = Path(source), Path(out) / "data"
        if not self.source.is_dir():
            raise ThinsliceError(f"no CT folder at {self.source}: pass --data DIR (the folder of the ct02_..ct11_ "
                                 f"volumes, see its MANIFEST.md) or set {DATA_ENV}")
        self._slices: dict[str, int] = {}

    def files(self, parts: Iterable[PartSpec], training: bool) -> list[Path]:
        return [self.file(p, training) for p in parts]

    def file(self, spec: PartSpec, training: bool) -> Path:
        source = split.source_file(self.source, spec.prefix)
        if spec.side is None:
            return source
        # a lower part is known without reading the volume (write_part checks its length when it writes it)
        part = spec.resolve(10**9) if spec.side == "lower" else spec.resolve(self._num_slices(spec.prefix, source))
        held = recipes.overlaps_held_out(part) if training else None
        if held is not None:
            raise ThinsliceError(f"data part '{spec.text}' ({part.name}) overlaps the held-out {held.name}: no "
                                 "recipe trains on the benchmark's held-out slices")
        self._check_source(part.name, source)
        return split.write_part(part, source, self.out)

    def _check_source(self, name: str, source: Path) -> None:
        """A part already written must have been cut from this very file (``data/sources.json``): another
        ``--data`` folder with the same ``--out`` is refused instead of training on the other folder's slices."""
        record = self.out / "sources.json"
        known = json.loads(record.read_text(encoding="utf-8")) if record.is_file() else {}
        this = f"{source.name} ({source.stat().st_size} bytes)"
        if name in known and known[name] != this and (self.out / f"{name}.nii.gz").exists():
            raise ThinsliceError(f"{self.out / name}.nii.gz was cut from {known[name]}, not {this}: choose another "
                                 "--out for this --data folder")
        if known.get(name) != this:
            write_text_atomic(record, json.dumps({**known, name: this}, indent=1))

    def _num_slices(self, prefix: str, source: Path) -> int:
        if prefix not in self._slices:
            from thinslice.io import read_volume

            self._slices[prefix] = read_volume(source).num_slices
        return self._slices[prefix]


# ------------------------------------------------------------------------------------------------- runs
@dataclass
class _Run:
    """One invocation: where it writes, its data, its overrides, when it must stop and the chain's stages."""

    out: Path
    parts: DataParts
    ov: Overrides
    deadline: float | None
    stages: dict[str, Stage]

    def time_left(self) -> float | None:
        return None if self.deadline is None else self.deadline - time.time()


def reproduce(name: str | Path, data: str | Path | None = None, out: str | Path = DEFAULT_OUT,
              ov: Overrides | None = None) -> Path | None:
    """Run the chain of recipe ``name``; returns the product's path, or None when ``--time-limit`` stopped it
    (run the same command again to continue)."""
    ov = ov or Overrides()
    recipe, order = recipes.load(name)
    out = Path(out)
    deadline = None if ov.time_limit_s is None else time.time() + ov.time_limit_s
    run = _Run(out, DataParts(Path(data) if data else default_data_dir(), out), ov, deadline,
               {s.key: s for s in order})
    for stage in order:
        if not run_stage(stage, run):
            log.info("time limit reached in stage %s; run the same command again to continue", stage.key)
            return None
    return ship(recipe, order, out)


def run_stage(stage: Stage, run: _Run) -> bool:
    """One stage, unless it is already done; False when the time limit stopped it."""
    folder, output = run_dir(run.out, stage), stage_output(run.out, stage)
    settings = settings_of(stage, run.ov)
    if stage.trainer != "average":
        settings["data"] = {role: [f.name for f in run.parts.files(stage.parts[role], role == "train")]
                            for role in stage.parts}
    if _check_record(folder, settings) and output.is_file():
        log.info("stage %s: done, reusing %s", stage.key, output)
        return True
    _write_record(folder, stage, settings, done=False)
    log.info("stage %s: %s -> %s", stage.key, stage.trainer, folder)
    if stage.trainer == "average":
        average_stage(stage, run)
    elif not train_stage(stage, settings, run):
        return False
    if not output.is_file():
        raise ThinsliceError(f"stage {stage.key} ended without its weights ({output}): give it a validation step "
                             "(val_every) at or before its stop")
    _write_record(folder, stage, settings, done=True)
    return True


def _write_record(folder: Path, stage: Stage, settings: dict[str, Any], done: bool) -> None:
    write_text_atomic(folder / RECORD, json.dumps({"stage": stage.key, "settings": settings, "done": done},
                                                  indent=1))


def _check_record(folder: Path, settings: dict[str, Any]) -> bool:
    """Whether the stage is done; refused in one line when its folder holds a run of other settings."""
    from thinslice.train.engine import list_checkpoints

    path = folder / RECORD
    if not path.is_file():
        if list_checkpoints(folder):
            raise ThinsliceError(f"{folder} holds a training run that thinslice reproduce did not start; choose "
                                 "another --out")
        return False
    old, new = json.loads(path.read_text(encoding="utf-8")), json.loads(json.dumps(settings))
    if old.get("settings") != new:
        was = old.get("settings", {})
        key = next((k for k in sorted(set(was) | set(new)) if was.get(k) != new.get(k)), "?")
        raise ThinsliceError(f"{folder} was made with other settings ({key}: {was.get(key)!r}, now "
                             f"{new.get(key)!r}); choose another --out or remove that folder")
    return bool(old.get("done"))


def _latest_step(folder: Path) -> int:
    from thinslice.train.engine import CHECKPOINT_PREFIX, list_checkpoints

    found = list_checkpoints(folder)
    return int(found[-1].name[len(CHECKPOINT_PREFIX):]) if found else 0


def train_stage(stage: Stage, settings: dict[str, Any], run: _Run) -> bool:
    """Each leg of the schedule in turn, resuming the one before; False when the time limit stopped a leg."""
    folder = run_dir(run.out, stage)
    train = run.parts.files(stage.parts["train"], training=True)
    val = run.parts.files(stage.parts["val"], training=False) if "val" in stage.parts else None
    legs = [Leg(a, b) for a, b in settings["schedule"]]
    for i, leg in enumerate(legs):
        step = _latest_step(folder)
        if i < len(legs) - 1 and step >= leg.stop:
            continue
        left = run.time_left()
        if left is not None and left <= 0:
            return False
        result = _run_trainer(stage, settings, run, (train, val), leg, resume=step > 0, time_limit_s=left)
        if result.step < leg.stop:
            return False
    return True


def _run_trainer(stage: Stage, s: dict[str, Any], run: _Run, data: tuple[list[Path], list[Path] | None], leg: Leg,
                 resume: bool, time_limit_s: float | None) -> Any:
    """The stage's trainer with the options its command line would give (``thinslice train-planes ...``)."""
    from thinslice.presets import preset_from_dict

    common: dict[str, Any] = dict(
        run_dir=run_dir(run.out, stage), preset=preset_from_dict(json.loads(json.dumps(s["preset"]))),
        max_steps=leg.steps, stop_at_step=leg.stop if leg.stop < leg.steps else None, device=run.ov.device,
        mixed_precision=s.get("precision", "no"), seed=s.get("seed"), resume=resume, batch_size=s.get("batch"),
        lr=s.get("lr"), ema_decay=s.get("ema_decay"), val_every=s.get("val_every"), time_limit_s=time_limit_s)
    init = str(stage_output(run.out, run.stages[s["init"]])) if "init" in s else None
    train, val = data
    if stage.trainer == "train-planes":
        from thinslice.train.planes import PlanesTrainOptions, train_planes

        return train_planes(train, val, PlanesTrainOptions(**common, loss=s.get("loss", "l1"), init=init))
    if stage.trainer == "train-baseline":
        from thinslice.train.baseline import BaselineTrainOptions, train_baseline

        return train_baseline(train, val, BaselineTrainOptions(**common, init=init))
    from thinslice.train.diffusion import DiffusionTrainOptions, train_diffusion

    prior = str(stage_output(run.out, run.stages[s["prior"]]).parent) if "prior" in s else None
    latent = s["preset"].get("latent", {})
    opts = DiffusionTrainOptions(**common, control=s.get("control", True), first_stage=latent.get("first_stage"),
                                 prior=latent.get("prior"), planes=prior, prior_workers=s.get("prior_workers", 1),
                                 init=str(Path(init).parent) if init else None)
    return train_diffusion(train, val, opts)


def average_weights(paths: list[Path], kind: str) -> torch.nn.Module:
    """The networks of ``paths`` (one kind, one architecture) with their floating-point weights averaged (a
    "model soup"), keeping the first network's record; refused in one line for different architectures."""
    from thinslice.checkpoints.bundle import load_model

    models = [load_model(kind, path) for path in paths]
    states = [m.state_dict() for m in models]
    first = states[0]
    if any(s.keys() != first.keys() or any(s[k].shape != first[k].shape for k in s) for s in states):
        raise ThinsliceError("the networks have different architectures: only one architecture can be averaged")
    models[0].load_state_dict({k: sum(s[k] for s in states) / len(states) if first[k].is_floating_point()
                               else first[k] for k in first})
    return models[0]


def average_stage(stage: Stage, run: _Run) -> None:
    """The average of the input stages' networks, saved as this stage's weights file."""
    from thinslice.checkpoints.bundle import save_model
    from thinslice.checkpoints.files import record_of

    inputs = [stage_output(run.out, run.stages[stage.ref_key(ref)]) for ref in stage.settings["inputs"]]
    assert stage.kind is not None
    model = average_weights(inputs, stage.kind)
    record = record_of(model)
    assert record is not None
    save_model(model, stage.kind, record.preset, stage_output(run.out, stage))


def ship(recipe: Recipe, order: list[Stage], out: Path) -> Path:
    """The product stage's weights under the shipped file name (fp16 where the shipped file is), checked by
    loading it with the package's loader."""
    from thinslice.checkpoints.bundle import load_model
    from thinslice.checkpoints.files import convert_weights, record_of

    product = next(s for s in order if s.key == f"{recipe.name}:{recipe.product}")
    source, target = stage_output(out, product), out / "weights" / recipe.weights
    target.parent.mkdir(parents=True, exist_ok=True)
    if recipe.dtype == "float16":
        convert_weights(source, target, torch.float16)
    else:
        with atomic_output(target) as tmp:
            shutil.copyfile(source, tmp)
    assert product.kind is not None
    record = record_of(load_model(product.kind, target))
    log.info("%s: %s (content hash %s)", recipe.name, target, record.content_hash if record else "?")
    return target
