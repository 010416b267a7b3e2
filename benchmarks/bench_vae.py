"""Time and peak memory of tiled VAE encode + decode of a whole CT volume (default 300 x 512 x 512, small preset).

Random weights are fine for timing. Peak memory is the process's max RSS (thinslice.memory.process_peak_mb).
Optionally also measures bf16 autocast against float32 on a crop (accuracy in HU and speed).

    .venv/bin/python benchmarks/bench_vae.py --preset small --shape 300 512 512 --threads 2
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch

from thinslice.data.phantom import make_chest_phantom
from thinslice.memory import process_peak_mb
from thinslice.models.factory import build_vae
from thinslice.models.tiling import decode_volume, encode_volume
from thinslice.models.vae import count_parameters


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="small")
    p.add_argument("--shape", nargs=3, type=int, default=[300, 512, 512], help="slices, rows, columns")
    p.add_argument("--tile", nargs=3, type=int, default=[32, 128, 128])
    p.add_argument("--overlap", type=float, default=0.25)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--device", default="cpu")
    p.add_argument("--bf16-crop", nargs=3, type=int, default=None, help="also compare bf16 autocast on this crop")
    p.add_argument("--weights", default=None, help="trained VAE weights for the bf16 accuracy check")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    if args.weights:
        from thinslice.checkpoints.bundle import load_model

        vae = load_model("vae", args.weights, device=args.device)
    else:
        vae = build_vae(args.preset).to(args.device).eval()
    n, h, w = args.shape
    # A small phantom tiled to the requested shape stands in for a chest CT (content does not change the timing;
    # building a full-size phantom would itself need ~12 GB and hide the VAE's memory use).
    small = make_chest_phantom(shape=(min(n, 30), min(h, 128), min(w, 128)), spacing=(3.0, 3.0, 1.0), seed=0)
    reps = [int(np.ceil(a / b)) for a, b in zip((n, h, w), small.array.shape, strict=True)]
    hu = np.ascontiguousarray(np.tile(small.slices_first(), reps)[:n, :h, :w])
    del small
    base_rss = process_peak_mb()
    t0 = time.perf_counter()
    latent = encode_volume(vae, hu, tile=tuple(args.tile), overlap=args.overlap)
    t1 = time.perf_counter()
    recon = decode_volume(vae, latent, out_shape=hu.shape, tile=tuple(args.tile), overlap=args.overlap)
    t2 = time.perf_counter()
    result = {"preset": args.preset, "params_M": round(count_parameters(vae) / 1e6, 3), "shape": list(hu.shape),
              "latent_shape": list(latent.shape), "tile": args.tile, "overlap": args.overlap,
              "threads": args.threads, "device": args.device, "encode_s": round(t1 - t0, 1),
              "decode_s": round(t2 - t1, 1), "peak_rss_mb": round(process_peak_mb(), 0),
              "rss_before_mb": round(base_rss, 0), "recon_finite": bool(np.isfinite(recon).all())}
    if args.bf16_crop:
        d, y, x = args.bf16_crop
        crop = hu[:d, (h - y) // 2:(h + y) // 2, (w - x) // 2:(w + x) // 2]
        timings = {}
        outs = {}
        for name, dtype in (("fp32", None), ("bf16", torch.bfloat16)):
            t = time.perf_counter()
            lat = encode_volume(vae, crop, tile=tuple(args.tile), autocast_dtype=dtype)
            outs[name] = decode_volume(vae, lat, out_shape=crop.shape, tile=tuple(args.tile), autocast_dtype=dtype)
            timings[name] = round(time.perf_counter() - t, 1)
        result["bf16_vs_fp32_mae_hu"] = round(float(np.abs(outs["bf16"] - outs["fp32"]).mean()), 2)
        result["bf16_vs_fp32_max_hu"] = round(float(np.abs(outs["bf16"] - outs["fp32"]).max()), 1)
        result["crop_time_s"] = timings
    print(json.dumps(result))


if __name__ == "__main__":
    main()
