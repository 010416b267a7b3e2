"""The main job end to end on an embedded default: thin CT -> simulated thick slices -> thin again -> scores.

Without input it uses the package's synthetic chest phantom, so it runs on a fresh install with no data. With a
thin user volume it does the same on it; with a thick one (no thin truth) it upsamples and shows the result.
"""

from __future__ import annotations

import dataclasses
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from thinslice.data.phantom import make_chest_phantom
from thinslice.degrade.pairs import simulate_pair
from thinslice.evaluate.figures import save_comparison_figure
from thinslice.evaluate.metrics import evaluate_volumes
from thinslice.infer.upsample import WEIGHTLESS_METHODS, Upsampler, default_method, get_method, learned_methods
from thinslice.io import read_volume, write_volume
from thinslice.io.atomic import write_text_atomic
from thinslice.io.volume import Volume

# A volume whose slices are at most this thick (mm) is treated as thin truth and degraded first.
THIN_ENOUGH_MM = 2.5
DEMO_PHANTOM_SHAPE = (80, 160, 160)
DEMO_PHANTOM_SPACING = (1.8, 1.8, 1.25)


@dataclass
class DemoResult:
    out_dir: Path
    method: str
    scores: dict[str, dict[str, object]] = field(default_factory=dict)  # method -> metrics (when truth exists)
    files: dict[str, Path] = field(default_factory=dict)


@dataclass(frozen=True)
class DemoOptions:
    input_path: str | Path | None = None  # None: the synthetic chest phantom
    method: str | None = None  # None: cubic, cubic-dc and every learned method with weights
    factor: float = 4.0
    profile: str = "gaussian"
    seed: int = 0
    checkpoint: str | Path | None = None
    precision: str | None = None


def run_demo(out_dir: str | Path, options: DemoOptions | None = None, log=print, **fields: Any) -> DemoResult:
    """Without ``method``: cubic, cubic-dc and every learned method whose weights ship (or are in ``checkpoint``),
    so the demo shows the real models next to interpolation; ``method`` names one method to compare with cubic.
    ``options`` (or its fields as keywords) say what to run on."""
    o = dataclasses.replace(options or DemoOptions(), **fields)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    method, methods = _methods(o)
    result = DemoResult(out_dir=out, method=method)
    thick, truth, thin_spacing = _thick_and_truth(o, log)
    if truth is not None:
        result.files["truth"] = _write(truth, out / "thin_truth.nii.gz", o.input_path)
    result.files["input"] = _write(thick, out / "thick_input.nii.gz", o.input_path)
    outputs = {name: _run_one(name, thick, truth, thin_spacing, o, result, log) for name in methods}
    panels: dict[str, Volume] = {}
    if truth is not None:
        panels["thin truth"] = truth
    panels[f"thick input ({thick.slice_spacing:.1f} mm)"] = thick
    for name, vol in outputs.items():
        panels[f"{name} ({vol.slice_spacing:.2f} mm)"] = vol
    result.files["figure"] = save_comparison_figure(panels, out / "views.png", title=f"thinslice demo: {method}")
    write_text_atomic(out / "metrics.json", json.dumps(result.scores, indent=2))
    result.files["metrics"] = out / "metrics.json"
    log(f"demo: wrote {', '.join(str(p) for p in result.files.values())}")
    return result


def _methods(o: DemoOptions) -> tuple[str, list[str]]:
    """The headline method and every method the demo runs."""
    if o.method is not None:
        return o.method, [o.method] if o.method == "cubic" else ["cubic", o.method]
    learned = [m for m in learned_methods() if get_method(m).has_weights(o.checkpoint)]
    method = default_method() if o.checkpoint is None else (learned[-1] if learned else "cubic")
    return method, ["cubic", "cubic-dc", *learned]


def _thick_and_truth(o: DemoOptions, log) -> tuple[Volume, Volume | None, float]:
    """The thick input, the thin truth when there is one, and the output spacing."""
    if o.input_path is None:
        log(f"demo: generating a synthetic chest CT phantom {DEMO_PHANTOM_SHAPE} (slices, rows, cols)")
        source: Volume = make_chest_phantom(DEMO_PHANTOM_SHAPE, DEMO_PHANTOM_SPACING, seed=o.seed)
    else:
        source = read_volume(o.input_path)
        log(f"demo: read {o.input_path}: {source}")
    if source.slice_spacing <= THIN_ENOUGH_MM:
        thick, truth = simulate_pair(source, factor=o.factor, profile=o.profile)
        log(f"demo: simulated {thick.slice_spacing:.2f} mm thick slices ({o.profile}) from "
            f"{source.slice_spacing:.2f} mm")
        return thick, truth, source.slice_spacing
    log(f"demo: input is already thick ({source.slice_spacing:.2f} mm): upsampling to "
        f"{source.slice_spacing / o.factor:.2f} mm")
    return source, None, source.slice_spacing / o.factor


def _run_one(name: str, thick: Volume, truth: Volume | None, thin_spacing: float, o: DemoOptions,
             result: DemoResult, log) -> Volume:
    """One method on the input: written, scored against the truth when there is one, logged."""
    start = time.perf_counter()
    options: dict[str, object] = {}
    if name not in WEIGHTLESS_METHODS:
        options.update(seed=o.seed, checkpoint=None if o.checkpoint is None else str(o.checkpoint),
                       precision=o.precision)
    if get_method(name).uses_profile:  # data consistency must use the profile the input was made with
        options["profile"] = o.profile
    out = Upsampler.of(name, options)(thick, thin_spacing).volume
    seconds = time.perf_counter() - start
    result.files[name] = _write(out, result.out_dir / f"result_{name}.nii.gz", o.input_path)
    if truth is None:
        log(f"demo: {name:>6}: done in {seconds:.1f} s")
        return out
    scores = evaluate_volumes(out, truth)
    scores["seconds"] = seconds
    result.scores[name] = scores
    log(f"demo: {name:>6}: PSNR {scores['psnr']:.2f} dB  SSIM {scores['ssim']:.4f}  "
        f"HU-MAE {scores['mae_hu']:.1f} (body {scores['mae_hu_body']:.1f})  {seconds:.1f} s")
    return out


def _write(vol: Volume, path: Path, input_path: str | Path | None) -> Path:
    write_volume(vol, path, reference_input=input_path)
    return path
