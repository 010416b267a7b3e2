"""Training curve of ``train-planes`` runs: held-out validation PSNR gain over cubic-dc against minutes of training.

    .venv/bin/python benchmarks/plot_training_curve.py RUN_DIR[=LABEL] ... --out docs/images/planes_training.png

Reads each run's ``metrics.jsonl`` (``val/psnr``, ``val/psnr_cubic_dc``, ``val/minutes``; the minutes restart at a
resume, so they are accumulated across restarts) and draws one line per run.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def curve(run_dir: Path) -> tuple[list[float], list[float], list[int]]:
    minutes, gains, steps = [], [], []
    offset, last = 0.0, 0.0
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        row = json.loads(line)
        if "val/psnr" not in row:
            continue
        if row["val/minutes"] < last:  # a resumed run restarts its clock
            offset += last
        last = row["val/minutes"]
        minutes.append(offset + last)
        gains.append(row["val/psnr"] - row["val/psnr_cubic_dc"])
        steps.append(row["step"])
    return minutes, gains, steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", help="run folders, optionally RUN_DIR=label")
    parser.add_argument("--out", default="docs/images/planes_training.png")
    args = parser.parse_args()
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4), dpi=110)
    for spec in args.runs:
        path, _, label = spec.partition("=")
        minutes, gains, steps = curve(Path(path))
        ax.plot(minutes, gains, marker="o", label=f"{label or path} ({steps[-1]} steps)")
        print(f"{label or path}: " + ", ".join(f"{m:.0f} min {g:+.2f} dB" for m, g in zip(minutes, gains, strict=True)))
    ax.set_xlabel("minutes of training (2-core CPU, two runs sharing it)")
    ax.set_ylabel("validation PSNR - cubic-dc (dB)")
    ax.set_title("train-planes: x4 gaussian, central 256x256 crops of held-out volumes")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
