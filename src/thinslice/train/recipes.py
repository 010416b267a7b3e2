"""Training recipes as files: ``configs/recipes/<name>.toml``, one per shipped network, read and checked here.

A recipe is the whole chain that made one shipped weights file, written as data instead of prose: each stage names
its trainer (``train-planes``, ``train-baseline``, ``train``, or ``average`` for a weight average), its data (parts
of the shared CT volumes, named as in :mod:`thinslice.data.split`), its preset (a named preset plus changed
sections: the example mix lives in ``planes_data`` and ``degradation``), its step schedule, learning rate, batch and
the stage it starts from. A stage may start from a stage of another recipe (``"planes-x4:clinical_mix"``), so an
older network that a recipe builds on is an explicit earlier stage, never a file pulled out of version control.

Everything is checked when the file is read, with one-line errors: unknown keys, a reference to a stage that does
not exist, a cycle in the chain, a preset that does not exist or does not build, a malformed data part, training on
the benchmark's held-out slices. :mod:`thinslice.train.reproduce` runs the chain.

Format (every key but ``note``, ``card`` and ``description`` has an effect)::

    name = "planes-x4"                     # must equal the file name
    weights = "planes-x4.safetensors"      # the shipped file this recipe makes
    product = "soup"                       # the stage whose weights ship (default: the last one)
    dtype = "float32"                      # or "float16" (the shipped denoiser)

    [[stages]]
    name = "clinical_mix"
    trainer = "train-planes"
    init = "x4_2026_11_30"                 # or "RECIPE:STAGE"
    train = "train"                        # a set of the data split, or a list: ["ct02 lower 80", "ct04"]
    val = ["ct07 upper 100"]
    schedule = [{ steps = 40000, stop = 17000 }, { steps = 28000 }]   # or steps = N
    lr = 3e-4
    [stages.preset]
    base = "small"
    name = "clinical_mix"
    planes_data = { profile_mismatch = 0.3, intensity_jitter = 0.05 }
"""

from __future__ import annotations

import copy
import dataclasses
import json
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from thinslice.data import split
from thinslice.errors import ThinsliceError
from thinslice.presets import CONFIG_DIR, PRESET_NAMES, Preset, preset_from_dict

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

RECIPE_DIR = CONFIG_DIR / "recipes"
TRAINERS = ("train-planes", "train-baseline", "train", "average")
# The network kind each trainer makes (its weights file name is the kind's: planes.safetensors, ...).
KIND_OF = {"train-planes": "planes", "train-baseline": "baseline", "train": "denoiser"}
PRECISIONS = ("no", "fp16", "bf16")
DTYPES = ("float32", "float16")

TOP_KEYS = {"name", "description", "weights", "card", "product", "dtype", "stages"}
COMMON_KEYS = {"name", "note", "trainer"}
TRAIN_KEYS = COMMON_KEYS | {"train", "val", "preset", "steps", "schedule", "lr", "batch", "ema_decay", "val_every",
                            "precision", "seed", "init", "export"}
STAGE_KEYS = {
    "train-planes": TRAIN_KEYS | {"loss"},
    "train-baseline": TRAIN_KEYS,
    "train": TRAIN_KEYS | {"prior", "control", "prior_workers"},
    "average": COMMON_KEYS | {"inputs"},
}
PART = re.compile(r"^(?P<prefix>[A-Za-z0-9]+)(?:\s+(?P<side>lower|upper)\s+(?P<count>\d+))?$")


@dataclass(frozen=True)
class PartSpec:
    """One data part as a recipe names it: a whole volume, its first (``lower``) or last (``upper``) N slices."""

    prefix: str
    side: str | None = None
    count: int = 0

    @property
    def text(self) -> str:
        return self.prefix if self.side is None else f"{self.prefix} {self.side} {self.count}"

    def known_range(self) -> tuple[int, int | None] | None:
        """[start, stop) in slices where it does not depend on the volume's length (None for ``upper``)."""
        if self.side is None:
            return 0, None
        return (0, self.count) if self.side == "lower" else None

    def resolve(self, num_slices: int) -> split.Part:
        """The split's :class:`~thinslice.data.split.Part` of a volume of ``num_slices`` slices."""
        if self.count > num_slices:
            raise ThinsliceError(f"data part '{self.text}' needs {self.count} slices, the volume has {num_slices}")
        if self.side is None:
            return split.Part(self.prefix)
        if self.side == "lower":
            return split.Part(self.prefix, 0, self.count)
        return split.Part(self.prefix, num_slices - self.count)


