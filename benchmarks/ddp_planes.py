"""train-planes on one process and on two (torchrun, CPU): steps per second, and the validation PSNR reached at the
same effective batch. The figures of docs/guide/training.md (several processes).

    .venv/bin/python benchmarks/ddp_planes.py --out runs/ddp            # both measurements (about an hour, 2 cores)
    .venv/bin/python benchmarks/ddp_planes.py --out runs/ddp --only speed

Data: three chest phantoms for training and one for validation (thinslice.data.phantom, 192x192x120), written
into OUT/data. Speed: the small network (48 channels, 6 blocks) at bf16 for 120 steps, the median over 10-step
windows (robust to the bursts of a shared machine): 1 process with torch's default threads and with one thread
at batch 16 (and 8), 2 one-thread processes at batch 8 and 16, repeated. PSNR: 400 steps of the small preset
(warm-up 20, EMA 0.99) at effective batch 8, one process at batch 8 and two at batch 4, from scratch and
fine-tuned from the shipped weights, three seeds each; val PSNR of the shipped pipeline at x4 Gaussian on the
validation phantom (the number train-planes logs).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
from pathlib import Path

from thinslice.data.phantom import make_chest_phantom
from thinslice.io import write_volume
from thinslice.presets import load_preset

SHIPPED = Path(__file__).resolve().parents[1] / "src" / "thinslice" / "weights"


def write_data(out: Path) -> tuple[Path, Path]:
    train, val = out / "data" / "train", out / "data" / "val"
    for folder, seeds in ((train, (1, 2, 3)), (val, (9,))):
        folder.mkdir(parents=True, exist_ok=True)
        for seed in seeds:
            if not (folder / f"ph{seed}.nii.gz").is_file():
                write_volume(make_chest_phantom(seed=seed), folder / f"ph{seed}.nii.gz")
    return train, val


def write_preset(out: Path, name: str, **train_planes: object) -> Path:
    """The small preset with other training settings (steps, warm-up, cadence)."""
    record = load_preset("small").to_dict()
    record["name"] = name
    record["train_planes"].update(train_planes)
    path = out / f"{name}.json"
    path.write_text(json.dumps(record, indent=1))
    return path


def train(run: Path, processes: int, args: list[str], threads: int | None = None) -> None:
    """One train-planes run, on one process (torch's default threads, or ``threads``) or under torchrun (one
    thread per process)."""
    shutil.rmtree(run, ignore_errors=True)
    launcher = [sys.executable, "-m", "thinslice.cli.main"]
    env = dict(os.environ)
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    if processes > 1:
        env["OMP_NUM_THREADS"] = "1"
        launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(processes),
                    "--master_port", "29655", "-m", "thinslice.cli.main"]
    subprocess.run([*launcher, "-q", "train-planes", *args, "--out", str(run), "--device", "cpu",
                    "--mixed-precision", "bf16"], env=env, check=True)


def rows(run: Path, key: str) -> list[dict]:
    return [r for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if key in r]


def speed(out: Path, data: list[str], repeats: int) -> None:
    preset = write_preset(out, "small-speed", max_steps=120, warmup_steps=20, val_every=0, checkpoint_every=0,
                          log_every=10)
    print("| processes x threads | batch per process | effective batch | median s/step | steps/s | examples/s |")
    print("|---|---|---|---|---|---|")
    for rep in range(repeats):
        for processes, threads, batch in ((1, None, 16), (1, 1, 16), (1, 1, 8), (2, 1, 8), (2, 1, 16)):
            run = out / f"speed_p{processes}_t{threads or 'default'}_b{batch}_r{rep}"
            train(run, processes, [*data, "--preset", str(preset), "--batch-size", str(batch)], threads)
            windows = [r["train/sec_per_step"] for r in rows(run, "train/sec_per_step")][1:]  # not the start
            sec = statistics.median(windows)
            print(f"| {processes} x {threads or 'default'} | {batch} | {processes * batch} | {sec:.3f} | "
                  f"{1 / sec:.2f} | {processes * batch / sec:.0f} |", flush=True)


def psnr(out: Path, data: list[str], seeds: int) -> None:
    preset = write_preset(out, "small-short", max_steps=400, warmup_steps=20, val_every=200,
                          checkpoint_every=400, log_every=50, ema_decay=0.99)
    print("| start | processes x batch | seed | val PSNR step 200 | val PSNR step 400 | cubic-dc "
          "| train L1 / cubic-dc L1 |")
    print("|---|---|---|---|---|---|---|")
    for start, extra in (("scratch", []), ("shipped", ["--init", str(SHIPPED)])):
        for seed in range(seeds):
            for processes, batch in ((1, 8), (2, 4)):
                run = out / f"psnr_{start}_p{processes}_s{seed}"
                train(run, processes, [*data, *extra, "--preset", str(preset), "--batch-size", str(batch),
                                       "--seed", str(seed)])
                val = {r["step"]: r for r in rows(run, "val/psnr")}
                last = rows(run, "train/loss")[-1]
                print(f"| {start} | {processes} x {batch} | {seed} | {val[200]['val/psnr']:.3f} | "
                      f"{val[400]['val/psnr']:.3f} | {val[400]['val/psnr_cubic_dc']:.3f} | "
                      f"{last['train/loss'] / last['train/l1_base']:.3f} |", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--only", choices=["speed", "psnr"], default=None)
    parser.add_argument("--repeats", type=int, default=2, help="speed: repeats of each setting")
    parser.add_argument("--seeds", type=int, default=3, help="psnr: seeds of each setting")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    train_dir, val_dir = write_data(args.out)
    data = ["--data", str(train_dir), "--val", str(val_dir)]
    if args.only in (None, "speed"):
        speed(args.out, data, args.repeats)
    if args.only in (None, "psnr"):
        psnr(args.out, data, args.seeds)


if __name__ == "__main__":
    main()
