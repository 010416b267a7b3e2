"""Time and memory of ``--method ldm`` on a full-size volume (512x512x300 output by default), per stage.

    .venv/bin/python benchmarks/bench_ldm.py [--checkpoint DIR | --preset small] [--shape 300 512 512] \
        [--factor 4] [--steps N] [--samples N] [--threads N] [--device cpu] [--precision bf16]

Without ``--checkpoint`` the networks of ``--preset`` get random weights: the compute (and so the time and memory)
is that of a trained model of the same preset (its first stage, prior network and denoiser). The input is the
synthetic chest phantom made directly at the thick spacing (``shape[0] / factor`` slices), so no patient data is
needed. Prints seconds per stage (prior, encode, sampling, decode, consistency) and the peak resident memory.
"""

from __future__ import annotations

import argparse
import dataclasses
import time

import torch

from thinslice.data.phantom import make_chest_phantom
from thinslice.device import resolve_device
from thinslice.infer.ldm import Ldm, LdmOptions
from thinslice.infer.pipeline import Acquisition
from thinslice.infer.planes import Planes
from thinslice.infer.upsample import get_method
from thinslice.memory import process_peak_mb
from thinslice.models.factory import build_denoiser, build_first_stage, build_planes
from thinslice.models.vae import AutoencoderKL3D
from thinslice.presets import load_preset


def pipeline_for(args: argparse.Namespace, options: LdmOptions) -> tuple[Ldm, str]:
    """The ldm pipeline of ``--checkpoint``, or of ``--preset`` with random weights (the same compute)."""
    if args.checkpoint:
        bundle = get_method("ldm").bundle(args.checkpoint)
        pipeline = Ldm(dataclasses.replace(options, checkpoint=str(bundle)))
        pipeline.load()
        return pipeline, str(bundle)
    preset = load_preset(args.preset)
    if args.steps is not None and preset.diffusion.method == "resshift":
        preset.diffusion.num_steps = args.steps
    device = resolve_device(args.device)
    stage = build_first_stage(preset) or AutoencoderKL3D(preset.vae)
    denoiser = build_denoiser(preset).to(device).eval()
    latent = dataclasses.replace(preset.latent, residual_scale=preset.latent.residual_scale or 50.0)
    planes = None
    if latent.prior == "planes":
        planes = Planes.from_model(build_planes(preset).to(device).eval(), device=args.device,
                                   precision=args.precision)
    return Ldm.from_models(stage.to(device).eval(), denoiser, options, latent, planes), f"random {preset.name} weights"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", default=None, help="model bundle folder (default: random weights)")
    parser.add_argument("--preset", default="small", help="preset for random weights (default: small)")
    parser.add_argument("--shape", type=int, nargs=3, default=(300, 512, 512), metavar=("D", "H", "W"),
                        help="output (thin) shape, slices first")
    parser.add_argument("--factor", type=int, default=4, help="thick / thin spacing (default: 4)")
    parser.add_argument("--steps", type=int, default=None, help="sampling steps (default: the model's)")
    parser.add_argument("--samples", type=int, default=1, help="samples averaged (default: 1)")
    parser.add_argument("--patch-size", type=int, nargs=3, default=None, metavar=("D", "H", "W"),
                        help="force windowed sampling with windows of this image size")
    parser.add_argument("--memory-limit-gb", type=float, default=None,
                        help="memory allowed for whole-latent sampling (default: half the available RAM)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--precision", choices=("fp32", "bf16"), default="bf16")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    patch = tuple(args.patch_size) if args.patch_size else None
    options = LdmOptions(steps=args.steps, samples=args.samples, progress=True, patch_size=patch,
                         memory_limit_gb=args.memory_limit_gb, precision=args.precision, device=args.device)
    pipeline, source = pipeline_for(args, options)
    d, h, w = args.shape
    thin_mm = 1.0
    thick = make_chest_phantom(shape=(d // args.factor, h, w), spacing=(0.7, 0.7, thin_mm * args.factor), seed=0)
    rss_input = process_peak_mb() / 1024
    start = time.perf_counter()
    acquisition = Acquisition.of(thick)
    prior = pipeline.prior(thick, thin_mm, acquisition).volume
    t_prior = time.perf_counter() - start
    result = pipeline.refine(thick, prior, acquisition)
    total = time.perf_counter() - start
    out = result.volume.slices_first()
    print(f"ldm on {args.device} ({torch.get_num_threads()} threads), {source}: thick {thick.slices_first().shape} "
          f"-> thin {out.shape}: {result.report['ldm']}, prior {pipeline.latent.prior}, first stage "
          f"{pipeline.latent.first_stage}")
    print(f"  {'prior':<12s} {t_prior:8.1f} s")
    for stage_seconds in result.report["ldm_timing_s"].split(", "):
        stage, seconds = stage_seconds.rsplit(" ", 1)
        print(f"  {stage:<12s} {float(seconds):8.1f} s")
    print(f"  {'total':<12s} {total:8.1f} s")
    if "consistency_hu" in result.report:
        print(f"  consistency {result.report['consistency_hu']}")
    print(f"peak RSS {process_peak_mb() / 1024:.2f} GB (after building the input: {rss_input:.2f} GB)")


if __name__ == "__main__":
    main()
