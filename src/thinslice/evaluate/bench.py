"""One benchmark for every method: volumes x factors x slice profiles x methods -> one table.

Each case simulates thick slices from a thin volume (``simulate_pair``), upsamples them back with each method through
the same :class:`~thinslice.infer.upsample.Upsampler` the CLI uses (one per method, so weights load once, before
the timing), and scores the result against the thin truth. Per method it records PSNR, SSIM, HU-MAE (body), the
data-consistency residual (how far the output, degraded again with the input's profile, is from the input slices),
wall seconds and the peak resident memory while the method ran.
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from thinslice.degrade.operators import SlabOperator, thick_profile_operator
from thinslice.degrade.pairs import simulate_pair
from thinslice.degrade.profiles import check_profile
from thinslice.errors import ThinsliceError
from thinslice.evaluate.figures import save_comparison_figure
from thinslice.evaluate.metrics import evaluate_volumes, high_band_power, through_plane_sharpness
from thinslice.infer.consistency import consistency_residual_hu
from thinslice.infer.upsample import WEIGHTLESS_METHODS, Upsampler
from thinslice.io import read_volume
from thinslice.io.atomic import write_text_atomic
from thinslice.io.formats import strip_volume_suffix
from thinslice.io.volume import Volume
from thinslice.memory import PeakMemory


@dataclass(frozen=True)
class MethodSpec:
    """A row label and how to call ``upsample`` for it (e.g. ``ldm-4`` = ldm with ``steps=4``)."""

    label: str
    method: str
    options: dict[str, object] = field(default_factory=dict)
    # The slice profile the method is told instead of the case's true one: "auto" (estimated from the input) or a
    # profile name with thickness = slice spacing (what a file's nominal thickness says); None: the truth.
    told: str | None = None


def parse_methods(names: Sequence[str], checkpoint: str | None = None, device: str | None = None,
                  precision: str | None = None) -> list[MethodSpec]:
    """Any registered method by name, plus the variants ``cnn-adapt``, ``ldm-N`` (N sampling steps),
    ``ldm-meanN`` (the mean of N samples) and ``ldm-cfgW`` (classifier-free guidance scale W); ``NAME@auto`` tells
    the method ``--profile auto`` and ``NAME@PROFILE`` that profile with the nominal thickness, instead of the
    case's true profile (slice-profile robustness rows)."""
    specs = []
    for name in names:
        base, _, told = name.partition("@")
        if told and told != "auto":
            check_profile(told)
        spec = _parse_method(base, checkpoint, device, precision)
        specs.append(dataclasses.replace(spec, label=name, told=told or None) if told else spec)
    return specs


def _parse_method(name: str, checkpoint: str | None, device: str | None, precision: str | None) -> MethodSpec:
    from thinslice.infer.upsample import available_methods, get_method

    learned: dict[str, object] = {}
    if checkpoint:
        learned["checkpoint"] = checkpoint
    if device:
        learned["device"] = device
    if precision:
        learned["precision"] = precision
    if name in WEIGHTLESS_METHODS:
        return MethodSpec(name, name)
    if name == "planes-adapt":
        return MethodSpec(name, "planes", {**learned, "adapt": True})
    if name == "cnn-adapt":
        return MethodSpec(name, "cnn", {**learned, "adapt": True, "adapt_steps": 30})
    if name == "ldm":
        return MethodSpec(name, "ldm", {**learned, "progress": False})
    if name.startswith("ldm-") and name[4:].isdigit():
        return MethodSpec(name, "ldm", {**learned, "steps": int(name[4:]), "progress": False})
    if name.startswith("ldm-mean") and name[8:].isdigit():
        return MethodSpec(name, "ldm", {**learned, "samples": int(name[8:]), "progress": False})
    if name.startswith("ldm-cfg") and _is_number(name[7:]):
        return MethodSpec(name, "ldm", {**learned, "guidance_scale": float(name[7:]), "progress": False})
    if name in available_methods() and get_method(name).needs_weights:
        return MethodSpec(name, name, learned)
    if name in available_methods():
        return MethodSpec(name, name)
    raise ThinsliceError(f"unknown benchmark method '{name}': use {', '.join(available_methods())}, "
                         "planes-adapt, cnn-adapt, ldm-N, ldm-meanN or ldm-cfgW (each also as NAME@auto or "
                         "NAME@PROFILE)")


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


@dataclass
class BenchRow:
    volume: str
    factor: float
    profile: str
    method: str
    thickness_ratio: float  # slice thickness / slice spacing of the simulated input (> 1: overlapping slices)
    psnr: float
    ssim: float
    mae_hu_body: float
    dc_residual_hu: float
    sharpness: float  # through-plane power above the thick Nyquist / the truth's (1 = as sharp as the truth)
    seconds: float
    peak_rss_mb: float
    case: str = ""  # "x4" or, for the clinical cases, "5/5 mm -> 1 mm" (thickness / spacing -> output spacing)


