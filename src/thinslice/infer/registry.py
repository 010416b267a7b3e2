"""The registry of upsampling methods: which exist, what each needs, and what ``--method auto`` chooses.

Every method is a :class:`~thinslice.infer.pipeline.Pipeline` class registered with :func:`register_pipeline`.
Interpolation ("linear", "cubic", "cubic-dc") is registered here; learned methods (planes, CNN baseline, latent
diffusion) in their own modules, listed in :data:`METHOD_MODULES` and imported on first use so that ``thinslice
--help`` does not import torch models up front. A plug-in package adds methods through the ``thinslice.methods``
entry-point group (each entry names a module that registers pipelines when imported, or ``module:attr`` with a
Pipeline class or a registering function); a plug-in that fails to load is skipped with a warning, and none may take
a name already taken. Every method returns a volume on :func:`thinslice.degrade.grid.thin_grid` of the input.
"""

from __future__ import annotations

import dataclasses
import importlib
import importlib.metadata
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from thinslice.errors import ThinsliceError
from thinslice.infer.interpolate import interpolate_volume
from thinslice.infer.pipeline import Acquisition, Pipeline, Result
from thinslice.io.volume import Volume

UpsampleFn = Callable[..., Volume]  # fn(thick: Volume, spacing_mm: float, **options) -> Volume

# The package's modules that register learned methods when imported: adding a method is its module plus one line here.
METHOD_MODULES: tuple[str, ...] = ("thinslice.infer.planes", "thinslice.infer.cnn", "thinslice.infer.ldm")
# Plug-in packages list their method modules under this entry-point group.
ENTRY_POINT_GROUP = "thinslice.methods"
# Methods that need no trained weights (registered below).
WEIGHTLESS_METHODS = ("linear", "cubic", "cubic-dc")


@dataclass(frozen=True)
class UpsampleMethod:
    """A registered method: its :class:`~thinslice.infer.pipeline.Pipeline` class and the facts derived from it
    (options, weights kinds, whether it models the slice profile, training command, rank for ``--method auto``).

    The CLI, ``bench`` and ``demo`` read these facts from here instead of keeping their own lists of methods.
    """

    pipeline: type[Pipeline]

    @property
    def name(self) -> str:
        return self.pipeline.name

    @property
    def description(self) -> str:
        return self.pipeline.description

    @property
    def options(self) -> tuple[str, ...]:
        return self.pipeline.option_names()

    @property
    def weights(self) -> tuple[str, ...]:
        return self.pipeline.weights

    @property
    def needs_weights(self) -> bool:
        return bool(self.pipeline.weights)

    @property
    def uses_profile(self) -> bool:
        """Whether the method models the input's slice profile (data consistency), so callers must pass it."""
        return self.pipeline.uses_profile

    @property
    def preference(self) -> int:
        return self.pipeline.preference

    def refuses(self, thick: Volume, spacing_mm: float, checkpoint: str | None = None) -> str | None:
        """Why this method cannot upsample ``thick`` to ``spacing_mm`` (None: it can)."""
        return too_few_slices(self, thick) or self.pipeline.applicable(thick, float(spacing_mm), checkpoint)

    def bundle(self, checkpoint: str | Path | None) -> Path:
        """The folder holding this method's weights (``checkpoint`` or the shipped one), or a one-line error."""
        return self.pipeline.locate_weights(checkpoint)

    def has_weights(self, checkpoint: str | Path | None = None) -> bool:
        from thinslice.checkpoints.bundle import has_weights

        return self.needs_weights and has_weights(self.weights, checkpoint)


# Data consistency compares the output with the thick slices whose profile lies on the output grid: the two end
# slices of a stack reach beyond it, so a stack needs a third one in between to be checked against at all.
MIN_CONSISTENCY_SLICES = 3


def too_few_slices(method: UpsampleMethod, thick: Volume) -> str | None:
    """Why ``method`` cannot serve a stack this short (None: it can)."""
    if method.uses_profile and thick.num_slices < MIN_CONSISTENCY_SLICES:
        return (f"{method.name} needs at least {MIN_CONSISTENCY_SLICES} slices for data consistency, the input has "
                f"{thick.num_slices}")
    return None


log = logging.getLogger(__name__)
UPSAMPLERS: dict[str, UpsampleMethod] = {}
_plugins_loaded = False


