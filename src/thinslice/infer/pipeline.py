"""The method contract: every upsampling method is a small :class:`Pipeline` class.

A pipeline declares what it needs as class attributes (its options dataclass, the weights kinds it loads, whether it
models the input's slice profile, the named steps it uses) and runs one shared skeleton of named steps::

    prior (an interpolation) -> refine (the method's own step) -> consistency (the projection) -> spread (std map)

Each step is a method of the class; ``steps`` says which the method uses (cubic-dc: prior and consistency; planes:
all four; ldm: prior, refine and spread, as it projects each sample inside refine). A call keeps nothing on the
instance: what one step hands to a later one travels in the :class:`Result` (``extras``), so one loaded pipeline
serves any number of volumes, one after another or from several threads.

``register_pipeline(cls)`` is the one registration line: the registry (:mod:`thinslice.infer.registry`) derives
"needs weights", "uses the profile", the accepted option names and the training hint from the class, so the CLI,
bench, demo and ``--method auto`` read one source. Option values are typed here; the CLI turns its strings into them
with :func:`thinslice.infer.options.coerce_options` (the only place that parses text).

The input's acquisition (slice profile and thickness) is resolved once, as an :class:`Acquisition`, and every method
receives the same one; extra outputs (the std map of ``ldm``) go back to the caller in ``Result.extras``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from thinslice.degrade.operators import plausible_thickness
from thinslice.degrade.profiles import check_profile
from thinslice.errors import ThinsliceError
from thinslice.infer.consistency import make_consistent
from thinslice.infer.options import ACQUISITION_TYPES, check_option_types, option_types
from thinslice.io.volume import Volume

DEFAULT_PROFILE = "gaussian"
AUTO_PROFILE = "auto"  # estimate the profile from the scan (--profile auto)


@dataclass(frozen=True)
class Acquisition:
    """How the thick input was acquired, as the inverse problem models it: the slice profile and the slice thickness
    in mm (the inverse-side twin of :class:`~thinslice.degrade.profiles.ThickSliceSpec`); ``estimated`` says how
    ``--profile auto`` found them (empty when they were given or read from the file)."""

    profile: str = DEFAULT_PROFILE
    thickness_mm: float = 0.0
    estimated: str = ""

    @classmethod
    def of(cls, thick: Volume, profile: object = None, thickness_mm: object = None) -> Acquisition:
        """Resolved once from the command line (``profile``, ``thickness_mm``) and the file: the thickness is the
        given one, else the file's, else the slice spacing; an implausible one is refused. ``profile`` "auto"
        estimates profile and thickness from the scan itself (:mod:`thinslice.degrade.estimate`). The one place the
        acquisition options' types are checked (a library caller may pass anything)."""
        check_option_types({"profile": profile, "thickness": thickness_mm}, ACQUISITION_TYPES)
        assert profile is None or isinstance(profile, str)
        assert thickness_mm is None or isinstance(thickness_mm, (int, float))
        if profile == AUTO_PROFILE:
            if thickness_mm is not None:
                raise ThinsliceError("--profile auto estimates the slice thickness too: drop --thickness, or name "
                                     "the profile (e.g. --profile gaussian --thickness 5)")
            from thinslice.degrade.estimate import estimate_profile

            found = estimate_profile(thick)
            return cls(found.profile, plausible_thickness(thick, found.fwhm_mm), found.describe())
        name = profile or DEFAULT_PROFILE
        check_profile(name)
        return cls(name, plausible_thickness(thick, thickness_mm))

    def ratio_to(self, slice_spacing_mm: float) -> float:
        """Thickness / slice spacing (1: contiguous slices, > 1: overlapping)."""
        return self.thickness_mm / float(slice_spacing_mm)


@dataclass(frozen=True)
class Decision:
    """What an :class:`Upsampler` decided for one input before running it: the method (``auto``'s choice), the
    output spacing as snapped, and notes for the user (a snapped spacing, a fallback, flags the method ignores)."""

    method: str
    spacing_mm: float
    notes: tuple[str, ...] = ()
    fallback: str | None = None  # why auto could not use its recommended method for this input (None: it could)