@dataclass(frozen=True)
class Leg:
    """One leg of a stage's schedule: a cosine schedule of ``steps`` steps, run up to step ``stop``."""

    steps: int
    stop: int


@dataclass
class Stage:
    recipe: str
    name: str
    trainer: str
    settings: dict[str, Any]
    parts: dict[str, tuple[PartSpec, ...]] = field(default_factory=dict)  # "train" / "val" -> parts
    preset_data: dict[str, Any] | None = None  # the resolved preset (a dict preset_from_dict accepts)
    legs: tuple[Leg, ...] = ()
    refs: dict[str, str] = field(default_factory=dict)  # "init" / "prior" / "input0".. -> "STAGE" or "RECIPE:STAGE"
    averaged_kind: str | None = None  # an average's kind: that of its inputs (set by load_chain)

    @property
    def key(self) -> str:
        return f"{self.recipe}:{self.name}"

    @property
    def kind(self) -> str | None:
        """The network kind this stage writes."""
        return KIND_OF.get(self.trainer, self.averaged_kind)

    def ref_key(self, ref: str) -> str:
        """A reference of this stage as ``RECIPE:STAGE``."""
        return ref if ":" in ref else f"{self.recipe}:{ref}"


@dataclass
class Recipe:
    name: str
    path: Path
    weights: str
    product: str
    dtype: str
    description: str
    stages: dict[str, Stage]


def _fail(where: str, message: str) -> ThinsliceError:
    return ThinsliceError(f"recipe {where}: {message}")


def available() -> list[str]:
    """The recipe names shipped with the package."""
    return sorted(p.stem for p in RECIPE_DIR.glob("*.toml"))


def recipe_path(name_or_path: str | Path, near: Path | None = None) -> Path:
    """The file of a recipe given by name (looked up beside ``near`` first, then among the shipped ones) or path."""
    text = str(name_or_path)
    if text.endswith(".toml"):
        path = Path(text)
        if not path.is_file():
            raise ThinsliceError(f"no recipe file {path}: pass a recipe name ({', '.join(available())}) or a "
                                 ".toml file")
        return path
    for folder in ([near] if near else []) + [RECIPE_DIR]:
        if (folder / f"{text}.toml").is_file():
            return folder / f"{text}.toml"
    raise ThinsliceError(f"unknown recipe '{text}': use one of {', '.join(available())} or a path to a .toml file")


def read_recipe(name_or_path: str | Path, near: Path | None = None) -> Recipe:
    """One recipe file, parsed and checked on its own (references to other recipes are checked by
    :func:`load_chain`)."""
    path = recipe_path(name_or_path, near)
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise _fail(path.name, f"cannot be read: {str(exc).splitlines()[0]}") from exc
    return _recipe_from_dict(data, path)


def _recipe_from_dict(data: dict[str, Any], path: Path) -> Recipe:
    where = path.name
    _known(data, TOP_KEYS, where, "at the top level")
    for key in ("name", "weights", "stages"):
        if key not in data:
            raise _fail(where, f"missing '{key}'")
    name = _string(data, "name", where)
    if name != path.stem:
        raise _fail(where, f"name '{name}' differs from the file name: call the file {name}.toml")
    raw_stages = data["stages"]
    if not isinstance(raw_stages, list) or not raw_stages:
        raise _fail(where, "no stages: add at least one [[stages]] table")
    stages: dict[str, Stage] = {}
    for raw in raw_stages:
        stage = _stage(raw, name, where, path.parent)
        if stage.name in stages:
            raise _fail(where, f"two stages are named '{stage.name}'")
        stages[stage.name] = stage
    product = data.get("product", list(stages)[-1])
    if product not in stages:
        raise _fail(where, f"product '{product}' is no stage of {name} (stages: {', '.join(stages)})")
    dtype = data.get("dtype", "float32")
    if dtype not in DTYPES:
        raise _fail(where, f"dtype '{dtype}': use one of {', '.join(DTYPES)}")
    weights = _string(data, "weights", where)
    if not weights.endswith(".safetensors") or "/" in weights:
        raise _fail(where, f"weights '{weights}' must be a file name ending in .safetensors")
    recipe = Recipe(name, path, weights, product, dtype, str(data.get("description", "")), stages)
    for stage in stages.values():
        for role, ref in stage.refs.items():
            if ":" not in ref and ref not in stages:
                raise _fail(where, f"stage '{stage.name}' {_role(role)} '{ref}', which is no stage of {name} "
                                   f"(stages: {', '.join(stages)}; another recipe's stage is 'RECIPE:STAGE')")
    return recipe