def register_pipeline(pipeline: type[Pipeline]) -> type[Pipeline]:
    """Make a pipeline class available as ``Upsampler(cls.name)`` and ``--method NAME`` (usable as a
    class decorator: the one registration line of a method)."""
    UPSAMPLERS[pipeline.name] = UpsampleMethod(pipeline)
    return pipeline


def register_method(name: str, fn: UpsampleFn, *, description: str = "", options: Sequence[str] = ()) -> None:
    """Register a plain function ``fn(thick, spacing_mm, **options)`` as a method without weights (quick
    experiments and tests); it receives ``profile``/``thickness`` when ``options`` lists ``profile``."""
    fields = [(o, Any, None) for o in options if o not in ("profile", "thickness")]
    function_options = dataclasses.make_dataclass(f"{name}_options", fields, frozen=True)

    class FunctionPipeline(Pipeline):
        Options = function_options
        uses_profile = "profile" in options
        steps = ("prior",)  # the function is the whole method

        def prior(self, thick: Volume, spacing_mm: float, acquisition: Acquisition) -> Volume:
            given = {k: v for k, v in dataclasses.asdict(self.options).items() if v is not None}
            if self.uses_profile:
                given.update(profile=acquisition.profile, thickness=acquisition.thickness_mm)
            return fn(thick, float(spacing_mm), **given)

    FunctionPipeline.name = name
    FunctionPipeline.description = description
    register_pipeline(FunctionPipeline)


# Samples an ldm run draws when asked for an uncertainty map without saying how many.
UNCERTAINTY_SAMPLES = 4


# What --method auto falls back to when the recommended method cannot serve an input.
FALLBACK_METHOD = "cubic-dc"


def default_method() -> str:
    """What ``--method auto`` means in this install.

    The shipped manifest's ``default_method`` (the method that scored best on the benchmark for its time, so shipped
    weights that do not beat cubic interpolation are available with ``--method`` but not used by default), else the
    learned method of highest ``preference`` with shipped weights, else ``cubic``.
    """
    from thinslice.checkpoints.bundle import read_manifest

    chosen = read_manifest().get("default_method")
    if chosen in WEIGHTLESS_METHODS or (chosen in learned_methods() and get_method(chosen).has_weights()):
        return str(chosen)
    ranked = sorted(learned_methods(), key=lambda name: -get_method(name).preference)
    return next((name for name in ranked if get_method(name).has_weights()), "cubic")


def choose_auto(thick: Volume, spacing_mm: float) -> tuple[str, str | None]:
    """``(method, note)`` for ``--method auto`` and an output spacing already snapped
    (:meth:`thinslice.infer.upsample.Upsampler.decide`): the install's recommended method (see
    :func:`default_method`), or cubic-dc with a note saying why when it cannot serve this input (e.g. a factor its
    weights were not trained for)."""
    name = default_method()
    reason = get_method(name).refuses(thick, spacing_mm)
    if reason is None:
        return name, None
    fallback = FALLBACK_METHOD if get_method(FALLBACK_METHOD).refuses(thick, spacing_mm) is None else "cubic"
    return fallback, f"auto: {name} cannot serve this input ({reason}); using {fallback}"


def plugin_entry_points() -> list[importlib.metadata.EntryPoint]:
    """The installed plug-ins: entry points of the ``thinslice.methods`` group."""
    return list(importlib.metadata.entry_points(group=ENTRY_POINT_GROUP))


def method_modules() -> list[str]:
    """The modules that register methods: the package's own (:data:`METHOD_MODULES`), then those of installed
    plug-ins (the module part of each entry point, ``module`` or ``module:attr``)."""
    return [*METHOD_MODULES, *(entry.module for entry in plugin_entry_points())]


def _load_plugins() -> None:
    global _plugins_loaded
    if _plugins_loaded:
        return
    _plugins_loaded = True
    for module in METHOD_MODULES:
        importlib.import_module(module)
    for entry in plugin_entry_points():
        _load_plugin(entry)


