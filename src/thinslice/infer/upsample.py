"""One run, one object: :class:`Upsampler`, which ``thinslice upsample``, ``thinslice batch`` (local and Ray workers),
``thinslice bench``, ``demo``, ``selfcheck`` and Python users all call.

An upsampler is built once from a method name and its options (typed values, or command-line text with
:meth:`Upsampler.from_args`), validates them there with the messages users see, loads each method's weights once
and keeps them, and then serves any number of volumes::

    from thinslice import Upsampler, read_volume
    up = Upsampler("planes", spacing=1.25, profile="gaussian")
    for path in paths:
        result = up(read_volume(path))  # .volume, .extras["std"], .report

For each input it first *decides* (:meth:`Upsampler.decide`: the output spacing as snapped to a divisor of the slice
spacing, the method ``auto`` picks, the options that method uses) and then *runs* (:meth:`Upsampler.run`: the
acquisition, the pipeline, the finiteness check). This is the only module that snaps a spacing or builds a
pipeline. ``upsample(thick, spacing, method, **options)`` is the one-call form.

The registry of methods lives in :mod:`thinslice.infer.registry`; its names are re-exported here, where plug-ins
have always imported them.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from dataclasses import dataclass

from thinslice.degrade.grid import snap_spacing, thin_grid
from thinslice.errors import ThinsliceError
from thinslice.infer.options import check_option_types, coerce_options, flag_values, option_types
from thinslice.infer.pipeline import Acquisition, Decision, Pipeline, Result, check_finite, make_options
from thinslice.infer.registry import (  # noqa: F401 - the registry's names, where plug-ins import them
    ENTRY_POINT_GROUP,
    FALLBACK_METHOD,
    METHOD_MODULES,
    MIN_CONSISTENCY_SLICES,
    UNCERTAINTY_SAMPLES,
    UPSAMPLERS,
    WEIGHTLESS_METHODS,
    Cubic,
    CubicDC,
    Linear,
    UpsampleMethod,
    available_methods,
    choose_auto,
    default_method,
    find_method,
    get_method,
    learned_methods,
    method_modules,
    plugin_entry_points,
    prior_estimate,
    register_method,
    register_pipeline,
    too_few_slices,
)
from thinslice.io.volume import Volume

log = logging.getLogger(__name__)

AUTO = "auto"
# Options every method may be given without a note: whether to draw progress bars is the caller's, not the user's.
QUIET_OPTIONS = frozenset({"progress"})


@dataclass(frozen=True)
class _MethodOptions:
    """The options one method takes, typed: its pipeline's options, the acquisition ones, and notes on the rest."""

    typed: tuple[tuple[str, object], ...]
    profile: object
    thickness: object
    notes: tuple[str, ...]


