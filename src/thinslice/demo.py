"""The main job end to end on an embedded default: thin CT -> simulated thick slices -> thin again -> scores.

Without input it uses the package's synthetic chest phantom, so it runs on a fresh install with no data. With a
thin user volume it does the same on it; with a thick one (no thin truth) it upsamples and shows the result.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path

from thinslice.data.phantom import make_chest_phantom
from thinslice.degrade.pairs import simulate_pair
from thinslice.evaluate.figures import save_comparison_figure
from thinslice.evaluate.metrics import evaluate_volumes
from thinslice.infer.upsample import WEIGHTLESS_METHODS, default_method, get_method, learned_methods, upsample
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
    scores: dict[str, dict[str, float]] = field(default_factory=dict)  # method -> metrics (when truth exists)
    files: dict[str, Path] = field(default_factory=dict)


def run_demo(
    out_dir: str | Path,
    input_path: str | Path | None = None,
    method: str | None = None,
    factor: float = 4.0,
    profile: str = "gaussian",
    seed: int = 0,
    log=print,
    checkpoint: str | Path | None = None,
    precision: str | None = None,
) -> DemoResult:
    """Without ``method``: cubic, cubic-dc and every learned method whose weights ship (or are in ``checkpoint``),
    so the demo shows the real models next to interpolation; ``method`` names one method to compare with cubic."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if method is None:
        learned = [m for m in learned_methods() if get_method(m).has_weights(checkpoint)]
        method = default_method() if checkpoint is None else (learned[-1] if learned else "cubic")
        methods = ["cubic", "cubic-dc", *learned]
    else:
        methods = [method] if method == "cubic" else ["cubic", method]
    result = DemoResult(out_dir=out, method=method)

    if input_path is None:
        log(f"demo: generating a synthetic chest CT phantom {DEMO_PHANTOM_SHAPE} (slices, rows, cols)")
        source: Volume = make_chest_phantom(DEMO_PHANTOM_SHAPE, DEMO_PHANTOM_SPACING, seed=seed)
    else:
        source = read_volume(input_path)
        log(f"demo: read {input_path}: {source}")

    truth: Volume | None
    if source.slice_spacing <= THIN_ENOUGH_MM:
        thick, truth = simulate_pair(source, factor=factor, profile=profile)
        thin_spacing = source.slice_spacing
        log(f"demo: simulated {thick.slice_spacing:.2f} mm thick slices ({profile}) from {thin_spacing:.2f} mm")
        result.files["truth"] = _write(truth, out / "thin_truth.nii.gz", input_path)
    else:
        thick, truth = source, None
        thin_spacing = source.slice_spacing / factor
        log(f"demo: input is already thick ({thick.slice_spacing:.2f} mm): upsampling to {thin_spacing:.2f} mm")
    result.files["input"] = _write(thick, out / "thick_input.nii.gz", input_path)

    outputs: dict[str, Volume] = {}
    for name in methods:
        start = time.perf_counter()
        options: dict[str, object] = {}
        if name not in WEIGHTLESS_METHODS:
            options["seed"] = seed
            if checkpoint is not None:
                options["checkpoint"] = str(checkpoint)
            if precision is not None:
                options["precision"] = precision
        if get_method(name).uses_profile:  # data consistency must use the profile the input was made with
            options["profile"] = profile
        outputs[name] = upsample(thick, thin_spacing, method=name, **options)
        seconds = time.perf_counter() - start
        result.files[name] = _write(outputs[name], out / f"result_{name}.nii.gz", input_path)
        if truth is not None:
            scores = evaluate_volumes(outputs[name], truth)
            scores["seconds"] = seconds
            result.scores[name] = scores
            log(f"demo: {name:>6}: PSNR {scores['psnr']:.2f} dB  SSIM {scores['ssim']:.4f}  "
                f"HU-MAE {scores['mae_hu']:.1f} (body {scores['mae_hu_body']:.1f})  {seconds:.1f} s")
        else:
            log(f"demo: {name:>6}: done in {seconds:.1f} s")

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


def _write(vol: Volume, path: Path, input_path: str | Path | None) -> Path:
    write_volume(vol, path, reference_input=input_path)
    return path