def _role(role: str) -> str:
    return {"init": "starts from", "prior": "takes its prior from"}.get(role, "averages")


def _known(data: Any, keys: set[str], where: str, place: str) -> None:
    if not isinstance(data, dict):
        raise _fail(where, f"expected a table {place}")
    unknown = sorted(set(data) - keys)
    if unknown:
        raise _fail(where, f"unknown key '{unknown[0]}' {place} (known: {', '.join(sorted(keys))})")


def _string(data: dict[str, Any], key: str, where: str) -> str:
    value = data[key]
    if not isinstance(value, str) or not value:
        raise _fail(where, f"'{key}' must be a non-empty string")
    return value


def _stage(raw: Any, recipe: str, where: str, folder: Path) -> Stage:
    if not isinstance(raw, dict) or not isinstance(raw.get("name"), str):
        raise _fail(where, "every [[stages]] table needs a name")
    name = raw["name"]
    trainer = raw.get("trainer")
    if trainer not in TRAINERS:
        raise _fail(where, f"stage '{name}': trainer {trainer!r}: use one of {', '.join(TRAINERS)}")
    _known(raw, STAGE_KEYS[trainer], where, f"in stage '{name}' ({trainer})")
    place = f"{where}, stage '{name}'"
    stage = Stage(recipe, name, trainer, {k: v for k, v in raw.items() if k not in ("name", "trainer", "note")})
    if trainer == "average":
        inputs = raw.get("inputs")
        if not isinstance(inputs, list) or len(inputs) < 2 or not all(isinstance(i, str) for i in inputs):
            raise _fail(place, "'inputs' must list two or more stages to average")
        stage.refs = {f"input{i}": ref for i, ref in enumerate(inputs)}
        return stage
    if "train" not in raw:
        raise _fail(place, "missing 'train' (a set of the data split or a list of parts)")
    stage.parts = {role: _parts(raw[role], place, role) for role in ("train", "val") if role in raw}
    _check_not_held_out(stage.parts["train"], place)
    stage.preset_data = resolve_preset(raw.get("preset", {}), place, folder)
    stage.legs = _legs(raw, place)
    _check_values(stage, place)
    for role in ("init", "prior"):
        if role in raw:
            if not isinstance(raw[role], str) or not raw[role]:
                raise _fail(place, f"'{role}' must name a stage ('STAGE' or 'RECIPE:STAGE')")
            stage.refs[role] = raw[role]
    planes_prior = (stage.preset_data or {}).get("latent", {}).get("prior") == "planes"
    if trainer == "train" and "prior" not in raw and planes_prior:
        raise _fail(place, "a planes prior needs 'prior' (the stage whose planes network makes it)")
    return stage


def _parts(value: Any, place: str, role: str) -> tuple[PartSpec, ...]:
    """A set name of the data split, or a list of part names ("ct02", "ct02 lower 80", "ct07 upper 100")."""
    if isinstance(value, str):
        if value not in split.SETS:
            raise _fail(place, f"'{role}' = '{value}': use a set of the data split ({', '.join(split.SETS)}) or a "
                               "list of parts such as [\"ct02 lower 80\", \"ct04\"]")
        return tuple(_from_split(p) for p in split.parts(value))
    if not isinstance(value, list) or not value:
        raise _fail(place, f"'{role}' must be a set name or a non-empty list of parts")
    specs = []
    for text in value:
        match = PART.match(str(text).strip()) if isinstance(text, str) else None
        if match is None:
            raise _fail(place, f"data part {text!r}: write 'ct04', 'ct02 lower 80' or 'ct07 upper 100'")
        count = int(match["count"] or 0)
        if match["side"] and count < 1:
            raise _fail(place, f"data part {text!r}: the slice count must be at least 1")
        specs.append(PartSpec(match["prefix"], match["side"], count))
    return tuple(specs)


def _from_split(part: split.Part) -> PartSpec:
    if part.start == 0 and part.stop is None:
        return PartSpec(part.prefix)
    if part.start == 0 and part.stop is not None:
        return PartSpec(part.prefix, "lower", part.stop)
    return _FromSlice(part.prefix, "from", part.start)


@dataclass(frozen=True)
class _FromSlice(PartSpec):
    """A split part that starts at a slice and runs to the volume's end (the held-out parts)."""

    @property
    def text(self) -> str:
        return f"{self.prefix} from slice {self.count}"

    def known_range(self) -> tuple[int, int | None] | None:
        return self.count, None

    def resolve(self, num_slices: int) -> split.Part:
        if self.count >= num_slices:
            raise ThinsliceError(f"data part '{self.text}': the volume has only {num_slices} slices")
        return split.Part(self.prefix, self.count)