class Upsampler:
    """A run: one method (or ``auto``) with its options, built once and called for each volume.

    ``strict`` (the default for Python callers): an option the named method does not take is an error (``auto``
    ignores, with a note, the options of other methods that its choice does not take). Built from
    the command line (:meth:`from_args`, ``strict=False``), such options are ignored with a note, because one
    command line (``thinslice batch --method auto``) serves methods with different options. ``text``: the values are
    command-line text, turned into each method's declared types. ``progress`` is an option like the others (the
    methods that draw progress bars take it).
    """

    def __init__(self, method: str = AUTO, spacing: float | None = None, *, strict: bool = True, text: bool = False,
                 **options: object) -> None:
        self._setup(method, spacing, strict, text, options)

    @classmethod
    def of(cls, method: str, options: Mapping[str, object], *, spacing: float | None = None, strict: bool = True,
           text: bool = False) -> Upsampler:
        """:class:`Upsampler` with its options as a mapping (callers that hold them as one, e.g. a cohort's)."""
        up = cls.__new__(cls)
        up._setup(method, spacing, strict, text, options)
        return up

    def _setup(self, method: str, spacing: float | None, strict: bool, text: bool,
               options: Mapping[str, object]) -> None:
        self.method = method
        self.spacing = None if spacing is None else _positive_mm(spacing)
        self.strict, self.text = strict, text
        self.options = {k: v for k, v in options.items() if v is not None}
        self._by_method: dict[str, _MethodOptions] = {}
        self._pipelines: dict[tuple[str, str], Pipeline] = {}
        if method != AUTO:
            self._options_for(get_method(method))  # an unknown name or a bad option fails here, before any read

    @classmethod
    def from_args(cls, args: object, *, progress: bool | None = None) -> Upsampler:
        """The upsampler a parsed command line asks for (``--method``, ``--spacing``, the method flags of
        :data:`~thinslice.infer.options.METHOD_FLAGS` and ``--option KEY=VALUE``); progress bars unless ``-q``."""
        options = flag_values(args)
        if progress is None:
            progress = not getattr(args, "quiet", False)
        method = getattr(args, "method", AUTO) or AUTO
        if method != AUTO and options.get("uncertainty") and not _gives_a_map(get_method(method)):
            raise _no_map(method)  # asked of one named method, a missing map is an error, not a note
        options = {"progress": progress, **options}  # --option progress=... wins
        return cls.of(method, options, spacing=getattr(args, "spacing", None), strict=False, text=True)

    def decide(self, thick: Volume, spacing_mm: float | None = None) -> Decision:
        """The method, spacing and notes for ``thick`` (``spacing_mm``: this input's, else the upsampler's); an
        output grid that cannot fit in memory is refused here, before any method runs."""
        spacing = self.spacing if spacing_mm is None else _positive_mm(spacing_mm)
        if spacing is None:
            raise ThinsliceError("give the output slice spacing in mm (--spacing MM, or spacing= in Python)")
        snapped = snap_spacing(thick, spacing)  # 1.667 for 5 mm slices means 5/3
        notes = []
        if snapped != spacing:
            notes.append(f"--spacing {spacing:g} taken as {snapped:.6g} mm ({thick.slice_spacing:.4g} mm / "
                         f"{round(thick.slice_spacing / snapped)})")
        thin_grid(thick, snapped)
        method, fallback = self.method, None
        if method == AUTO:
            method, fallback = choose_auto(thick, snapped)
            notes += [fallback] if fallback else []
        notes += self._options_for(get_method(method)).notes
        return Decision(method, snapped, tuple(notes), fallback)

    def run(self, thick: Volume, decision: Decision, profile: object = None, thickness: object = None) -> Result:
        """Run the decided method on ``thick``; ``profile``/``thickness`` describe this input (else the
        upsampler's). The result's volume is checked finite and says in its metadata what made it."""
        entry = get_method(decision.method)
        if reason := too_few_slices(entry, thick):
            raise ThinsliceError(f"{reason}; use --method cubic or linear, or give a longer stack")
        chosen = self._options_for(entry)
        acquisition = None
        if entry.uses_profile:
            given = chosen.thickness if thickness is None else thickness
            acquisition = Acquisition.of(thick, chosen.profile if profile is None else profile, given)
            if given is not None:
                _report_thickness_contradiction(thick, acquisition.thickness_mm)
        pipeline = self.pipeline(decision.method)
        result = check_finite(pipeline(thick, decision.spacing_mm, acquisition), decision.method)
        result.volume.metadata["upsample"] = f"{decision.method} to {decision.spacing_mm:.4g} mm"
        result.acquisition, result.decision = acquisition, decision
        return result

    def __call__(self, thick: Volume, spacing_mm: float | None = None, *, profile: object = None,
                 thickness: object = None) -> Result:
        """:meth:`decide`, then :meth:`run`: the whole :class:`~thinslice.infer.pipeline.Result` for ``thick``."""
        return self.run(thick, self.decide(thick, spacing_mm), profile, thickness)

    def pipeline(self, method: str) -> Pipeline:
        """The loaded pipeline of ``method`` with this upsampler's options: built and loaded on first use, then
        kept, so that weights load once however many volumes follow."""
        entry = get_method(method)
        typed = self._options_for(entry).typed
        key = (method, repr(typed))
        if key not in self._pipelines:
            pipeline = entry.pipeline(make_options(entry.pipeline, dict(typed)))
            pipeline.load()
            self._pipelines[key] = pipeline
        return self._pipelines[key]

    def options_of(self, method: str) -> dict[str, object]:
        """The typed options that ``method``'s pipeline runs with (acquisition ones apart)."""
        return dict(self._options_for(get_method(method)).typed)

    def preload(self) -> None:
        """Load the weights now (the named method's, or what ``auto`` runs wherever it serves the input), so that
        the first volume's seconds are its own."""
        self.pipeline(default_method() if self.method == AUTO else self.method)

    def _options_for(self, entry: UpsampleMethod) -> _MethodOptions:
        """The options ``entry`` takes, typed and checked once per method; the others refused (strict) or noted."""
        if entry.name not in self._by_method:
            self._by_method[entry.name] = self._type_options(entry)
        return self._by_method[entry.name]

    def _type_options(self, entry: UpsampleMethod) -> _MethodOptions:
        given, notes = self._uncertainty(entry, dict(self.options))
        unused = sorted(set(given) - set(entry.options) - QUIET_OPTIONS)
        if unused and self.strict and self.method != AUTO:  # auto may pick a method that takes fewer options
            make_options(entry.pipeline, {k: given[k] for k in unused})  # its one-line error names them
        if unused:
            flags = ", ".join("--" + name.replace("_", "-") for name in unused)
            notes.append(f"method '{entry.name}' does not use {flags}; ignored")
        used = {k: v for k, v in given.items() if k in entry.options}
        types = option_types(entry.pipeline.Options)
        if self.text:
            used = coerce_options(used, types)
        check_option_types(used, types)
        profile, thickness = used.pop("profile", None), used.pop("thickness", None)
        return _MethodOptions(tuple(sorted(used.items())), profile, thickness, tuple(notes))

    def _uncertainty(self, entry: UpsampleMethod, given: dict[str, object]) -> tuple[dict[str, object], list[str]]:
        """``uncertainty``: planes computes its map itself, ldm from its samples (4 unless more are asked); a method
        that has none refuses it (strict) or goes without it, with a note (a cohort's methods differ)."""
        if not given.get("uncertainty") or "uncertainty" in entry.options:
            return given, []
        if "samples" in entry.options:  # ldm: the map comes from its samples
            given = {k: v for k, v in given.items() if k != "uncertainty"}
            if int(str(given.get("samples") or 1)) >= 2:
                return given, []
            given["samples"] = UNCERTAINTY_SAMPLES
            return given, [f"{entry.name} --uncertainty takes --samples {UNCERTAINTY_SAMPLES}"]
        if self.strict:
            raise _no_map(entry.name)
        given.pop("uncertainty")
        return given, [f"method '{entry.name}' gives no uncertainty map; none is written"]


