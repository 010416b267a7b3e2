"""First-stage options of the latent diffusion model, side by side: reconstruction PSNR on a held-out CT and
encode + decode seconds of a whole volume (tiled, as inference does).

    .venv/bin/python benchmarks/bench_first_stage.py --volume runs/data/ct02_upper61.nii.gz \
        --stages haar haar-inplane vae --shape 300 512 512 --threads 2

``haar``/``haar-inplane``: the lossless Haar wavelet stage (2x2x2 or 1x2x2 blocks, no training);
``vae``: a trained VAE (``--vae-weights FILE``; none ships). Timing runs on the synthetic phantom of ``--shape``.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from thinslice.data.phantom import make_chest_phantom
from thinslice.evaluate.metrics import psnr
from thinslice.io import read_volume
from thinslice.models.tiling import DEFAULT_TILE, decode_volume, encode_volume
from thinslice.models.wavelet import HaarFirstStage, WaveletConfig


def first_stage(name: str, weights: str | None) -> torch.nn.Module:
    if name == "haar":
        return HaarFirstStage(WaveletConfig(strides=(2, 2, 2)))
    if name == "haar-inplane":
        return HaarFirstStage(WaveletConfig(strides=(1, 2, 2)))
    if name == "vae":
        from thinslice.checkpoints.bundle import load_model

        if not weights:
            raise SystemExit("the vae stage needs --vae-weights VAE.safetensors (no VAE ships since the wavelet stage "
                             "replaced it; `git show faccce3:src/thinslice/weights/vae.safetensors` is the old one)")
        return load_model("vae", weights)
    raise SystemExit(f"unknown first stage {name}: use haar, haar-inplane or vae")


def round_trip(stage: torch.nn.Module, hu, precision: str) -> tuple[object, float]:
    dtype = torch.bfloat16 if precision == "bf16" else None
    start = time.perf_counter()
    latent = encode_volume(stage, hu, tile=DEFAULT_TILE, autocast_dtype=dtype)
    out = decode_volume(stage, latent, out_shape=hu.shape, tile=DEFAULT_TILE, autocast_dtype=dtype)
    return out, time.perf_counter() - start


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--volume", default=None, help="held-out CT for the reconstruction PSNR")
    p.add_argument("--stages", nargs="+", default=["haar", "haar-inplane"])
    p.add_argument("--shape", nargs=3, type=int, default=[300, 512, 512], help="timing volume: slices, rows, cols")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--precision", choices=("fp32", "bf16"), default="fp32")
    p.add_argument("--vae-weights", default=None)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    held_out = read_volume(args.volume).slices_first() if args.volume else None
    timing = make_chest_phantom(tuple(args.shape), (0.7, 0.7, 1.0), seed=0).slices_first()
    rows = []
    for name in args.stages:
        stage = first_stage(name, args.vae_weights).eval()
        row: dict[str, object] = {"stage": name, "latent_channels": stage.config.latent_channels,
                                  "stride": list(stage.total_stride)}
        with torch.no_grad():
            if held_out is not None:
                recon, _ = round_trip(stage, held_out, args.precision)
                row["psnr_db"] = round(psnr(recon, held_out), 2)
            _, seconds = round_trip(stage, timing, args.precision)
        row["encode_decode_s"] = round(seconds, 1)
        rows.append(row)
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