def _load_plugin(entry: importlib.metadata.EntryPoint) -> None:
    """Import one plug-in (``module``, or ``module:attr`` naming a Pipeline class to register or a function that
    registers); whatever goes wrong is one warning naming it and its methods stay unavailable, so that a broken or
    hostile plug-in cannot end every command (``sys.exit`` at import included) nor take a built-in method's name
    (outputs would say ``cubic-dc`` for another method's volume). Ctrl-C still stops the command."""
    before = dict(UPSAMPLERS)
    try:
        loaded = entry.load()
        if isinstance(loaded, type) and issubclass(loaded, Pipeline):
            register_pipeline(loaded)
        elif callable(loaded) and ":" in entry.value:
            loaded()
    except KeyboardInterrupt:
        raise
    except BaseException as exc:  # noqa: BLE001 - any failure of third-party code, SystemExit included
        UPSAMPLERS.clear()
        UPSAMPLERS.update(before)
        log.warning("method plug-in %s was not loaded (%s: %s); its methods are unavailable", entry.value,
                    type(exc).__name__, exc)
        return
    for name in [n for n in before if UPSAMPLERS.get(n) != before[n]]:
        UPSAMPLERS[name] = before[name]
        log.warning("method plug-in %s tried to replace the method '%s'; a plug-in cannot take a name that is "
                    "taken (built-in or an earlier plug-in's), so '%s' stays as it was", entry.value, name, name)


def available_methods() -> list[str]:
    _load_plugins()
    return sorted(UPSAMPLERS)


def learned_methods() -> list[str]:
    """Registered methods that run trained weights, in registration order."""
    _load_plugins()
    return [name for name, entry in UPSAMPLERS.items() if entry.needs_weights]


def get_method(name: str) -> UpsampleMethod:
    _load_plugins()
    if name not in UPSAMPLERS:
        raise ThinsliceError(f"unknown upsampling method '{name}': available methods are "
                             f"{', '.join(available_methods())}")
    return UPSAMPLERS[name]


class Linear(Pipeline):
    name = "linear"
    description = "linear interpolation between neighbouring slices (clamped at the ends)"
    uses_profile = False
    steps = ("prior",)

    def prior(self, thick: Volume, spacing_mm: float, acquisition: Acquisition) -> Volume:
        return interpolate_volume(thick, spacing_mm, "linear")


class Cubic(Pipeline):
    name = "cubic"
    description = "cubic B-spline interpolation through the slices (clamped at the ends)"
    uses_profile = False
    steps = ("prior",)


class CubicDC(Pipeline):
    """Cubic B-spline, then the data-consistency projection for the input's slice profile.

    Cubic interpolation treats thick slices as point samples; projecting it onto {x : A x = thick} (the profile's
    averaging operator A) restores what the slab averaging removed, as far as the thick slices determine it. It is
    the fair reference for the learned methods, which end with the same projection.
    """

    name = "cubic-dc"
    description = ("cubic B-spline, then data consistency with the thick slices (assumed slice profile: --profile "
                   "gaussian|box|decimate, default gaussian with FWHM = slice thickness)")
    steps = ("prior", "consistency")
    always_consistent = True


register_pipeline(Linear)
register_pipeline(Cubic)
register_pipeline(CubicDC)


def prior_estimate(kind: str, planes: Pipeline | None, thick: Volume, spacing_mm: float,
                   acquisition: Acquisition) -> Volume:
    """The estimate a denoiser refines (``latent.prior`` ``kind``): the planes output, cubic-dc where the planes
    network cannot serve the input, or cubic. Inference and the trainer's prior pairs both call this, so the model
    is trained on the prior it meets."""
    return prior_result(kind, planes, thick, spacing_mm, acquisition).volume


def prior_result(kind: str, planes: Pipeline | None, thick: Volume, spacing_mm: float,
                 acquisition: Acquisition) -> Result:
    """:func:`prior_estimate` with the planes run's extra maps (its passes' disagreement, ``extras["spread"]``,
    when the planes pipeline was built with ``uncertainty``)."""
    if kind == "planes" and planes is not None:
        reason = planes.applicable(thick, spacing_mm, getattr(planes.options, "checkpoint", None))
        if reason is None:
            return planes(thick, spacing_mm, acquisition)
        log.warning("ldm: the planes prior cannot serve this input (%s); starting from cubic-dc", reason)
    if kind in ("planes", "cubic-dc"):
        return Result(CubicDC()(thick, spacing_mm, acquisition).volume)
    return Result(interpolate_volume(thick, spacing_mm, "cubic"))


def find_method(name: str) -> UpsampleMethod:
    """:func:`get_method` without importing the learned methods for a name already registered: interpolation is
    registered when this module is imported, and a worker running cubic-dc need not pay for importing the
    networks (and torch)."""
    return UPSAMPLERS.get(name) or get_method(name)
