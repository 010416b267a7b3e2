"""Fit the uncertainty calibration that ships beside the weights (``weights/calibration.json``); rerun whenever the
planes or ldm weights change (their hashes key the fit, so a stale one is reported as UNCALIBRATED).

    OMP_NUM_THREADS=1 python -m thinslice.evaluate.fit_uncertainty [--methods planes ldm] [--factors 2 3 4 5 6] \\
        [--samples 4 8] [--data runs/split/heldout/ct02_from80.nii.gz] [--crop 256] [--profiles gaussian box] \\
        [--checkpoint DIR] [--dry-run]

Part of the package, not a repository script, because the library's UNCALIBRATED messages name this command and it
must run from an installed wheel too.

The calibration volume must be one no network was trained on (the project's split: ct02's held-out upper slices).
It is cropped to its central ``crop x crop`` in-plane region (all slices; cost), degraded per factor and profile,
upsampled by each method with its raw map, and :func:`thinslice.infer.uncertainty.fit_model` fits the std model
(likelihood on half the slabs) and its split-conformal scale (on the other half). Prints one JSON line per fit.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

from thinslice.degrade.pairs import simulate_pair
from thinslice.infer.pipeline import Acquisition
from thinslice.infer.uncertainty import Entry, Features, fit_model, write_calibrations
from thinslice.infer.upsample import get_method
from thinslice.io import read_volume
from thinslice.io.mask import body_mask
from thinslice.io.volume import Volume

# The features each method's map is built from (docs/design/uncertainty.md says why): the planes passes' disagreement is
# the informative signal (ldm starts from planes and uses it too; its samples' spread made the chest-fitted map
# over-cover a chest and was left out), the image noise and the intensity classes let one fit on a chest serve a
# head (the clinical retrain's design points: docs/design/uncertainty.md).
CLASSES = ("noise", "lung", "bone")
FEATURES = {"planes": Features(("spread", "contrast", *CLASSES), (3, 7, 7)),
            "ldm": Features(("planes_spread", "contrast", *CLASSES), (3, 7, 7))}
DEFAULT_FACTORS = {"planes": [2, 3, 4, 5, 6], "ldm": [4]}


def central_crop(volume: Volume, size: int) -> Volume:
    """The ``size x size`` in-plane region centred on the body's bounding box, all slices (cheaper runs)."""
    a = volume.slices_first()
    rows, cols = np.nonzero(body_mask(a).any(axis=0))
    starts = []
    for found, n in ((rows, a.shape[1]), (cols, a.shape[2])):
        centre = (int(found.min()) + int(found.max())) // 2 if found.size else n // 2
        starts.append(int(np.clip(centre - size // 2, 0, max(0, n - size))))
    crop = a[:, starts[0]: starts[0] + size, starts[1]: starts[1] + size]
    return volume.with_slices(np.ascontiguousarray(crop), volume.slice_spacing, 0.0, volume.slice_thickness)


def pipeline_for(method: str, samples: int | None, args: argparse.Namespace):
    """The method's pipeline with its raw map switched on (planes: --uncertainty, ldm: --samples N)."""
    options = {"uncertainty": True} if method == "planes" else {"samples": samples, "progress": False}
    return get_method(method).pipeline.from_pretrained(args.checkpoint, precision=args.precision, **options)


def run_case(pipeline, thin: Volume, k: int, profile: str) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """Raw maps ("mean", "spread", ...) and the truth for one simulated pair."""
    thick, truth = simulate_pair(thin, factor=k, profile=profile)
    result = pipeline(thick, truth.slice_spacing, Acquisition.of(thick, profile))
    n = min(result.volume.num_slices, truth.num_slices)
    maps = {"mean": result.volume.slices_first()[:n]}
    maps.update({name: v.slices_first()[:n] for name, v in result.extras.items() if name != "std"})
    return maps, truth.slices_first()[:n]


def fit(method: str, k: int, samples: int | None, thin: Volume, args: argparse.Namespace) -> Entry:
    """One calibration entry: the method run on every profile, pooled, fitted."""
    start = time.perf_counter()
    pipeline = pipeline_for(method, samples, args)
    cases = [run_case(pipeline, thin, k, profile) for profile in args.profiles]
    model, multipliers, cover = fit_model(cases, FEATURES[method], k)
    voxels = sum(int(body_mask(truth).sum()) for _, truth in cases)
    where = (f"{Path(args.data).name.split('.')[0]} central {args.crop}x{args.crop} crop, "
             f"{'+'.join(args.profiles)} x{k}, {voxels} body voxels")
    entry = Entry(method, k, pipeline.network_hashes(k), model, samples, where,
                  {lv: round(m, 4) for lv, m in multipliers.items()}, {lv: round(c, 4) for lv, c in cover.items()})
    print(json.dumps({"method": method, "factor": k, "samples": samples, "coef": model.coef, "scale": model.scale,
                      "multipliers": entry.multipliers, "calibration_coverage_gaussian": entry.calibration_coverage,
                      "weights": entry.weights, "seconds": round(time.perf_counter() - start, 1)}), flush=True)
    return entry


def main(argv: list[str] | None = None) -> None:
    """Fit every asked method and factor and write the calibration beside the weights (unless ``--dry-run``)."""
    parser = argparse.ArgumentParser(prog="python -m thinslice.evaluate.fit_uncertainty",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--methods", nargs="+", default=["planes", "ldm"], choices=sorted(FEATURES))
    parser.add_argument("--factors", nargs="+", type=int, default=None,
                        help="default: planes 2-6 (every factor it serves), ldm 4 (the benchmark's)")
    parser.add_argument("--samples", nargs="+", type=int, default=[4, 8], help="ldm sample counts to calibrate")
    parser.add_argument("--data", default="runs/split/heldout/ct02_from80.nii.gz",
                        help="thin volume no network was trained on")
    parser.add_argument("--crop", type=int, default=256, help="central in-plane crop (pixels)")
    parser.add_argument("--profiles", nargs="+", default=["gaussian", "box"])
    parser.add_argument("--checkpoint", default=None, help="bundle folder (default: the shipped weights)")
    parser.add_argument("--precision", default="bf16")
    parser.add_argument("--dry-run", action="store_true", help="print the fits, do not write calibration.json")
    args = parser.parse_args(argv)
    thin = central_crop(read_volume(args.data), args.crop)
    entries = [fit(method, k, n, thin, args) for method in args.methods for k in args.factors or DEFAULT_FACTORS[method]
               for n in ([None] if method == "planes" else args.samples)]
    if not args.dry_run:
        bundle = get_method(args.methods[0]).pipeline.locate_weights(args.checkpoint)
        print(f"wrote {write_calibrations(bundle, entries)}")


if __name__ == "__main__":
    main()