@dataclass(frozen=True)
class Case:
    """One simulated acquisition: factor (thick spacing / thin spacing), profile, thickness / spacing, and its label."""

    factor: float
    profile: str
    ratio: float
    label: str


def parse_mm_case(text: str) -> tuple[float, float]:
    """"5" (5 mm slices every 5 mm) or "5/2.5" (5 mm slices every 2.5 mm) -> (thickness, spacing) in mm."""
    thickness, _, spacing = text.partition("/")
    try:
        values = (float(thickness), float(spacing or thickness))
    except ValueError:
        raise ThinsliceError(f"a millimetre case is THICKNESS or THICKNESS/SPACING in mm (e.g. 5 or 5/2.5), not "
                             f"'{text}'") from None
    if not all(np.isfinite(v) and v > 0 for v in values):
        raise ThinsliceError(f"a millimetre case needs positive thickness and spacing, not '{text}'")
    return values


def volume_cases(thin_spacing: float, factors: Sequence[float], profiles: Sequence[str],
                 overlaps: Sequence[float] = (), mm_cases: Sequence[tuple[float, float]] = ()) -> list[Case]:
    """The factor cases of :func:`bench_cases`, then each millimetre case (thickness, spacing) x profile that the
    volume's slices can simulate (a thickness thinner than its slices is skipped)."""
    cases = [Case(f, p, r, f"x{f:g}" + (f" T/S {r:g}" if r != 1.0 else "")) for f, p, r in
             bench_cases(factors, profiles, overlaps)]
    for thickness, spacing in mm_cases:
        if thickness < thin_spacing - 1e-6 or spacing < thin_spacing - 1e-6:
            continue
        label = f"{thickness:g}/{spacing:g} mm -> {thin_spacing:g} mm"
        cases += [Case(spacing / thin_spacing, p, thickness / spacing, label) for p in profiles if p != "decimate"]
    return cases


def bench_cases(factors: Sequence[float], profiles: Sequence[str],
                overlaps: Sequence[float] = ()) -> list[tuple[float, str, float]]:
    """(factor, profile, thickness / spacing) of every case: each factor x profile with thickness = spacing, then
    each overlap ratio for the profiles that have a thickness (decimation has none)."""
    cases = [(float(f), p, 1.0) for f in factors for p in profiles]
    cases += [(float(f), p, float(r)) for r in overlaps for f in factors for p in profiles if p != "decimate"]
    return cases


def run_benchmark(
    volumes: Sequence[str | Path | Volume],
    factors: Sequence[float] = (2.0, 4.0),
    profiles: Sequence[str] = ("gaussian", "decimate"),
    methods: Sequence[MethodSpec] = (MethodSpec("linear", "linear"), MethodSpec("cubic", "cubic")),
    figure_path: str | Path | None = None,
    log: Callable[[str], None] = print,
    overlaps: Sequence[float] = (),
    mm_cases: Sequence[tuple[float, float]] = (),
    out_dir: str | Path | None = None,
) -> list[BenchRow]:
    """Score every method on every (volume, case) (factor x profile x overlap, then the millimetre cases); the first
    case also gives the figure. A method that cannot serve a case (e.g. planes at a non-integer factor) is skipped
    with a note. With ``out_dir`` the tables are rewritten after every case, so a long run stopped midway keeps
    what it measured."""
    rows: list[BenchRow] = []
    upsamplers: dict[str, Upsampler] = {}
    for index, item in enumerate(volumes):
        thin = item if isinstance(item, Volume) else read_volume(item)
        name = f"volume{index}" if isinstance(item, Volume) else strip_volume_suffix(Path(item).name)
        for case in volume_cases(thin.slice_spacing, factors, profiles, overlaps, mm_cases):
            spacing = case.factor * thin.slice_spacing
            thick, truth = simulate_pair(thin, thickness=case.ratio * spacing, spacing=spacing, profile=case.profile)
            operator = thick_profile_operator(thick, thin.slice_spacing, case.profile)
            truth_power = high_band_power(truth.slices_first(), case.factor)  # once per case, not per method
            outputs: dict[str, Volume] = {}
            for spec in methods:
                reason = refusal(spec, thick, truth.slice_spacing)
                if reason:
                    log(f"{name} {case.label} {case.profile}: {spec.label} skipped ({reason})")
                    continue
                if spec.label not in upsamplers:
                    upsamplers[spec.label] = _loaded(spec)
                row, outputs[spec.label] = _score_method(upsamplers[spec.label], spec, name, case, thick, truth,
                                                         operator, truth_power)
                rows.append(row)
                log(f"{name} {case.label:<18} {case.profile:<8} {spec.label:<12} PSNR {row.psnr:6.2f}  "
                    f"SSIM {row.ssim:.4f}  MAE(body) {row.mae_hu_body:6.1f} HU  DC {row.dc_residual_hu:7.2f} HU  "
                    f"{row.seconds:6.1f} s  {row.peak_rss_mb:6.0f} MB")
            if out_dir is not None:
                write_results(rows, out_dir)
            if figure_path is not None and not Path(figure_path).exists() and outputs:
                panels = {"thin truth": truth, f"thick {case.label} {case.profile}": thick, **outputs}
                save_comparison_figure(panels, figure_path, title=f"{name}: {case.label} {case.profile}")
    return rows