def overlaps_held_out(part: split.Part | tuple[str, int, int | None]) -> split.Part | None:
    """The held-out part of the data split that ``part`` (prefix, start, stop) shares slices with, if any."""
    prefix, start, stop = (part.prefix, part.start, part.stop) if isinstance(part, split.Part) else part
    for held in split.HELD_OUT:
        if held.prefix == prefix and (stop is None or stop > held.start) and (held.stop is None or held.stop > start):
            return held
    return None


def _check_not_held_out(parts: tuple[PartSpec, ...], place: str) -> None:
    for spec in parts:
        known = spec.known_range()
        held = overlaps_held_out((spec.prefix, *known)) if known else None
        if held is not None:
            raise _fail(place, f"data part '{spec.text}' overlaps the held-out {held.name} of the data split "
                               "(thinslice.data.split): no recipe trains on the benchmark's held-out slices")


def resolve_preset(value: Any, place: str, folder: Path) -> dict[str, Any]:
    """The stage's preset as a dict: the named base preset with the recipe's sections merged in, checked by
    building it (unknown sections and keys, bad values are refused here, not after hours of training)."""
    if not isinstance(value, dict):
        raise _fail(place, "'preset' must be a table (base = \"small\", then changed sections)")
    changes = dict(value)
    base = changes.pop("base", "small")
    name = changes.pop("name", None)
    data = base_preset_dict(base, place, folder)
    sections = [f.name for f in dataclasses.fields(Preset) if f.name != "name"]
    for section, settings in changes.items():
        if section not in sections:
            raise _fail(place, f"preset section '{section}' does not exist (sections: {', '.join(sections)})")
        if not isinstance(settings, dict):
            raise _fail(place, f"preset section '{section}' must be a table of settings")
        data[section] = {**data.get(section, {}), **copy.deepcopy(settings)}
    if name is not None:
        data["name"] = str(name)
    build_preset(data, place)
    return data


def base_preset_dict(base: Any, place: str, folder: Path) -> dict[str, Any]:
    """A named preset (tiny, small, paper) or a preset .json beside the recipe (or, from ``--preset``, one relative to
    the working folder), as a dict."""
    if not isinstance(base, str):
        raise _fail(place, "preset base must be a preset name")
    path = CONFIG_DIR / f"{base}.json" if base in PRESET_NAMES else folder / base
    if base not in PRESET_NAMES and not path.is_file():
        path = Path(base)  # a preset file given on the command line (--preset), relative to the working folder
    if base not in PRESET_NAMES and not (base.endswith(".json") and path.is_file()):
        raise _fail(place, f"unknown preset '{base}': use one of {', '.join(PRESET_NAMES)} or a preset .json "
                           "file beside the recipe")
    return json.loads(path.read_text(encoding="utf-8"))


def build_preset(data: dict[str, Any], place: str) -> Preset:
    try:
        return preset_from_dict(copy.deepcopy(data))
    except (ThinsliceError, ValueError, TypeError) as exc:
        raise _fail(place, f"preset does not build: {str(exc).splitlines()[0]}") from exc


def _legs(raw: dict[str, Any], place: str) -> tuple[Leg, ...]:
    """``steps = N`` (one cosine schedule of N steps) or ``schedule = [{steps, stop}, ...]``: legs run in turn,
    each resuming the one before with its own schedule length (how an interrupted run continued)."""
    if ("steps" in raw) == ("schedule" in raw):
        raise _fail(place, "give either 'steps' or 'schedule'")
    if "steps" in raw:
        return (Leg(_positive(raw["steps"], place, "steps"), _positive(raw["steps"], place, "steps")),)
    legs, before = [], 0
    if not isinstance(raw["schedule"], list) or not raw["schedule"]:
        raise _fail(place, "'schedule' must be a list of {steps, stop} tables")
    for leg in raw["schedule"]:
        _known(leg, {"steps", "stop"}, place, "in a schedule leg")
        steps = _positive(leg.get("steps"), place, "schedule steps")
        stop = _positive(leg.get("stop", steps), place, "schedule stop")
        if not before < stop <= steps:
            raise _fail(place, f"schedule leg stops at {stop}: each leg must stop after the one before and not "
                               "past its own steps")
        legs.append(Leg(steps, stop))
        before = stop
    return tuple(legs)