def _gives_a_map(entry: UpsampleMethod) -> bool:
    return "uncertainty" in entry.options or "samples" in entry.options


def _no_map(method: str) -> ThinsliceError:
    return ThinsliceError(f"method '{method}' gives no uncertainty map: use --method planes --uncertainty (cheap) or "
                          "--method ldm --samples 4")


def upsample(thick: Volume, spacing_mm: float, method: str = "cubic", **options: object) -> Volume:
    """``thick`` resampled along its slice axis to ``spacing_mm`` slices on the thin grid, by ``method``: the
    one-call form of :class:`Upsampler` (build one to upsample several volumes with one weights load).

    Options whose value is ``None`` are dropped (not given); others must be ones the method accepts, with typed
    values. ``profile`` and ``thickness`` (mm) describe the input's slices for the methods that model them.
    :func:`run_method` also returns the method's extra outputs (e.g. the std map).
    """
    return run_method(thick, spacing_mm, method, **options).volume


def run_method(thick: Volume, spacing_mm: float, method: str = "cubic", **options: object) -> Result:
    """:func:`upsample`, returning the whole :class:`~thinslice.infer.pipeline.Result`."""
    return Upsampler.of(method, options)(thick, spacing_mm)


def _positive_mm(value: object) -> float:
    """A spacing in mm as a float, or a one-line error (text, zero, NaN)."""
    try:
        number = float(value)  # type: ignore[arg-type]  # anything float() takes; the rest is refused below
    except (TypeError, ValueError):
        number = math.nan
    if not (math.isfinite(number) and number > 0):
        raise ThinsliceError(f"the output slice spacing must be a positive number of mm, got {value!r}")
    return number


def _report_thickness_contradiction(thick: Volume, value: float) -> None:
    """Say once (not at every data-consistency step) when a given slice thickness contradicts the file's own."""
    recorded = thick.slice_thickness
    if recorded and abs(value - recorded) > 0.25 * recorded:
        log.warning("--thickness %.4g mm differs from the %.4g mm the file records; data consistency uses %.4g mm",
                    value, recorded, value)

