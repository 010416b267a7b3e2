"""Planes with and without ``skip_air`` (planes that hold only air keep the estimate) on thin volumes: how many
planes the network still runs on, the largest voxel difference, the PSNR of each and the seconds of the run (weights
loaded before; three runs each, alternating; the median of the per-pair ratios), 5 mm Gaussian slices every 5 mm
back to each volume's own spacing.

    .venv/bin/python benchmarks/planes_skip_air.py runs/split/heldout/ct07_from175.nii.gz \
        runs/split/heldout/ct08_from100.nii.gz

(``benchmarks/clinical_split.py --data ../shared/data/ct --out runs/split`` writes the held-out parts.)
"""

from __future__ import annotations

import statistics
import sys
import time

import numpy as np

from thinslice import Upsampler, read_volume
from thinslice.degrade.pairs import simulate_pair
from thinslice.evaluate.metrics import evaluate_volumes
from thinslice.infer import planes


def main(paths: list[str]) -> None:
    for name in paths:
        thin = read_volume(name)
        thick, truth = simulate_pair(thin, thickness=5.0, spacing=5.0, profile="gaussian")
        ups = {skip: Upsampler("planes", precision="bf16", skip_air=skip) for skip in (False, True)}
        outs, seconds = {}, {False: [], True: []}
        for _ in range(3):
            for skip, up in ups.items():
                start = time.perf_counter()
                outs[skip] = up(thick, truth.slice_spacing, profile="gaussian").volume
                seconds[skip].append(time.perf_counter() - start)
        ratio = statistics.median(b / a for a, b in zip(seconds[False], seconds[True], strict=True))
        # The planes the network still sees: those of the thick slices or of the estimate it refines (cubic-dc).
        estimate = Upsampler("cubic-dc")(thick, truth.slice_spacing, profile="gaussian").volume.slices_first()
        counts = []
        for orientation in planes.ORIENTATIONS:
            view, base = (planes._orientation_views(v, orientation) for v in (thick.slices_first(), estimate))
            counts.append(f"{orientation} {len(planes._planes_to_run(view, base, True))} of {view.shape[0]}")
        diff = np.abs(outs[True].array - outs[False].array)
        psnr = {skip: evaluate_volumes(out, truth)["psnr"] for skip, out in outs.items()}
        print(f"{name}: planes run ({', '.join(counts)}); max |difference| {diff.max():.1f} HU; PSNR all "
              f"{psnr[False]:.4f} dB, skip_air {psnr[True]:.4f} dB; seconds all {min(seconds[False]):.1f}, skip_air "
              f"{min(seconds[True]):.1f} (median ratio {ratio:.2f})")


if __name__ == "__main__":
    main(sys.argv[1:])
