"""Does the shipped uncertainty calibration hold on volumes it never saw? Coverage of the 50/80/90/95% intervals in
body voxels, rank correlation of std with |error| (voxel and 4x16x16 block), and a reliability diagram.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/uncertainty_coverage.py \\
        --data runs/split/heldout/ct07_from175.nii.gz runs/split/heldout/ct08_from100.nii.gz \\
        [--runs planes ldm:4 ldm:8] [--factor 4] [--profiles gaussian box] [--crop 256] [--checkpoint DIR] \\
        [--json docs/results/uncertainty_coverage.json] --out docs/images/uncertainty_reliability.png

Every run goes through the pipeline a user calls (``upsample --method planes --uncertainty`` / ``--method ldm
--samples N``), on the same central crops as benchmarks/fit_uncertainty.py. Intervals are ``mean +- m std`` with the
calibration's conformal multipliers m (1.645 at 90%) and, for comparison, the Gaussian z. One JSON line per case;
the rows also go into ``--json`` (merged with the rows already there, so runs can be split over processes) and the
diagram shows every row of that file.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from fit_uncertainty import central_crop

from thinslice.degrade.pairs import simulate_pair
from thinslice.evaluate.calibration import calibration
from thinslice.infer.pipeline import Acquisition
from thinslice.infer.uncertainty import coverage, find_calibration, gaussian_multipliers
from thinslice.infer.upsample import get_method
from thinslice.io import read_volume
from thinslice.io.mask import body_mask


def load(run: str, args: argparse.Namespace):
    """``planes`` or ``ldm:N`` -> (method, samples, pipeline)."""
    method, _, n = run.partition(":")
    samples = int(n) if n else None
    options = {"uncertainty": True} if method == "planes" else {"samples": samples, "progress": False}
    return method, samples, get_method(method).pipeline.from_pretrained(args.checkpoint, precision=args.precision,
                                                                         **options)


def _rounded(values: dict[str, float]) -> dict[str, float]:
    return {k: round(v, 4) for k, v in values.items()}


def score(run: str, pipeline, method: str, samples: int | None, data: str, profile: str,
          args: argparse.Namespace) -> dict:
    """One case: the run on one volume and profile, scored in the truth's body voxels."""
    thin = central_crop(read_volume(data), args.crop)
    thick, truth = simulate_pair(thin, factor=args.factor, profile=profile)
    start = time.perf_counter()
    result = pipeline(thick, truth.slice_spacing, Acquisition.of(thick, profile))
    seconds = time.perf_counter() - start
    n = min(result.volume.num_slices, truth.num_slices)
    mean, std = result.volume.slices_first()[:n], result.extras["std"].slices_first()[:n]
    ref = truth.slices_first()[:n]
    body = body_mask(ref)
    lookup = find_calibration(pipeline.bundle(), method, args.factor, pipeline.network_hashes(args.factor), samples)
    multipliers = lookup.entry.multipliers if lookup.entry else gaussian_multipliers()
    error = (mean - ref)[body]
    ranks = calibration(mean, std, ref)
    return {"run": run, "data": Path(data).name.split(".")[0], "profile": profile, "factor": args.factor,
            "coverage": _rounded(coverage(error, std[body], multipliers)),
            "coverage_gaussian": _rounded(coverage(error, std[body])),
            "spearman_voxel": round(ranks["spearman_voxel"], 3), "spearman_block": round(ranks["spearman_block"], 3),
            "mean_std_hu": round(ranks["mean_std_hu"], 1), "mean_abs_error_hu": round(ranks["mean_abs_error_hu"], 1),
            "seconds": round(seconds, 1), "report": result.report.get("uncertainty", "")}


def merge_rows(path: Path, row: dict) -> list[dict]:
    """``row`` added to the rows in ``path`` (replacing one of the same run, volume, profile and factor)."""
    key = ("run", "data", "profile", "factor")
    rows = json.loads(path.read_text()) if path.is_file() else []
    rows = [r for r in rows if any(r[k] != row[k] for k in key)] + [row]
    order = {"planes": 0}
    rows.sort(key=lambda r: (order.get(r["run"], 1), r["run"], r["data"], r["profile"]))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(rows, indent=1) + "\n")
    return rows


def reliability_diagram(rows: list[dict], path: Path) -> None:
    """Nominal vs observed coverage per run (panels) and case (lines): conformal multipliers solid, Gaussian z
    dashed; the grey band is nominal +- 0.05."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = list(dict.fromkeys(r["run"] for r in rows))
    cases = sorted({(r["data"], r["profile"]) for r in rows})  # one colour per case in every panel
    fig, axes = plt.subplots(1, len(runs), figsize=(4.2 * len(runs), 4.2), squeeze=False)
    for ax, run in zip(axes[0], runs, strict=True):
        ax.fill_between([0.4, 1.0], [0.35, 0.95], [0.45, 1.05], color="0.9")
        ax.plot([0.4, 1.0], [0.4, 1.0], color="0.5", lw=1)
        for r in (x for x in rows if x["run"] == run):
            levels = [float(lv) for lv in r["coverage"]]
            color = f"C{cases.index((r['data'], r['profile']))}"
            ax.plot(levels, list(r["coverage"].values()), "o-", color=color, label=f"{r['data']} {r['profile']}")
            ax.plot(levels, list(r["coverage_gaussian"].values()), "x--", color=color, alpha=0.6)
        ax.set(title=run.replace("ldm:", "ldm, N = "), xlabel="nominal coverage", ylabel="observed (body voxels)",
               xlim=(0.4, 1.0), ylim=(0.4, 1.0))
        ax.legend(fontsize=7, loc="lower right")
    fig.suptitle("solid: calibrated multipliers (1.645 std at 90%); dashed: Gaussian z", fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", nargs="+", default=[], help="thin volumes never used for training or calibration")
    parser.add_argument("--runs", nargs="+", default=["planes", "ldm:4", "ldm:8"])
    parser.add_argument("--factor", type=int, default=4)
    parser.add_argument("--profiles", nargs="+", default=["gaussian", "box"])
    parser.add_argument("--crop", type=int, default=256)
    parser.add_argument("--checkpoint", default=None)
    parser.add_argument("--precision", default="bf16")
    parser.add_argument("--json", type=Path, default=Path("docs/results/uncertainty_coverage.json"))
    parser.add_argument("--out", type=Path, default=Path("docs/images/uncertainty_reliability.png"))
    parser.add_argument("--plot-only", action="store_true", help="redraw the diagram from --json, run nothing")
    args = parser.parse_args()
    rows = json.loads(args.json.read_text()) if args.plot_only else []
    for run in [] if args.plot_only else args.runs:
        method, samples, pipeline = load(run, args)
        for data in args.data:
            for profile in args.profiles:
                row = score(run, pipeline, method, samples, data, profile, args)
                print(json.dumps(row), flush=True)
                rows = merge_rows(args.json, row)
    reliability_diagram(rows, args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