def _positive(value: Any, place: str, what: str) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise _fail(place, f"'{what}' must be a positive whole number, not {value!r}")
    return value


def _check_values(stage: Stage, place: str) -> None:
    s = stage.settings
    if s.get("precision", "no") not in PRECISIONS:
        raise _fail(place, f"precision '{s['precision']}': use one of {', '.join(PRECISIONS)}")
    if s.get("export", "final") not in ("final", "best"):
        raise _fail(place, "export must be 'final' or 'best'")
    if stage.legs[-1].stop < stage.legs[-1].steps and s.get("export", "final") != "best":
        raise _fail(place, "a schedule that stops before its end leaves no final weights: set export = \"best\"")
    for key in ("lr", "ema_decay"):
        if key in s and (not isinstance(s[key], (int, float)) or isinstance(s[key], bool) or s[key] < 0):
            raise _fail(place, f"'{key}' must be a non-negative number")
    for key in ("batch", "val_every", "prior_workers"):
        if key in s:
            _positive(s[key], place, key)
    if "seed" in s and (not isinstance(s["seed"], int) or s["seed"] < 0):
        raise _fail(place, "'seed' must be a non-negative whole number")
    if "loss" in s and s["loss"] not in ("l1", "mse"):
        raise _fail(place, "loss must be 'l1' or 'mse'")
    if "control" in s and not isinstance(s["control"], bool):
        raise _fail(place, "control must be true or false")


# ------------------------------------------------------------------------------------------------ the chain
def load_chain(name_or_path: str | Path) -> tuple[Recipe, list[Stage]]:
    """The recipe and every stage its product needs, in the order to run them (a stage after what it starts from),
    reading the other recipes it refers to; a missing recipe or stage and a cycle are refused in one line."""
    top = read_recipe(name_or_path)
    recipes = {top.name: top}
    order: list[Stage] = []
    done: set[str] = set()

    def visit(ref: str, trail: list[str]) -> Stage:
        stage = _lookup(ref, recipes, top.path.parent)
        if stage.key in trail:
            cycle = " -> ".join([*trail[trail.index(stage.key):], stage.key])
            raise _fail(top.path.name, f"the chain has a cycle: {cycle}")
        if stage.key not in done:
            targets = {role: visit(stage.ref_key(dep), [*trail, stage.key]) for role, dep in stage.refs.items()}
            if stage.trainer == "average":
                kinds = {t.kind for t in targets.values()}
                if len(kinds) != 1:
                    raise _fail(f"{stage.recipe}.toml", f"stage '{stage.name}' averages networks of different kinds")
                stage.averaged_kind = kinds.pop()
            for role, target in targets.items():
                _check_ref(stage, role, target)
            done.add(stage.key)
            order.append(stage)
        return stage

    visit(f"{top.name}:{top.product}", [])
    return top, order


def _lookup(ref: str, recipes: dict[str, Recipe], near: Path) -> Stage:
    recipe_name, _, stage_name = ref.partition(":")
    if recipe_name not in recipes:
        recipes[recipe_name] = read_recipe(recipe_name, near)
    recipe = recipes[recipe_name]
    if stage_name not in recipe.stages:
        raise _fail(recipe.path.name, f"no stage '{stage_name}' (stages: {', '.join(recipe.stages)}), "
                                      f"referred to as '{ref}'")
    return recipe.stages[stage_name]


def _check_ref(stage: Stage, role: str, target: Stage) -> None:
    """What a stage starts from or takes its prior from must be a network of the right kind."""
    wanted = "planes" if role == "prior" else (stage.kind if role == "init" else None)
    if wanted is not None and target.kind != wanted:
        raise _fail(f"{stage.recipe}.toml", f"stage '{stage.name}' {_role(role)} '{target.key}', which makes "
                                            f"{target.kind} weights, not {wanted}")


def load(name_or_path: str | Path) -> tuple[Recipe, list[Stage]]:
    """:func:`load_chain`, and the product's kind must fit the weights file name (planes-x4.safetensors holds
    planes weights): what :mod:`thinslice.train.reproduce` and the tests call."""
    recipe, order = load_chain(name_or_path)
    kind = recipe.stages[recipe.product].kind
    stem = recipe.weights.removesuffix(".safetensors")
    if kind is None or not (stem == kind or stem.startswith(kind + "-")):
        raise _fail(recipe.path.name, f"weights '{recipe.weights}' is not a {kind} file name ({kind}.safetensors "
                                      f"or {kind}-<variant>.safetensors)")
    return recipe, order
