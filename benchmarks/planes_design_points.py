"""Inference-side design points of planes on ct02 upper 61 (x4 gaussian): orientations, precision, adaptation."""
import time
from thinslice.degrade.pairs import simulate_pair
from thinslice.evaluate.metrics import evaluate_volumes
from thinslice.infer.upsample import upsample
from thinslice.io import read_volume
thin = read_volume("runs/data/ct02_upper61.nii.gz")
thick, truth = simulate_pair(thin, factor=4, profile="gaussian")
for label, opts in [("both, bf16", {}), ("coronal only", {"orientations": "coronal"}),
                    ("sagittal only", {"orientations": "sagittal"}), ("both, fp32", {"precision": "fp32"}),
                    ("both, no final projection", {"consistency": False}),
                    ("adapt (<=1500 steps / 180 s)", {"adapt": True})]:
    t = time.perf_counter()
    out = upsample(thick, 2.0, method="planes", checkpoint="runs/planes_main/final", **opts)
    s = evaluate_volumes(out, truth)
    print(f"{label:32s} PSNR {s['psnr']:.2f}  SSIM {s['ssim']:.4f}  {time.perf_counter() - t:.1f} s", flush=True)
