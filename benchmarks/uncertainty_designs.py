"""Design points of the uncertainty calibration, compared on cached runs (docs/design/uncertainty.md, "Design points").

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/uncertainty_designs.py [--run planes|ldm:4|ldm:8] \
        [--cache runs/unc_cache] [--factor 4]

Runs planes ``--uncertainty`` (or ldm with N samples) once per (volume, profile) on the same central crops as
fit_uncertainty.py and uncertainty_coverage.py and caches the raw maps and the truth (``--cache``); then fits each
design on the calibration volume (ct02 held-out) and prints its coverage at 50/80/90/95% on the coverage volumes
(ct07 and ct08 held-out), with the multipliers the fit would ship. Nothing is written to the weights.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
from fit_uncertainty import central_crop, pipeline_for, run_case

from thinslice.infer.uncertainty import Features, coverage, fit_model
from thinslice.io import read_volume
from thinslice.io.mask import body_mask

CALIBRATION = "runs/split/heldout/ct02_from80.nii.gz"
COVERAGE = ("runs/split/heldout/ct07_from175.nii.gz", "runs/split/heldout/ct08_from100.nii.gz")
PROFILES = ("gaussian", "box")
WINDOW = (3, 7, 7)
EXTRA = {"": (), "+ noise": ("noise",), "+ intensity classes": ("lung", "bone"),
         "+ noise + classes": ("noise", "lung", "bone")}


def designs(method: str) -> dict[str, Features]:
    """The first calibration's features of ``method`` with each extra set, and a wider window."""
    base = {"planes": ("spread", "contrast"), "ldm": ("spread", "planes_spread", "contrast")}[method]
    found = {f"{' + '.join(base)} {name}".strip(): Features((*base, *extra), WINDOW) for name, extra in EXTRA.items()}
    found["wider window 5x11x11"] = Features(base, (5, 11, 11))
    if method == "ldm":  # the shipped ldm design: without the samples' spread
        found["planes_spread + contrast + noise + classes"] = Features(
            ("planes_spread", "contrast", *EXTRA["+ noise + classes"]), WINDOW)
    return found


def cached(path: str, profile: str, k: int, args: argparse.Namespace, pipeline) -> tuple[dict, np.ndarray]:
    """The raw maps and truth of one case, computed once."""
    run = args.run.replace(":", "")
    file = Path(args.cache) / f"{Path(path).name.split('.')[0]}_{profile}_x{k}_{run}.npz"
    if not file.is_file():
        maps, truth = run_case(pipeline, central_crop(read_volume(path), args.crop), k, profile)
        file.parent.mkdir(parents=True, exist_ok=True)
        np.savez(file, truth=truth, **maps)
    data = np.load(file)
    return {n: data[n] for n in data.files if n != "truth"}, data["truth"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run", default="planes", help="planes, or ldm:N (N samples)")
    parser.add_argument("--cache", default="runs/unc_cache")
    parser.add_argument("--factor", type=int, default=4)
    parser.add_argument("--crop", type=int, default=256)
    parser.add_argument("--checkpoint", default=None)
    parser.add_argument("--precision", default="bf16")
    args = parser.parse_args()
    method, _, samples = args.run.partition(":")
    pipeline = pipeline_for(method, int(samples) if samples else None, args)
    k = args.factor
    calib = [cached(CALIBRATION, p, k, args, pipeline) for p in PROFILES]
    tests = {(Path(v).name.split("_")[0], p): cached(v, p, k, args, pipeline) for v in COVERAGE for p in PROFILES}
    for name, features in designs(method).items():
        model, multipliers, _ = fit_model(calib, features, k)
        row = {"run": args.run, "design": name, "multipliers": {lv: round(m, 3) for lv, m in multipliers.items()}}
        for (volume, profile), (maps, truth) in tests.items():
            body = body_mask(truth)
            cover = coverage((maps["mean"] - truth)[body], model.std(maps)[body], multipliers)
            row[f"{volume} {profile}"] = [round(c, 3) for c in cover.values()]
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
