"""One entry point for every upsampler: ``upsample(thick, spacing_mm, method, **options)``.

Methods register themselves with :func:`register_method`. Interpolation ("linear", "cubic", "cubic-dc") is
registered here; learned methods (CNN baseline, latent diffusion) in their own modules, which are imported on first
use from :data:`PLUGIN_MODULES` so that ``thinslice upsample`` lists them without importing torch models up front.
Every method returns a volume on :func:`thinslice.degrade.grid.thin_grid` of the input.
"""

from __future__ import annotations

import importlib
import importlib.util
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from thinslice.degrade.grid import thin_grid, thin_positions
from thinslice.errors import ThinsliceError
from thinslice.infer.interpolate import interpolate_slices
from thinslice.io.volume import Volume

UpsampleFn = Callable[..., Volume]  # fn(thick: Volume, spacing_mm: float, **options) -> Volume
# applicable(thick, spacing_mm, checkpoint) -> None, or why the method cannot serve this input (e.g. its factor).
ApplicableFn = Callable[[Volume, float, "str | None"], "str | None"]

# Modules that register further methods when imported (missing ones are skipped).
PLUGIN_MODULES: tuple[str, ...] = ("thinslice.infer.cnn", "thinslice.infer.ldm", "thinslice.infer.planes")
# Methods that need no trained weights (registered below).
WEIGHTLESS_METHODS = ("linear", "cubic", "cubic-dc")


@dataclass(frozen=True)
class UpsampleMethod:
    """A registered upsampler: the keyword options it accepts (``None``: anything, passed through), the weights
    kinds it loads from a bundle (see :mod:`thinslice.checkpoints.bundle`), the command that trains them, and its
    rank among learned methods for ``--method auto`` when no manifest says which.

    The CLI, ``bench`` and ``demo`` read these facts from here instead of keeping their own lists of methods.
    """

    name: str
    fn: UpsampleFn
    description: str = ""
    options: tuple[str, ...] | None = ()
    weights: tuple[str, ...] = ()
    applicable: ApplicableFn | None = None
    train_hint: str = "thinslice train ..."
    preference: int = 0

    @property
    def needs_weights(self) -> bool:
        return bool(self.weights)

    def bundle(self, checkpoint: str | Path | None) -> Path:
        """The folder holding this method's weights (``checkpoint`` or the shipped one), or a one-line error."""
        from thinslice.checkpoints.bundle import resolve_bundle

        return resolve_bundle(checkpoint, self.weights, self.name, self.train_hint)

    def has_weights(self, checkpoint: str | Path | None = None) -> bool:
        from thinslice.checkpoints.bundle import has_weights

        return self.needs_weights and has_weights(self.weights, checkpoint)

    def refuses(self, thick: Volume, spacing_mm: float, checkpoint: str | None = None) -> str | None:
        """Why this method cannot upsample ``thick`` to ``spacing_mm`` (None: it can)."""
        return None if self.applicable is None else self.applicable(thick, float(spacing_mm), checkpoint)

    @property
    def uses_profile(self) -> bool:
        """Whether the method models the input's slice profile (data consistency), so callers must pass it."""
        return self.options is None or "profile" in self.options


log = logging.getLogger(__name__)
UPSAMPLERS: dict[str, UpsampleMethod] = {}
_plugins_loaded = False


def register_method(
    name: str, fn: UpsampleFn, *, description: str = "", options: Sequence[str] | None = (),
    weights: Sequence[str] = (), applicable: ApplicableFn | None = None, train_hint: str = "thinslice train ...",
    preference: int = 0,
) -> None:
    """Make ``fn`` available as ``upsample(..., method=name)`` and ``thinslice upsample --method name``."""
    UPSAMPLERS[name] = UpsampleMethod(name, fn, description, None if options is None else tuple(options),
                                      tuple(weights), applicable, train_hint, preference)


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
    """``(method, note)`` for ``--method auto``: the install's recommended method (see :func:`default_method`), or
    cubic-dc with a note saying why when it cannot serve this input (e.g. a factor its weights were not trained
    for)."""
    name = default_method()
    reason = get_method(name).refuses(thick, spacing_mm)
    if reason is None:
        return name, None
    return FALLBACK_METHOD, f"auto: {name} cannot serve this input ({reason}); using {FALLBACK_METHOD}"


