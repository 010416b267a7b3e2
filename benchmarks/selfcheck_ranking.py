"""Does ``thinslice selfcheck`` rank the methods as the thin truth does? (docs/design/clinical.md)

    .venv/bin/python benchmarks/selfcheck_ranking.py runs/split/heldout/ct07_from175.nii.gz --thickness 5 \
        --methods linear cubic cubic-dc planes ldm --precision bf16 [--checkpoint BUNDLE] [--json out.json]

Simulates a thick scan from a thin volume (Gaussian, thickness = spacing), then (1) restores it to the thin spacing
with every method and scores it against the thin truth (the truth's ranking), and (2) runs the self-check on the
thick scan alone (no truth). Prints both tables, both rankings and whether they agree.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from scipy.stats import kendalltau

from thinslice.degrade.pairs import simulate_pair
from thinslice.evaluate.bench import parse_methods, run_benchmark
from thinslice.evaluate.selfcheck import format_selfcheck, run_selfcheck
from thinslice.io import read_volume


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("volume", help="a thin-slice volume (its truth)")
    parser.add_argument("--thickness", type=float, default=5.0, help="simulated slice thickness = spacing (mm)")
    parser.add_argument("--factor", type=int, default=4, help="the self-check's degradation factor")
    parser.add_argument("--methods", nargs="+", default=["linear", "cubic", "cubic-dc", "planes"])
    parser.add_argument("--checkpoint", default=None)
    parser.add_argument("--precision", default="bf16")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    thin = read_volume(args.volume)
    thick, _ = simulate_pair(thin, thickness=args.thickness, spacing=args.thickness)
    rows = run_benchmark([thin], [], ["gaussian"], parse_methods(args.methods, args.checkpoint, None, args.precision),
                         mm_cases=[(args.thickness, args.thickness)])
    truth = {r.method: r.psnr for r in rows}
    check = run_selfcheck(thick, Path(args.volume).name, args.methods, args.factor, checkpoint=args.checkpoint,
                          precision=args.precision, log_fn=print)
    print(format_selfcheck(check))
    common = [m for m in truth if m in check.methods]
    by_truth = sorted(common, key=lambda m: -truth[m])
    by_check = sorted(common, key=lambda m: -check.methods[m]["psnr"])
    tau = kendalltau([truth[m] for m in common], [check.methods[m]["psnr"] for m in common]).statistic
    print(f"truth ranking:     {' > '.join(by_truth)}")
    print(f"selfcheck ranking: {' > '.join(by_check)}")
    print(f"same ranking: {by_truth == by_check} (Kendall tau {tau:.2f}); truth recommends {by_truth[0]}, "
          f"selfcheck recommends {check.recommended}")
    if args.json:
        Path(args.json).write_text(json.dumps({"truth_psnr": truth, "selfcheck": check.as_json(),
                                               "same_ranking": by_truth == by_check, "kendall_tau": tau}, indent=1))


if __name__ == "__main__":
    main()