@dataclass
class Result:
    """What a pipeline returns: the thin volume, extra volumes for the caller to write (e.g. ``std``) and short
    report lines (also copied into the volume's metadata, which NRRD/MHA headers keep); the
    :class:`~thinslice.infer.upsample.Upsampler` adds the acquisition it assumed and what it decided."""

    volume: Volume
    extras: dict[str, Volume] = field(default_factory=dict)
    report: dict[str, str] = field(default_factory=dict)
    acquisition: Acquisition | None = None  # the profile and thickness the run assumed (None: not modelled)
    decision: Decision | None = None  # what the Upsampler decided: method (auto's choice), snapped spacing, notes


@dataclass(frozen=True)
class NoOptions:
    """Options of a method that takes none."""


@dataclass(frozen=True)
class LearnedOptions:
    """Options every learned method shares: where its weights are, where it runs, how fast."""

    checkpoint: str | None = None  # bundle folder (None: the shipped weights)
    device: str | None = None  # cpu, cuda, cuda:N, mps (None: CUDA when present, else CPU)
    preset: str | None = None  # only checks that the weights have this preset's architecture
    precision: str = "fp32"  # fp32, or bf16 autocast (about twice as fast on a CPU)
    progress: bool = False
    seed: int = 0


class Pipeline:
    """Base of every method. Subclasses set the class attributes and override :meth:`prior`, :meth:`refine` and,
    for learned methods, :meth:`load`; the skeleton in :meth:`__call__` is shared."""

    name: ClassVar[str]
    description: ClassVar[str] = ""
    Options: ClassVar[type] = NoOptions
    weights: ClassVar[tuple[str, ...]] = ()  # network kinds loaded from a bundle (rows of models.kinds)
    uses_profile: ClassVar[bool] = True  # models the input's slice profile (data consistency)
    preference: ClassVar[int] = 0  # rank among learned methods for --method auto without a manifest
    # The named steps of the skeleton this method uses (see the module docstring); "consistency" runs when the
    # method's ``consistency`` option is on, or always where ``always_consistent`` (cubic-dc: the projection is the
    # method); "spread" runs when refine left a raw spread map in ``extras``.
    steps: ClassVar[tuple[str, ...]] = ("prior", "refine", "consistency")
    always_consistent: ClassVar[bool] = False
    model: Any = None  # the network a learned method runs (set by load or from_model)

    def __init__(self, options: Any = None) -> None:
        self.options: Any = options if options is not None else self.Options()
        if not isinstance(self.options, self.Options):
            raise TypeError(f"{type(self).__name__} takes {self.Options.__name__}, not {type(options).__name__}")
        check_option_types(vars(self.options), option_types(self.Options))  # a frozen dataclass's fields

    @classmethod
    def from_pretrained(cls, checkpoint: str | Path | None = None, **options: Any) -> Pipeline:
        """The pipeline with its networks loaded from ``checkpoint`` (a bundle folder; None: the shipped one)."""
        if checkpoint is not None:
            options["checkpoint"] = str(checkpoint)
        pipeline = cls(cls.Options(**options))
        pipeline.load()
        return pipeline

    @classmethod
    def option_names(cls) -> tuple[str, ...]:
        """What ``upsample(..., **options)`` accepts: the options' fields, plus the acquisition when modelled."""
        names = tuple(f.name for f in dataclasses.fields(cls.Options))
        return (*names, "profile", "thickness") if cls.uses_profile else names

    @classmethod
    def applicable(cls, thick: Volume, spacing_mm: float, checkpoint: str | None = None) -> str | None:
        """Why this method cannot serve ``thick`` -> ``spacing_mm`` (None: it can); cheap, loads no network."""
        return None

    def load(self) -> None:
        """Load the networks (learned methods); called once by :meth:`from_pretrained`."""

    @classmethod
    def from_model(cls, model: Any, **options: Any) -> Pipeline:
        """The pipeline around a network in hand, kept as ``model`` (trainers validate through this, so they score
        what ships)."""
        pipeline = cls(cls.Options(**options))
        pipeline.model = model
        return pipeline

    @classmethod
    def locate_weights(cls, checkpoint: str | Path | None) -> Path:
        """The folder holding this method's weights (``checkpoint`` or the shipped one), or a one-line error that
        says how to train them (the kinds table's training command)."""
        from thinslice.checkpoints.bundle import locate_weights

        return locate_weights(checkpoint, cls.weights, cls.name)

    def bundle(self) -> Path:
        """:meth:`locate_weights` for the ``checkpoint`` option."""
        return self.locate_weights(getattr(self.options, "checkpoint", None))

    @property
    def consistent(self) -> bool:
        """Whether the skeleton runs its consistency step (the data-consistency projection)."""
        wanted = self.always_consistent or bool(getattr(self.options, "consistency", False))
        return "consistency" in self.steps and wanted

    def prior(self, thick: Volume, spacing_mm: float, acquisition: Acquisition) -> Volume | Result:
        """The estimate the method starts from (an interpolation on the thin grid); a :class:`Result` when it
        brings extra maps for the later steps (ldm's planes prior and its passes' disagreement)."""
        from thinslice.infer.interpolate import interpolate_volume

        return interpolate_volume(thick, spacing_mm, "cubic")

    def refine(self, thick: Volume, prior: Volume, acquisition: Acquisition) -> Result:
        """The method's own step (identity for interpolation)."""
        return Result(prior)

    def consistency(self, result: Result, thick: Volume, acquisition: Acquisition) -> Result:
        """Project the volume onto {x : A x = thick} for the input's slice profile, with its residual reported."""
        result.volume, res = make_consistent(result.volume, thick, acquisition.profile, acquisition.thickness_mm)
        result.report["consistency_hu"] = (f"{acquisition.profile} profile; |A x - thick| mean "
                                           f"{res['before_mean_abs']:.3g} -> {res['after_mean_abs']:.3g}")
        return result

    def spread(self, result: Result, thick: Volume, acquisition: Acquisition) -> Result:
        """Turn the raw spread map in ``extras`` into the calibrated ``extras["std"]`` (methods with a map)."""
        return result

    def __call__(self, thick: Volume, spacing_mm: float, acquisition: Acquisition | None = None) -> Result:
        """Run the skeleton's steps; ``acquisition`` defaults to the file's (Gaussian profile, its slice
        thickness)."""
        if acquisition is None:
            acquisition = Acquisition.of(thick) if self.uses_profile else Acquisition()
        begun = self.prior(thick, float(spacing_mm), acquisition)
        start, handed = (begun.volume, begun.extras) if isinstance(begun, Result) else (begun, {})
        result = self.refine(thick, start, acquisition) if "refine" in self.steps else Result(start)
        for name, volume in handed.items():  # the prior's maps, for the spread step
            result.extras.setdefault(f"prior_{name}", volume)
        if acquisition.estimated:
            result.report["profile"] = acquisition.estimated
        if self.consistent:
            result = self.consistency(result, thick, acquisition)
        if "spread" in self.steps and "spread" in result.extras:
            result = self.spread(result, thick, acquisition)
        result.volume.metadata.update(result.report)
        return result


def check_finite(result: Result, method: str) -> Result:
    """``result`` when every voxel of its volume and extras is finite, else one line naming ``method``: a NaN or
    inf (damaged weights, an overflow) must stop the command before anything is written, as no reader of the
    output would notice it. Called where results leave the registry (``run_method``, the batch worker), so
    every method, plug-ins included, is checked in one place."""
    for label, volume in {"volume": result.volume, **result.extras}.items():
        bad = int(np.count_nonzero(~np.isfinite(np.asarray(volume.array))))
        if bad:
            what = "" if label == "volume" else f" in its {label} map"
            raise ThinsliceError(f"method '{method}' produced {bad} non-finite voxels (NaN or inf){what}; nothing "
                                 "was written; its weights may be damaged: try another --method (e.g. cubic-dc)")
    return result


def make_options(cls: type[Pipeline], values: Mapping[str, Any]) -> Any:
    """``cls.Options`` from keyword values, refusing names it does not have with a one-line error."""
    known = {f.name for f in dataclasses.fields(cls.Options)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ThinsliceError(f"method '{cls.name}' does not use option(s) {', '.join(unknown)} "
                             f"(it accepts: {', '.join(cls.option_names()) or 'none'})")
    return cls.Options(**values)