def _load_plugins() -> None:
    global _plugins_loaded
    if _plugins_loaded:
        return
    _plugins_loaded = True
    for module in PLUGIN_MODULES:
        try:
            found = importlib.util.find_spec(module) is not None
        except ModuleNotFoundError:
            found = False
        if found:
            importlib.import_module(module)


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


def upsample(thick: Volume, spacing_mm: float, method: str = "cubic", **options: object) -> Volume:
    """``thick`` resampled along its slice axis to ``spacing_mm`` slices on the thin grid, by ``method``.

    Options whose value is ``None`` are dropped (not given); others must be ones the method accepts.
    """
    entry = get_method(method)
    given = {k: v for k, v in options.items() if v is not None}
    if entry.options is not None:
        unknown = sorted(set(given) - set(entry.options))
        if unknown:
            accepted = ", ".join(entry.options) or "none"
            raise ThinsliceError(f"method '{method}' does not use option(s) {', '.join(unknown)} "
                                 f"(it accepts: {accepted})")
    _report_thickness_contradiction(thick, given.get("thickness"))
    out = entry.fn(thick, float(spacing_mm), **given)
    out.metadata["upsample"] = f"{method} to {float(spacing_mm):.4g} mm"
    return out


def _report_thickness_contradiction(thick: Volume, given: object) -> None:
    """Say once (not at every data-consistency step) when a given slice thickness contradicts the file's own."""
    recorded = thick.slice_thickness
    try:
        value = float(given)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return  # absent, or not a number: the method's own option check reports it
    if recorded and abs(value - recorded) > 0.25 * recorded:
        log.warning("--thickness %.4g mm differs from the %.4g mm the file records; data consistency uses %.4g mm",
                    value, recorded, value)


def _interpolation(method: str) -> UpsampleFn:
    def run(thick: Volume, spacing_mm: float) -> Volume:
        _, first_offset = thin_grid(thick, spacing_mm)
        values = interpolate_slices(thick.slices_first(), thick.slice_positions_mm(),
                                    thin_positions(thick, spacing_mm), method=method)
        return thick.with_slices(values, spacing_mm, first_offset, slice_thickness=spacing_mm)

    return run


register_method("linear", _interpolation("linear"),
                description="linear interpolation between neighbouring slices (clamped at the ends)")
register_method("cubic", _interpolation("cubic"),
                description="cubic B-spline interpolation through the slices (clamped at the ends)")


def _cubic_consistent(thick: Volume, spacing_mm: float, profile: str = "gaussian",
                      thickness: float | str | None = None) -> Volume:
    """Cubic B-spline, then the data-consistency projection for the input's slice profile.

    Cubic interpolation treats thick slices as point samples; projecting it onto {x : A x = thick} (the profile's
    averaging operator A) restores what the slab averaging removed, as far as the thick slices determine it. It is
    the fair reference for the learned methods, which end with the same projection.
    """
    from thinslice.infer.consistency import make_consistent
    from thinslice.infer.options import option_float

    thick_mm = None if thickness is None else option_float("thickness", thickness, positive=True)
    cubic = _interpolation("cubic")(thick, spacing_mm)
    out, report = make_consistent(cubic, thick, str(profile), thick_mm)
    out.metadata["consistency_hu"] = (f"{profile} profile; |A x - thick| mean {report['before_mean_abs']:.3g} -> "
                                      f"{report['after_mean_abs']:.3g}")
    return out


register_method("cubic-dc", _cubic_consistent, options=("profile", "thickness"),
                description="cubic B-spline, then data consistency with the thick slices (assumed slice profile: "
                            "--profile gaussian|box|decimate, default gaussian with FWHM = slice thickness)")
