"""One benchmark for every method: volumes x factors x slice profiles x methods -> one table.

Each case simulates thick slices from a thin volume (``simulate_pair``), upsamples them back with each method through
the same ``upsample`` entry point the CLI uses, and scores the result against the thin truth. Per method it records
PSNR, SSIM, HU-MAE (body), the data-consistency residual (how far the output, degraded again with the input's
profile, is from the input slices), wall seconds and the peak resident memory while the method ran.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from thinslice.degrade.pairs import simulate_pair
from thinslice.errors import ThinsliceError
from thinslice.evaluate.figures import save_comparison_figure
from thinslice.evaluate.metrics import evaluate_volumes, high_band_power, through_plane_sharpness
from thinslice.infer.consistency import SlabOperator, consistency_residual_hu, thick_profile_operator
from thinslice.infer.upsample import WEIGHTLESS_METHODS, upsample
from thinslice.io import read_volume
from thinslice.io.atomic import write_text_atomic
from thinslice.io.volume import Volume


@dataclass(frozen=True)
class MethodSpec:
    """A row label and how to call ``upsample`` for it (e.g. ``ldm-4`` = ldm with ``steps=4``)."""

    label: str
    method: str
    options: dict[str, object] = field(default_factory=dict)


def parse_methods(names: Sequence[str], checkpoint: str | None = None, device: str | None = None,
                  precision: str | None = None) -> list[MethodSpec]:
    """Any registered method by name, plus the variants ``cnn-adapt``, ``ldm-N`` (N sampling steps),
    ``ldm-meanN`` (the mean of N samples) and ``ldm-cfgW`` (classifier-free guidance scale W)."""
    from thinslice.infer.upsample import available_methods, get_method

    specs = []
    for name in names:
        learned: dict[str, object] = {}
        if checkpoint:
            learned["checkpoint"] = checkpoint
        if device:
            learned["device"] = device
        if precision:
            learned["precision"] = precision
        if name in WEIGHTLESS_METHODS:
            specs.append(MethodSpec(name, name))
        elif name == "planes-adapt":
            specs.append(MethodSpec(name, "planes", {**learned, "adapt": True}))
        elif name == "cnn-adapt":
            specs.append(MethodSpec(name, "cnn", {**learned, "adapt": True, "adapt_steps": 30}))
        elif name == "ldm":
            specs.append(MethodSpec(name, "ldm", {**learned, "progress": False}))
        elif name.startswith("ldm-") and name[4:].isdigit():
            specs.append(MethodSpec(name, "ldm", {**learned, "steps": int(name[4:]), "progress": False}))
        elif name.startswith("ldm-mean") and name[8:].isdigit():
            specs.append(MethodSpec(name, "ldm", {**learned, "samples": int(name[8:]), "progress": False}))
        elif name.startswith("ldm-cfg") and _is_number(name[7:]):
            specs.append(MethodSpec(name, "ldm", {**learned, "guidance_scale": float(name[7:]), "progress": False}))
        elif name in available_methods() and get_method(name).needs_weights:
            specs.append(MethodSpec(name, name, learned))
        elif name in available_methods():
            specs.append(MethodSpec(name, name))
        else:
            raise ThinsliceError(f"unknown benchmark method '{name}': use {', '.join(available_methods())}, "
                                 "planes-adapt, cnn-adapt, ldm-N, ldm-meanN or ldm-cfgW")
    return specs


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


class PeakRSS:
    """Peak resident memory of this process while the ``with`` block runs (sampled every 20 ms)."""

    def __init__(self) -> None:
        import psutil

        self._proc = psutil.Process()
        self.peak_mb = 0.0
        self._stop = threading.Event()

    def _poll(self) -> None:
        while not self._stop.is_set():
            self.peak_mb = max(self.peak_mb, self._proc.memory_info().rss / 2**20)
            self._stop.wait(0.02)

    def __enter__(self) -> PeakRSS:
        self.peak_mb = self._proc.memory_info().rss / 2**20
        self._thread = threading.Thread(target=self._poll, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


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
) -> list[BenchRow]:
    """Score every method on every (volume, factor, profile, overlap) case; the first case also gives the figure."""
    rows: list[BenchRow] = []
    for index, item in enumerate(volumes):
        thin = item if isinstance(item, Volume) else read_volume(item)
        name = f"volume{index}" if isinstance(item, Volume) else _short_name(Path(item))
        for factor, profile, ratio in bench_cases(factors, profiles, overlaps):
            spacing = factor * thin.slice_spacing
            thick, truth = simulate_pair(thin, thickness=ratio * spacing, spacing=spacing, profile=profile)
            operator = thick_profile_operator(thick, thin.slice_spacing, profile)
            truth_power = high_band_power(truth.slices_first(), factor)  # once per case, not per method
            outputs: dict[str, Volume] = {}
            for spec in methods:
                row, outputs[spec.label] = _score_method(spec, (name, factor, profile, ratio), thick, truth, operator,
                                                         truth_power)
                rows.append(row)
                log(f"{name} x{factor:g} {profile:<8} T/S {ratio:<4g} {spec.label:<9} PSNR {row.psnr:6.2f}  "
                    f"SSIM {row.ssim:.4f}  MAE(body) {row.mae_hu_body:6.1f} HU  DC {row.dc_residual_hu:7.2f} HU  "
                    f"{row.seconds:6.1f} s  {row.peak_rss_mb:6.0f} MB")
            if figure_path is not None and not Path(figure_path).exists():
                panels = {"thin truth": truth, f"thick x{factor:g} {profile}": thick, **outputs}
                save_comparison_figure(panels, figure_path, title=f"{name}: x{factor:g} {profile}")
    return rows


def _score_method(spec: MethodSpec, case: tuple[str, float, str, float], thick: Volume, truth: Volume,
                  operator: SlabOperator, truth_power: float) -> tuple[BenchRow, Volume]:
    """One method on one case (volume name, factor, profile, thickness / spacing): its output, scores,
    data-consistency residual, seconds and peak memory."""
    name, factor, profile, ratio = case
    from thinslice.infer.upsample import get_method

    # Data-consistency steps must know the slice profile of their input (the method declares whether it uses it).
    extra = {"profile": profile} if get_method(spec.method).uses_profile else {}
    with PeakRSS() as memory:
        start = time.perf_counter()
        out = upsample(thick, truth.slice_spacing, method=spec.method, **spec.options, **extra)
        seconds = time.perf_counter() - start
    scores = evaluate_volumes(out, truth)
    residual = consistency_residual_hu(out.slices_first(), thick.slices_first(), operator)
    sharpness = through_plane_sharpness(out.slices_first(), truth_power, factor)
    row = BenchRow(name, float(factor), profile, spec.label, ratio, float(scores["psnr"]), float(scores["ssim"]),
                   float(scores["mae_hu_body"]), float(residual["mean_abs"]), sharpness, seconds, memory.peak_mb)
    return row, out


def _short_name(path: Path) -> str:
    name = path.name
    for ext in (".nii.gz", ".nii", ".nrrd", ".mha", ".mhd"):
        if name.endswith(ext):
            return name[: -len(ext)]
    return name


def markdown_table(rows: Sequence[BenchRow]) -> str:
    lines = [
        "| volume | factor | profile | thickness / spacing | method | PSNR (dB) | SSIM | HU-MAE body "
        "| DC residual (HU) | sharpness | seconds | peak RSS (MB) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(f"| {r.volume} | {r.factor:g} | {r.profile} | {r.thickness_ratio:g} | {r.method} | {r.psnr:.2f} | "
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
