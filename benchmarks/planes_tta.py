"""Design point: test-time flips for planes (ct02 held-out, x4 gaussian and box): the network on the volume flipped
along each in-plane axis, outputs flipped back and averaged, then data consistency.

    .venv/bin/python benchmarks/planes_tta.py runs/data/ct02_upper61.nii.gz --threads 2
"""

from __future__ import annotations

import argparse

import numpy as np
import torch

from thinslice.degrade.pairs import simulate_pair
from thinslice.evaluate.metrics import psnr
from thinslice.infer.consistency import make_consistent
from thinslice.infer.pipeline import Acquisition
from thinslice.infer.planes import Planes, refine_planes
from thinslice.infer.upsample import CubicDC
from thinslice.io import read_volume
from thinslice.models.planes import acquisition_vector

FLIPS = [(), (1,), (2,), (1, 2)]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("volume")
    p.add_argument("--checkpoint", default=None)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    thin = read_volume(args.volume)
    pipeline = Planes.from_pretrained(args.checkpoint, precision="bf16", progress=False)
    for profile in ("gaussian", "box"):
        thick, truth = simulate_pair(thin, factor=4, profile=profile)
        acquisition = Acquisition.of(thick, profile)
        base = CubicDC()(thick, thin.slice_spacing, acquisition).volume
        cond = acquisition_vector(acquisition.ratio_to(thick.slice_spacing), profile)
        outs = []
        for flip in FLIPS:
            t = np.flip(thick.slices_first(), flip).copy() if flip else thick.slices_first()
            b = np.flip(base.slices_first(), flip).copy() if flip else base.slices_first()
            r = refine_planes(pipeline.model, t, b, cond)
            outs.append(np.flip(r, flip) if flip else r)
        for n in (1, 2, 4):
            vol = base.with_slices(np.mean(outs[:n], axis=0), base.slice_spacing, 0.0, base.slice_thickness)
            vol, _ = make_consistent(vol, thick, profile, acquisition.thickness_mm)
            print(f"{profile} x4, {n} flip(s): PSNR {psnr(vol.slices_first(), truth.slices_first()):.3f} dB",
                  flush=True)


if __name__ == "__main__":
    main()
