"""``thinslice selfcheck``: score the methods on a user's own thick scan, which has no thin truth.

Two checks, each with a truth the scan itself holds:

- **through-plane**: the scan degraded along its slice axis by K (5 mm -> 20 mm for K = 4) and restored to its own
  slices, scored against them;
- **in-plane**: one in-plane axis (fine pixels) resampled to thickness / K, degraded to the scan's slice thickness
  and restored (the SMORE / SR4ZCT idea): the very task the user wants (5 mm -> 1.25 mm), along an axis where the
  scan holds the answer.

Each method's scores are the mean over the checks; the recommended method is the one with the highest PSNR.
docs/design/clinical.md shows on ct02 and ct07 (which have truth) that this ranking is the truth's ranking.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np

from thinslice.degrade.pairs import simulate_pair
from thinslice.errors import ThinsliceError
from thinslice.evaluate.bench import MethodSpec, parse_methods, refusal, told_options
from thinslice.evaluate.metrics import evaluate_volumes
from thinslice.infer.upsample import Upsampler
from thinslice.io.volume import Volume

log = logging.getLogger(__name__)

DEFAULT_METHODS = ("linear", "cubic", "cubic-dc", "planes")
SCORES = ("psnr", "ssim", "mae_hu_body")


@dataclass
class Check:
    """One check: a thick input, the truth it came from, and what it is called in the table."""

    name: str
    description: str
    thick: Volume
    truth: Volume


@dataclass
class SelfCheck:
    """Scores per method (mean over the checks) and per check, and the recommended method."""

    volume: str
    checks: dict[str, str] = field(default_factory=dict)  # name -> description
    methods: dict[str, dict[str, float]] = field(default_factory=dict)
    per_check: dict[str, dict[str, dict[str, float]]] = field(default_factory=dict)  # check -> method -> scores
    skipped: dict[str, str] = field(default_factory=dict)

    @property
    def recommended(self) -> str:
        return max(self.methods, key=lambda m: self.methods[m]["psnr"])

    def as_json(self) -> dict[str, object]:
        return {"volume": self.volume, "methods": self.methods, "recommended": self.recommended,
                "checks": self.checks, "per_check": self.per_check, "skipped": self.skipped}


def through_plane_check(scan: Volume, factor: int, profile: str) -> Check:
    """The scan degraded by ``factor`` along its slice axis; the truth is the scan's own slices."""
    thick, truth = simulate_pair(scan, factor=factor, profile=profile)
    s = scan.slice_spacing
    return Check("through-plane", f"{s:.3g} mm slices -> {factor * s:.3g} mm -> {s:.3g} mm", thick, truth)


def inplane_check(scan: Volume, factor: int, profile: str) -> Check | None:
    """An in-plane axis of the scan as the slice axis: resampled to thickness / ``factor`` and degraded to the
    scan's slice thickness. None when the pixels are not finer than that (nothing to check against)."""
    from scipy.ndimage import zoom

    hu = scan.slices_first()  # (M, A, B)
    inplane = [scan.spacing[i] for i in range(3) if i != scan.slice_axis]  # (B, A) in index order
    thickness = float(scan.slice_thickness or scan.slice_spacing)
    target = thickness / factor
    if inplane[1] > target * 0.999:
        return None
    fine = zoom(hu, (1.0, inplane[1] / target, 1.0), order=1)
    if fine.shape[1] < 2 * factor * 4:
        return None
    view = Volume(fine, (inplane[0], target, scan.slice_spacing), stack_axis=1)
    thick, truth = simulate_pair(view, thickness=thickness, spacing=thickness, profile=profile)
    return Check("in-plane", f"{inplane[1]:.3g} mm pixels -> {target:.3g} mm, degraded to {thickness:.3g} mm -> "
                             f"{target:.3g} mm", thick, truth)


def run_selfcheck(scan: Volume, name: str, methods: Sequence[str] = DEFAULT_METHODS, factor: int = 4,
                  profile: str = "gaussian", inplane: bool = True, checkpoint: str | None = None,
                  precision: str | None = None, log_fn: Callable[[str], None] = log.info) -> SelfCheck:
    """Every method on every check of ``scan``."""
    if int(factor) != factor or factor < 2:
        raise ThinsliceError(f"--factor must be a whole number >= 2, got {factor}")
    if scan.num_slices < 2 * int(factor) + 2:
        raise ThinsliceError(f"the scan has {scan.num_slices} slices, too few to degrade by {factor} and still "
                             f"have a volume: use a smaller --factor")
    specs = parse_methods(methods, checkpoint, None, precision)
    checks = [through_plane_check(scan, int(factor), profile)]
    extra = inplane_check(scan, int(factor), profile) if inplane else None
    if extra is not None:
        checks.append(extra)
    result = SelfCheck(name, {c.name: c.description for c in checks})
    upsamplers = {spec.label: Upsampler.of(spec.method, spec.options) for spec in specs}  # weights load once
    for check in checks:
        result.per_check[check.name] = {}
        for spec in specs:
            scores = _score(upsamplers[spec.label], spec, check, profile, result.skipped)
            if scores is not None:
                result.per_check[check.name][spec.label] = scores
                log_fn(f"{check.name}: {spec.label} PSNR {scores['psnr']:.2f} dB")
    for spec in specs:
        rows = [per[spec.label] for per in result.per_check.values() if spec.label in per]
        if len(rows) == len(checks):
            result.methods[spec.label] = {k: float(np.mean([r[k] for r in rows])) for k in SCORES}
    if not result.methods:
        raise ThinsliceError("no method could run on this scan: " + "; ".join(f"{k}: {v}"
                                                                         for k, v in result.skipped.items()))
    return result


def _score(up: Upsampler, spec: MethodSpec, check: Check, profile: str,
           skipped: dict[str, str]) -> dict[str, float] | None:
    """One method's scores on one check (None, noted in ``skipped``, when it cannot serve the check)."""
    spacing = check.truth.slice_spacing
    reason = refusal(spec, check.thick, spacing)
    if reason:
        skipped[spec.label] = f"{check.name}: {reason}"
        return None
    out = up(check.thick, spacing, **told_options(spec, profile, check.thick)).volume
    scores = evaluate_volumes(out, check.truth)
    return {k: float(str(scores[k])) for k in SCORES}


def format_selfcheck(result: SelfCheck) -> str:
    """The table ``thinslice selfcheck`` prints."""
    names = list(result.per_check)
    lines = [f"selfcheck {result.volume}"] + [f"  {n}: {d}" for n, d in result.checks.items()]
    head = f"{'method':<14}{'PSNR (dB)':>10}{'SSIM':>8}{'HU-MAE body':>13}" + "".join(f"{n + ' PSNR':>20}"
                                                                                     for n in names)
    lines += ["", head]
    for label, s in sorted(result.methods.items(), key=lambda kv: -kv[1]["psnr"]):
        per = "".join(f"{result.per_check[n][label]['psnr']:>20.2f}" for n in names)
        lines.append(f"{label:<14}{s['psnr']:>10.2f}{s['ssim']:>8.4f}{s['mae_hu_body']:>13.1f}{per}")
    lines += [f"skipped {k}: {v}" for k, v in result.skipped.items()]
    lines.append(f"recommended: {result.recommended}")
    return "\n".join(lines)
