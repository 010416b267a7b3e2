"""Calibrated uncertainty maps: a raw spread (ldm sample std, planes' coronal/sagittal disagreement) -> a std in HU
such that ``mean +- 1.645 std`` holds the truth in 90% of body voxels.

Why a model and not the raw spread: the raw spread is far too small (ldm: 6 HU where the error is 33 HU) and noisy
voxel by voxel (4 samples give a std with 3 degrees of freedom). So the map is smoothed locally and combined with
the output's local contrast, ``log std = c0 + sum_i c_i log(1 + feature_i)``, the coefficients fitted by Gaussian
likelihood on held-out pairs, and then scaled by split conformal calibration (Vovk et al.; Angelopoulos & Bates
2021): on calibration voxels not used for the fit, the 90% quantile of ``|error| / std`` sets the scale, so the
90% interval covers 90% of body voxels of such data.

The fit ships beside the weights (``weights/calibration.json``), keyed by method, factor, (ldm) samples and the
content hashes of the networks; weights that changed since the fit are detected and their map reported as
uncalibrated. Refit: ``python -m thinslice.evaluate.fit_uncertainty`` (docs/design/uncertainty.md).
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from scipy import ndimage
from scipy.optimize import minimize
from scipy.stats import norm

from thinslice.errors import ThinsliceError
from thinslice.io.dicom_study import SOURCE_KEY
from thinslice.io.mask import body_mask

if TYPE_CHECKING:
    from thinslice.infer.pipeline import Result

CALIBRATION_FILE = "calibration.json"
LEVEL = 0.9
Z90 = float(norm.ppf(0.95))  # 1.645: the 90% interval is mean +- Z90 std
WIDE_HU = 50.0  # the summary counts body voxels whose 90% interval is wider than this
REFIT = "OMP_NUM_THREADS=1 python -m thinslice.evaluate.fit_uncertainty"
# Intensity classes as features: (low, high] HU of the output.
CLASS_THRESHOLDS_HU = {"lung": (-np.inf, -500.0), "bone": (300.0, np.inf)}
FROM_OUTPUT = ("contrast", "noise", *CLASS_THRESHOLDS_HU)  # features computed from the output alone
FIT_VOXELS = 400_000  # voxels drawn at random for the likelihood fit (keeps it to seconds)


@dataclass(frozen=True)
class Features:
    """Which per-voxel features the std is built from, and the local window (slices, rows, columns) they average.

    ``spread``: local RMS of the method's raw spread (ldm: the samples' std; planes: the passes' disagreement);
    ``planes_spread``: local RMS of the planes passes' disagreement (ldm starts from planes and can use it too);
    ``contrast``: local standard deviation of the output (edges are where through-plane guesses go wrong);
    ``noise``: local RMS of the output's in-plane high-pass (3x3), i.e. the image noise, which sets the floor of
    the error (tried, not in the shipped fits: docs/design/uncertainty.md);
    ``lung`` / ``bone``: local fraction of the output's voxels below -500 HU / above 300 HU (intensity classes: the
    errors of a head's brain and a chest's lungs are distributed differently at the same spread).
    """

    names: tuple[str, ...] = ("spread", "contrast")
    window: tuple[int, int, int] = (3, 7, 7)


def _local_rms(x: np.ndarray, window: tuple[int, int, int]) -> np.ndarray:
    # uniform_filter sums in running windows: rounding can leave tiny negatives where x is ~0, hence the clip.
    mean_sq = ndimage.uniform_filter(np.square(x, dtype=np.float32), window, mode="nearest")
    return np.sqrt(np.maximum(mean_sq, 0.0, out=mean_sq), out=mean_sq)


def _local_std(x: np.ndarray, window: tuple[int, int, int]) -> np.ndarray:
    x = np.asarray(x, np.float32)
    mean = ndimage.uniform_filter(x, window, mode="nearest")
    sq = ndimage.uniform_filter(np.square(x), window, mode="nearest")
    sq -= np.square(mean, out=mean)
    return np.sqrt(np.maximum(sq, 0.0, out=sq), out=sq)


def feature(name: str, maps: dict[str, np.ndarray], window: tuple[int, int, int]) -> np.ndarray:
    """One feature map (HU) from ``maps`` ("mean": the output, "spread", "planes_spread": raw maps, all slices
    first and of one shape)."""
    if name in ("spread", "planes_spread"):
        if name not in maps:
            raise ThinsliceError(f"this calibration needs the '{name}' map, which the run did not make; refit it with "
                                 f"`{REFIT}`")
        return _local_rms(maps[name], window)
    if name == "contrast":
        return _local_std(maps["mean"], window)
    if name == "noise":
        mean = np.asarray(maps["mean"], np.float32)
        return _local_rms(mean - ndimage.uniform_filter(mean, (1, 3, 3), mode="nearest"), window)
    if name in CLASS_THRESHOLDS_HU:
        low, high = CLASS_THRESHOLDS_HU[name]
        mean = np.asarray(maps["mean"])
        inside = ((mean > low) & (mean <= high)).astype(np.float32)
        return ndimage.uniform_filter(inside, window, mode="nearest")
    raise ThinsliceError(f"unknown uncertainty feature '{name}': use spread, planes_spread, contrast, noise, lung or "
                         "bone")


@dataclass(frozen=True)
class StdModel:
    """``std = scale * exp(coef[0] + sum_i coef[i+1] log(1 + feature_i))`` (HU)."""

    features: Features
    coef: tuple[float, ...]
    scale: float = 1.0

    def std(self, maps: dict[str, np.ndarray]) -> np.ndarray:
        """The calibrated std map (HU) from the output ("mean") and the raw maps (see :func:`feature`)."""
        out = np.full(maps["mean"].shape, self.coef[0] + math.log(self.scale), np.float32)
        for name, c in zip(self.features.names, self.coef[1:], strict=True):
            out += np.float32(c) * np.log1p(feature(name, maps, self.features.window))
        return np.exp(out, out=out)


def design(maps: dict[str, np.ndarray], features: Features, mask: np.ndarray) -> np.ndarray:
    """(voxels in ``mask``, 1 + features) matrix of ``[1, log(1 + feature_i)]``."""
    cols = [np.ones(int(mask.sum()), np.float64)]
    cols += [np.log1p(feature(n, maps, features.window)[mask]).astype(np.float64) for n in features.names]
    return np.stack(cols, axis=1)


def fit_log_linear(x: np.ndarray, error: np.ndarray) -> np.ndarray:
    """Coefficients w minimising the Gaussian negative log-likelihood of ``error`` with ``log std = x @ w``:
    sum(x w + e^2 exp(-2 x w) / 2), convex in w."""
    e2 = np.square(error.astype(np.float64)) + 1e-6

    def nll(w: np.ndarray) -> tuple[float, np.ndarray]:
        ls = x @ w
        r = e2 * np.exp(-2 * ls)
        return float(np.mean(ls + r / 2)), x.T @ (1 - r) / len(r)

    start = np.zeros(x.shape[1])
    start[0] = 0.5 * math.log(float(e2.mean()))
    return minimize(nll, start, jac=True, method="L-BFGS-B").x


def conformal_scale(error: np.ndarray, std: np.ndarray, level: float = LEVEL) -> float:
    """Split-conformal scale s such that ``|error| <= s * z(level) * std`` for a ``level`` fraction of (fresh,
    exchangeable) voxels: the ceil((n + 1) level)-th smallest score |error| / std, over the two-sided z."""
    scores = np.abs(error) / np.maximum(std, 1e-6)
    n = scores.size
    if n < 10:
        raise ThinsliceError("too few calibration voxels for a conformal scale (need at least 10 body voxels)")
    rank = min(n, math.ceil((n + 1) * level))
    q = float(np.partition(scores, rank - 1)[rank - 1])
    return q / float(norm.ppf(0.5 + level / 2))


LEVELS = (0.5, 0.8, 0.9, 0.95)


def gaussian_multipliers(levels: tuple[float, ...] = LEVELS) -> dict[str, float]:
    """z(level): the half-widths in std of a Gaussian's central intervals."""
    return {f"{lv:g}": float(norm.ppf(0.5 + lv / 2)) for lv in levels}