def refusal(spec: MethodSpec, thick: Volume, spacing_mm: float) -> str | None:
    """Why the method of ``spec`` (with its checkpoint) cannot serve ``thick`` -> ``spacing_mm`` (None: it can)."""
    from thinslice.infer.upsample import get_method

    checkpoint = spec.options.get("checkpoint")
    return get_method(spec.method).refuses(thick, spacing_mm, str(checkpoint) if checkpoint else None)


def told_options(spec: MethodSpec, true_profile: str, thick: Volume) -> dict[str, object]:
    """What the method is told about the input's slices: the true profile, ``auto``, or a profile with the nominal
    thickness (= the slice spacing); nothing for a method that does not model them."""
    from thinslice.infer.upsample import get_method

    if not get_method(spec.method).uses_profile:
        return {}
    if spec.told is None:
        return {"profile": true_profile}
    if spec.told == "auto":
        return {"profile": "auto"}
    return {"profile": spec.told, "thickness": float(thick.slice_spacing)}


def _loaded(spec: MethodSpec) -> Upsampler:
    """The upsampler of ``spec`` with its weights loaded, so that a row's seconds are the volume's own."""
    up = Upsampler.of(spec.method, spec.options)
    up.preload()
    return up


def _score_method(up: Upsampler, spec: MethodSpec, name: str, case: Case, thick: Volume, truth: Volume,
                  operator: SlabOperator, truth_power: float) -> tuple[BenchRow, Volume]:
    """One method on one case: its output, scores, data-consistency residual (against the true profile), seconds
    and peak memory."""
    with PeakMemory() as memory:
        start = time.perf_counter()
        out = up(thick, truth.slice_spacing, **told_options(spec, case.profile, thick)).volume
        seconds = time.perf_counter() - start
    scores = evaluate_volumes(out, truth)
    residual = consistency_residual_hu(out.slices_first(), thick.slices_first(), operator)
    sharpness = through_plane_sharpness(out.slices_first(), truth_power, case.factor)
    psnr, ssim, mae = (float(str(scores[k])) for k in ("psnr", "ssim", "mae_hu_body"))
    row = BenchRow(name, float(case.factor), case.profile, spec.label, case.ratio, psnr, ssim, mae,
                   float(residual["mean_abs"]), sharpness,
                   seconds, memory.peak_mb, case.label)
    return row, out


def markdown_table(rows: Sequence[BenchRow]) -> str:
    lines = [
        "| volume | case | factor | profile | thickness / spacing | method | PSNR (dB) | SSIM | HU-MAE body "
        "| DC residual (HU) | sharpness | seconds | peak RSS (MB) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(f"| {r.volume} | {r.case} | {r.factor:g} | {r.profile} | {r.thickness_ratio:g} | {r.method} | "
                     f"{r.psnr:.2f} | "
                     f"{r.ssim:.4f} | "
                     f"{r.mae_hu_body:.1f} | {r.dc_residual_hu:.2f} | {r.sharpness:.3f} | {r.seconds:.1f} | "
                     f"{r.peak_rss_mb:.0f} |")
    return "\n".join(lines) + "\n"


def summary_by_method(rows: Sequence[BenchRow]) -> dict[str, dict[str, float]]:
    """Mean PSNR/SSIM/MAE per method over all cases (what a reader looks at first)."""
    out: dict[str, dict[str, float]] = {}
    for label in dict.fromkeys(r.method for r in rows):
        mine = [r for r in rows if r.method == label]
        out[label] = {k: float(np.mean([getattr(r, k) for r in mine])) for k in ("psnr", "ssim", "mae_hu_body")}
    return out


def write_results(rows: Sequence[BenchRow], out_dir: str | Path) -> tuple[Path, Path]:
    """``bench.json`` and ``bench.md`` in ``out_dir`` (atomic writes)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    payload = {"rows": [asdict(r) for r in rows], "summary": summary_by_method(rows)}
    paths = (out / "bench.json", out / "bench.md")
    for path, text in zip(paths, (json.dumps(payload, indent=1), markdown_table(rows)), strict=True):
        write_text_atomic(path, text)
    return paths
