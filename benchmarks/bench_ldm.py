"""Time and memory of ``--method ldm`` on a full-size volume (512x512x300 output by default), per stage.

    .venv/bin/python benchmarks/bench_ldm.py [--checkpoint DIR | --preset small] [--shape 300 512 512] \
        [--factor 2] [--steps N] [--threads N] [--device cpu] [--precision bf16] [--decode residual|direct]

Without ``--checkpoint`` the networks of ``--preset`` get random weights: the compute (and so the time and memory)
is that of a trained model of the same preset. The input is the synthetic chest phantom made directly at the thick
spacing (``shape[0] / factor`` slices), so no patient data is needed. Prints seconds per stage (cubic, encode,
sampling, decode, consistency) and the peak resident memory of the process.
"""

from __future__ import annotations

import argparse
import resource
import time

import torch

from thinslice.checkpoints.bundle import load_denoiser, load_vae
from thinslice.checkpoints.device import resolve_device
from thinslice.data.phantom import make_chest_phantom
from thinslice.infer.ldm import LdmOptions, run_ldm
from thinslice.infer.upsample import get_method
from thinslice.models.factory import build_denoiser
from thinslice.models.vae import AutoencoderKL3D
from thinslice.presets import load_preset


def peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2  # Linux reports KiB


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", default=None, help="model bundle folder (default: random weights)")
    parser.add_argument("--preset", default="small", help="preset for random weights (default: small)")
    parser.add_argument("--shape", type=int, nargs=3, default=(300, 512, 512), metavar=("D", "H", "W"),
                        help="output (thin) shape, slices first")
    parser.add_argument("--factor", type=int, default=2, help="thick / thin spacing (default: 2)")
    parser.add_argument("--steps", type=int, default=None, help="sampling steps (default: the model's)")
    parser.add_argument("--patch-size", type=int, nargs=3, default=None, metavar=("D", "H", "W"),
                        help="force windowed sampling with windows of this image size")
    parser.add_argument("--memory-limit-gb", type=float, default=None,
                        help="memory allowed for whole-latent sampling (default: half the available RAM)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--precision", choices=("fp32", "bf16"), default="fp32")
    parser.add_argument("--decode", choices=("residual", "direct"), default="residual")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    torch.manual_seed(0)
    if args.checkpoint:
        bundle = get_method("ldm").bundle(args.checkpoint)
        vae, denoiser = load_vae(bundle, device), load_denoiser(bundle, device, steps=args.steps)
        source = str(bundle)
    else:
        preset = load_preset(args.preset)
        if args.steps is not None and preset.diffusion.method == "resshift":
            preset.diffusion.num_steps = args.steps
        vae = AutoencoderKL3D(preset.vae).to(device).eval()
        denoiser = build_denoiser(preset).to(device).eval()
        source = f"random {preset.name} weights"

    d, h, w = args.shape
    thin_mm = 1.0
    thick = make_chest_phantom(shape=(d // args.factor, h, w), spacing=(0.7, 0.7, thin_mm * args.factor), seed=0)
    rss_input = peak_rss_gb()
    start = time.perf_counter()
    patch = tuple(args.patch_size) if args.patch_size else None
    options = LdmOptions(steps=args.steps, progress=True, patch_size=patch, memory_limit_gb=args.memory_limit_gb,
                         precision=args.precision, decode=args.decode)
    result = run_ldm(thick, thin_mm, vae, denoiser, options)
    total = time.perf_counter() - start
    out = result.volume.slices_first()
    info = result.info
    print(f"ldm on {device} ({torch.get_num_threads()} threads), {source}: thick {thick.slices_first().shape} -> "
          f"thin {out.shape}, latent {info['latent_shape']}, sampling {info['window']}, {info['steps']} steps, "
          f"{args.precision}, {args.decode} decode")
    for stage, seconds in info["timings_s"].items():  # type: ignore[union-attr]
        print(f"  {stage:<12s} {seconds:8.1f} s")
    print(f"  {'total':<12s} {total:8.1f} s")
    res = info.get("consistency_hu", {})
    if res:
        print(f"  consistency |A x - thick| mean {res['before_mean_abs']:.3g} -> {res['after_mean_abs']:.3g} HU")
    print(f"peak RSS {peak_rss_gb():.2f} GB (after building the input: {rss_input:.2f} GB)")


if __name__ == "__main__":
    main()