def coverage(error: np.ndarray, std: np.ndarray, multipliers: dict[str, float] | None = None) -> dict[str, float]:
    """Observed fraction of ``|error| <= m(level) std`` at each nominal level (a reliability diagram's points);
    ``multipliers`` default to the Gaussian z."""
    e = np.abs(error)
    return {lv: float(np.mean(e <= m * std)) for lv, m in (multipliers or gaussian_multipliers()).items()}


def conformal_multipliers(error: np.ndarray, std: np.ndarray, levels: tuple[float, ...] = LEVELS) -> dict[str, float]:
    """Half-widths in units of (calibrated) std that cover each level on calibration voxels."""
    return {f"{lv:g}": conformal_scale(error, std, lv) * float(norm.ppf(0.5 + lv / 2)) for lv in levels}


def fit_model(cases: list[tuple[dict[str, np.ndarray], np.ndarray]], features: Features, k: int,
              seed: int = 0) -> tuple[StdModel, dict[str, float], dict[str, float]]:
    """Split-conformal fit on ``cases`` (raw maps with "mean", and the truth): coefficients by likelihood on the
    thin slices of even thick cells, the scale and the per-level multipliers on those of odd cells (a split by
    slabs, so the two halves share no voxel). Returns the model, the multipliers and the Gaussian coverage on the
    second half."""
    halves: list[tuple[list, list]] = [([], []), ([], [])]
    for maps, truth in cases:
        body, error = body_mask(truth), maps["mean"] - truth
        odd = ((np.arange(truth.shape[0]) // k) % 2 == 1)[:, None, None]
        for part, mask in enumerate((body & ~odd, body & odd)):
            halves[part][0].append(design(maps, features, mask))
            halves[part][1].append(error[mask])
    x, e = np.concatenate(halves[0][0]), np.concatenate(halves[0][1])
    pick = np.random.default_rng(seed).choice(len(e), min(len(e), FIT_VOXELS), replace=False)
    coef = fit_log_linear(x[pick], e[pick])
    x2, e2 = np.concatenate(halves[1][0]), np.concatenate(halves[1][1])
    raw = np.exp(x2 @ coef)
    scale = conformal_scale(e2, raw)
    model = StdModel(features, tuple(float(c) for c in coef), scale)
    return model, conformal_multipliers(e2, raw * scale), coverage(e2, raw * scale)


def wide_fraction(std_hu: np.ndarray, body: np.ndarray, wide_hu: float = WIDE_HU) -> float:
    """Fraction of body voxels whose 90% interval (2 x 1.645 std) is wider than ``wide_hu``."""
    if not body.any():
        return 0.0
    return float(np.mean(2 * Z90 * std_hu[body] > wide_hu))


# -------------------------------------------------------------------------------------------- stored calibrations
@dataclass(frozen=True)
class Entry:
    """One fitted calibration: what it serves (method, factor, samples) and for which networks (file -> hash)."""

    method: str
    factor: int
    weights: dict[str, str]
    model: StdModel
    samples: int | None = None
    fitted_on: str = ""
    # Half-width of the p interval in units of std, per level p (conformal, so heavier-than-Gaussian tails are
    # honoured: 1.645 at 0.9 by construction, the Gaussian 0.674 at 0.5 would cover more than half).
    multipliers: dict[str, float] = field(default_factory=dict)
    calibration_coverage: dict[str, float] = field(default_factory=dict)

    def key(self) -> tuple[str, int, int | None]:
        return (self.method, self.factor, self.samples)


def _entry_json(e: Entry) -> dict:
    d = asdict(e)
    d["model"] = {"features": list(e.model.features.names), "window": list(e.model.features.window),
                  "coef": [round(c, 6) for c in e.model.coef], "scale": round(e.model.scale, 6)}
    return d


def _entry_from(d: dict) -> Entry:
    m = d["model"]
    model = StdModel(Features(tuple(m["features"]), tuple(m["window"])), tuple(m["coef"]), float(m["scale"]))
    return Entry(d["method"], int(d["factor"]), dict(d["weights"]), model, d.get("samples"), d.get("fitted_on", ""),
                 dict(d.get("multipliers", {})), dict(d.get("calibration_coverage", {})))


def read_calibrations(bundle: str | Path) -> list[Entry]:
    """Entries of ``bundle/calibration.json`` ([] when there is none)."""
    path = Path(bundle) / CALIBRATION_FILE
    if not path.is_file():
        return []
    try:
        data = json.loads(path.read_text())
        return [_entry_from(d) for d in data.get("entries", [])]
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise ThinsliceError(f"cannot read {path}: {err}; refit it with `{REFIT}` or delete it") from err


def write_calibrations(bundle: str | Path, new: list[Entry]) -> Path:
    """Store ``new`` in ``bundle/calibration.json``, replacing entries with the same method, factor and samples."""
    keys = {e.key() for e in new}
    kept = [e for e in read_calibrations(bundle) if e.key() not in keys]
    entries = sorted([*kept, *new], key=lambda e: (e.method, e.factor, e.samples or 0))
    path = Path(bundle) / CALIBRATION_FILE
    text = {"about": "uncertainty calibration per method, factor, samples and network hashes (docs/uncertainty.md)",
            "refit": REFIT, "level": LEVEL, "entries": [_entry_json(e) for e in entries]}
    path.write_text(json.dumps(text, indent=1) + "\n")
    return path


@dataclass(frozen=True)
class Lookup:
    """The calibration for a run (None: none fits) and a one-line note for the report."""

    entry: Entry | None
    note: str


def find_calibration(bundle: str | Path, method: str, factor: int, weights: dict[str, str],
                     samples: int | None = None) -> Lookup:
    """The entry for (method, factor, samples) whose network hashes equal ``weights``; a stale or missing one is
    named in the note, and the map is then left uncalibrated."""
    entries = [e for e in read_calibrations(bundle) if e.key() == (method, int(factor), samples)]
    what = f"{method} x{factor}" + (f", {samples} samples" if samples else "")
    if not entries:
        return Lookup(None, f"UNCALIBRATED (no calibration for {what} in {Path(bundle) / CALIBRATION_FILE}; "
                            f"fit one with `{REFIT} --methods {method}`)")
    entry = entries[0]
    if entry.weights != weights:
        changed = ", ".join(f"{k} {entry.weights.get(k, '-')}->{v}" for k, v in weights.items()
                            if entry.weights.get(k) != v)
        return Lookup(None, f"UNCALIBRATED (the weights changed since the calibration for {what}: {changed}; "
                            f"refit with `{REFIT} --methods {method}`)")
    return Lookup(entry, f"calibrated for {what} (fitted on {entry.fitted_on.split(',')[0]})")


# -------------------------------------------------------------------------------------------------- in pipelines
def attach_std(result: Result, bundle: str | Path, method: str, factor: int, weights: dict[str, str],
               samples: int | None = None) -> None:
    """Turn ``result.extras["spread"]`` (the raw map) into ``extras["std"]``, calibrated when ``calibration.json``
    holds a fit for these networks (else the raw spread, flagged), and add the one-line summary to the report."""
    volume = result.volume
    maps = {name: v.slices_first() for name, v in result.extras.items() if name in ("spread", "planes_spread")}
    maps["mean"] = mean = volume.slices_first()
    lookup = find_calibration(bundle, method, factor, weights, samples)
    needed = lookup.entry.model.features.names if lookup.entry else ()
    missing = [n for n in needed if n not in (*maps, *FROM_OUTPUT)]
    if missing:  # e.g. ldm's planes prior could not serve this input, so there is no planes disagreement
        lookup = Lookup(None, f"UNCALIBRATED (no {', '.join(missing)} map in this run, which the calibration needs)")
    std = lookup.entry.model.std(maps) if lookup.entry else maps["spread"]
    std_volume = volume.with_slices(std, volume.slice_spacing, 0.0, volume.slice_thickness)
    # The source's DICOM record stays, so that a std map written as DICOM joins the source's study and frame of
    # reference, as its thin series does.
    source = {k: v for k, v in volume.metadata.items() if k == SOURCE_KEY}
    std_volume.metadata = {**source, "content": "standard deviation (HU); mean +- 1.645 std is the 90% interval"
                           if lookup.entry else "raw spread (HU), not calibrated", "uncertainty": lookup.note}
    if lookup.entry and lookup.entry.multipliers:
        std_volume.metadata["intervals"] = ", ".join(f"{float(lv):.0%}: mean +- {m:.3g} std"
                                                     for lv, m in lookup.entry.multipliers.items())
    result.extras["std"] = std_volume
    wide = wide_fraction(std, body_mask(mean))
    std_volume.metadata["wide_fraction"] = f"{wide:.4f}"  # the summary as a number (batch's ledger and QC page)
    result.report["uncertainty"] = (f"{lookup.note}; 90% interval wider than {WIDE_HU:g} HU in {wide:.1%} of body "
                                    "voxels")
    volume.metadata["uncertainty"] = result.report["uncertainty"]


class Welford:
    """Running per-voxel mean and (``with_var``) sum of squared deviations of several samples, in place in float32
    accumulators of the output size (ldm's ``--samples``: the samples are never held at once):
    delta = x - mean_old; mean += delta / n; m2 += delta * (x - mean_new) = delta^2 (n - 1) / n."""

    def __init__(self, shape: tuple[int, ...], with_var: bool) -> None:
        self.n = 0
        self.mean = np.zeros(shape, np.float32)
        self.m2 = np.zeros(shape, np.float32) if with_var else None

    def add(self, x: np.ndarray) -> None:
        self.n += 1
        delta = np.subtract(x, self.mean, dtype=np.float32)
        self.mean += delta / self.n
        if self.m2 is not None and self.n > 1:
            np.multiply(delta, delta, out=delta)
            delta *= (self.n - 1) / self.n
            self.m2 += delta

    def std(self) -> np.ndarray | None:
        """The samples' standard deviation (n - 1 in the denominator); None without ``with_var``."""
        if self.m2 is None:
            return None
        return np.sqrt(np.maximum(self.m2 / (self.n - 1), 0.0)).astype(np.float32)
