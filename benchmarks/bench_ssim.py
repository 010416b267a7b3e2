"""Time of thinslice's separable 3D SSIM on a full-size CT volume (512x512x300 by default).

    .venv/bin/python benchmarks/bench_ssim.py [--shape 300 512 512] [--threads N]

Uses synthetic HU volumes (smooth random structure plus noise), so no patient data is needed.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from thinslice.evaluate.metrics import ssim3d


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", type=int, nargs=3, default=(300, 512, 512), metavar=("D", "H", "W"))
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    rng = np.random.default_rng(0)
    shape = tuple(args.shape)
    ref = rng.uniform(-1000, 1500, size=shape).astype(np.float32)
    pred = ref + rng.normal(0, 40, size=shape).astype(np.float32)
    start = time.perf_counter()
    value = ssim3d(pred, ref)
    elapsed = time.perf_counter() - start
    print(f"3D SSIM on {shape[0]}x{shape[1]}x{shape[2]}: {value:.4f} in {elapsed:.1f} s "
          f"({torch.get_num_threads()} torch threads)")


if __name__ == "__main__":
    main()
