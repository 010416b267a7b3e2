"""The one-call GPU recipe: train the latent diffusion model (lossless Haar first stage, ResShift from the planes
estimate) on one GPU within minutes, and score it on a held-out volume.

Needs only PyTorch, Accelerate, safetensors, TensorBoard, numpy/scipy and MONAI (carried as a wheel); the volumes come
as compact arrays (``benchmarks/pack_arrays.py``: int16 .npz with their geometry, so no SimpleITK is needed there).
The first stage needs no training (the wavelet transform is exact); each variant (with/without IRControlNet) trains
in its own process, all at once on the one GPU. Writes to ``--out``:

- ``<variant>/denoiser.safetensors`` and ``<variant>/summary.json`` (the bundle's planes weights are the shipped ones);
- ``scores.json``: held-out PSNR (cubic-dc, planes, one ldm sample, mean of 4), sharpness, consistency residual and
  GPU seconds per volume.

Run on the device machine (see docs/design/diffusion.md)::

    python benchmarks/gpu_recipe.py --data .gpu/data --out $OUT --minutes 5

and here, end to end on the CPU with the tiny preset, by ``tests/train/test_gpu_recipe.py``.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

HELDOUT_TAG = "heldout"


def load_arrays(folder: Path) -> tuple[list[tuple[str, object]], list[tuple[str, object]]]:
    """(training, held-out) volumes from the .npz files of ``folder`` (held-out: names containing 'heldout')."""
    from thinslice.io.volume import Volume

    train, held = [], []
    for path in sorted(Path(folder).glob("*.npz")):
        with np.load(path) as z:
            vol = Volume(z["array"].astype(np.float32), tuple(z["spacing"]), tuple(z["origin"]),
                         z["direction"].reshape(3, 3))
        (held if HELDOUT_TAG in path.stem else train).append((path.stem, vol))
    if not train or not held:
        raise SystemExit(f"{folder}: need training .npz files and one with '{HELDOUT_TAG}' in its name")
    return train, held


def steps_per_second(preset, batch_size: int, control: bool, device: str, repeats: int = 12) -> float:
    """Optimiser steps per second of this denoiser on this device (random latents of the training crop), so that
    the cosine schedule ends at the time budget instead of being cut off by it."""
    import dataclasses

    import torch

    from thinslice.models.factory import build_denoiser

    p = dataclasses.replace(preset, control=dataclasses.replace(preset.control, enabled=control))
    model = build_denoiser(p).to(device)
    crop = [s // 2 for s in p.train_diffusion.patch_size]  # the Haar stage halves each axis
    x = torch.randn(batch_size, p.latent_channels, *crop, device=device)
    t = torch.zeros(batch_size, dtype=torch.long, device=device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5)
    dtype = torch.bfloat16 if device != "cpu" else torch.float32
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        with torch.autocast(device_type=torch.device(device).type, dtype=dtype, enabled=device != "cpu"):
            loss = model(x, t, x, 4.0).float().square().mean()
        loss.backward()
        opt.step()
        opt.zero_grad()
        if device != "cpu":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return 1.0 / float(np.median(times[2:]))


def train_variant(args: argparse.Namespace) -> None:
    """One variant in this process: calibrate the step count to the time budget, then train."""
    import dataclasses

    import torch

    from thinslice.device import resolve_device
    from thinslice.presets import load_preset
    from thinslice.train.diffusion import DiffusionTrainOptions, train_diffusion

    # The variants share the machine's cores: without a split, each process's OpenMP threads spin against the
    # others' (the first GPU run trained at 4-5 steps/s against 10-18 measured alone).
    torch.set_num_threads(max(1, args.threads))
    train, held = load_arrays(args.data)
    preset = load_preset(args.preset)
    preset = dataclasses.replace(preset, latent=dataclasses.replace(preset.latent, first_stage="haar",
                                                                     prior="planes"))
    device = str(resolve_device(None if args.device == "auto" else args.device))
    control = args.variant == "control"
    rate = steps_per_second(preset, args.batch_size, control, device)
    # 0.6: validation, checkpoints and batch assembly; the second H200 call ran at 60-70% of the timed rate.
    steps = args.max_steps or max(10, int(rate * args.minutes * 60 * 0.6))
    logging.info("%s: %.1f steps/s measured -> %d steps", args.variant, rate, steps)
    opts = DiffusionTrainOptions(
        run_dir=Path(args.run_root) / args.variant, preset=preset, max_steps=steps, device=args.device,
        mixed_precision="bf16" if device != "cpu" else "no", batch_size=args.batch_size, lr=args.lr,
        val_every=max(1, steps // 3), time_limit_s=args.minutes * 60 * 1.2, control=control, first_stage="haar",
        prior="planes", planes=args.planes, prior_workers=args.workers, progress=False,
        init=str(args.init_root / args.variant) if args.init_root else None)
    train_diffusion([v for _, v in train], [v for _, v in held], opts)


def score(bundle: Path, held, args: argparse.Namespace) -> dict:
    """Held-out x4 gaussian: cubic-dc, planes and ldm (1 sample, mean of 4) PSNR, sharpness, residual, seconds."""
    from thinslice.degrade.pairs import simulate_pair
    from thinslice.evaluate.metrics import high_band_power, psnr
    from thinslice.infer import upsample

    device = None if args.device == "auto" else args.device
    thin = held[0][1]
    thick, truth = simulate_pair(thin, factor=4.0, profile="gaussian")
    spacing, ref = truth.slice_spacing, truth.slices_first()
    rows: dict[str, dict] = {}
    runs = {"cubic-dc": ("cubic-dc", {}), "planes": ("planes", {"checkpoint": args.planes, "device": device}),
            "ldm-1": ("ldm", {"checkpoint": str(bundle), "device": device, "precision": "bf16"}),
            "ldm-mean4": ("ldm", {"checkpoint": str(bundle), "device": device, "precision": "bf16", "samples": 4})}
    for name, (method, options) in runs.items():
        start = time.perf_counter()
        out = upsample(thick, spacing, method, **options)
        seconds = time.perf_counter() - start
        x = out.slices_first()[: ref.shape[0]]
        rows[name] = {"psnr": psnr(x, ref), "sharpness": high_band_power(x, 4) / high_band_power(ref, 4),
                      "seconds": seconds}
    rows["shape"] = list(ref.shape)
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("stage", nargs="?", default="all", choices=["all", "train"])
    p.add_argument("--data", type=Path, required=True, help="folder of .npz volumes (pack_arrays.py)")
    p.add_argument("--out", type=Path, required=True, help="where the weights and scores.json go")
    p.add_argument("--run-root", type=Path, default=Path("/tmp/thinslice_gpu_runs"))
    p.add_argument("--preset", default="small")
    p.add_argument("--planes", default=None, help="bundle with the planes weights (default: shipped)")
    p.add_argument("--variants", default="control,nocontrol")
    p.add_argument("--variant", default="control")
    p.add_argument("--minutes", type=float, default=5.0, help="training wall time per variant (all at once)")
    p.add_argument("--max-steps", type=int, default=None, help="fixed step count instead of the time budget")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--lr", type=float, default=3e-4)
    p.add_argument("--workers", type=int, default=6, help="threads making the prior pairs per variant")
    p.add_argument("--device", default="auto")
    p.add_argument("--init-root", type=Path, default=None,
                   help="continue from INIT_ROOT/<variant> bundles (fine-tuning; e.g. an earlier run's weights)")
    p.add_argument("--threads", type=int, default=0, help="torch threads per variant (default: cores / variants)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    if args.stage == "train":
        train_variant(args)
        return 0
    return run_all(args)


def run_all(args: argparse.Namespace) -> int:
    """Every variant in its own process at once, then the scores of each finished bundle."""
    start = time.perf_counter()
    base = [sys.executable, __file__, "train", "--data", str(args.data), "--out", str(args.out), "--run-root",
            str(args.run_root), "--preset", args.preset, "--minutes", str(args.minutes), "--batch-size",
            str(args.batch_size), "--lr", str(args.lr), "--workers", str(args.workers), "--device", args.device]
    base += ["--planes", args.planes] if args.planes else []
    base += ["--max-steps", str(args.max_steps)] if args.max_steps else []
    base += ["--init-root", str(args.init_root)] if args.init_root else []
    variants = [v for v in args.variants.split(",") if v]
    threads = args.threads or max(1, (os.cpu_count() or 2) // len(variants))
    base += ["--threads", str(threads)]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    procs = {v: subprocess.Popen([*base, "--variant", v], env=env) for v in variants}
    codes = {v: proc.wait() for v, proc in procs.items()}
    _, held = load_arrays(args.data)
    results: dict = {"train_seconds": time.perf_counter() - start, "exit_codes": codes}
    for v in variants:
        bundle = next((args.run_root / v / d for d in ("final", "best") if (args.run_root / v / d).is_dir()), None)
        if bundle is None:
            continue
        out = args.out / v
        out.mkdir(parents=True, exist_ok=True)
        for name in ("denoiser.safetensors", "summary.json"):
            if (bundle / name).is_file():
                shutil.copyfile(bundle / name, out / name)
        results[v] = {"bundle": bundle.name, **score(bundle, held, args)}
        (args.out / "scores.json").write_text(json.dumps(results, indent=1))
    results["total_seconds"] = time.perf_counter() - start
    (args.out / "scores.json").write_text(json.dumps(results, indent=1))
    print(json.dumps(results, indent=1))
    return 0 if all(c == 0 for c in codes.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
