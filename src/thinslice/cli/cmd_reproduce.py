"""``thinslice reproduce``: make a shipped network again from its recipe (``configs/recipes/<name>.toml``).

One command for every recipe rather than a ``--recipe`` option per trainer: a chain can cross trainers (the
denoiser's prior is a planes network) and hold a weight average that no trainer runs; see
:mod:`thinslice.train.reproduce`.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from thinslice.cli.checks import ranged


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "reproduce", help="train a shipped network again from its recipe (the whole chain, one command)",
        description="Run every stage of a training recipe (configs/recipes/NAME.toml: planes, planes-x4, planes-x5, "
        "denoiser, baseline, or a recipe file) from the shared CT folder to the weights file, written to "
        "OUT/weights/ under the shipped name. Stages that a recipe starts from run first; finished stages are "
        "reused and an interrupted one resumes, so running the same command again continues.",
    )
    p.add_argument("recipes", nargs="*", metavar="RECIPE", help="recipe names or .toml files ('all': every shipped "
                   "recipe)")
    p.add_argument("--data", type=Path, default=None, metavar="DIR",
                   help="the shared CT folder (ct02_*.nii.gz ... ct11_*.nii.gz, its MANIFEST.md); default "
                        "$THINSLICE_CT_DATA, else ../shared/data/ct")
    p.add_argument("--out", type=Path, default=Path("runs/reproduce"),
                   help="where the stages' runs, the data parts and weights/ go (default runs/reproduce)")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda", "mps"])
    p.add_argument("--time-limit-min", "--time-limit", dest="time_limit_min", type=ranged(float, 0.01, 10**6),
                   default=None, metavar="MIN",
                   help="stop (with a checkpoint) after this many minutes in all; run the same command to continue")
    p.add_argument("--steps-scale", type=ranged(float, 1e-9, 1e3), default=1.0, metavar="F",
                   help="multiply every stage's steps (and its validation and stop steps) by F: a shorter run")
    p.add_argument("--max-steps", type=ranged(int, 1, 10**9), default=None, metavar="N",
                   help="at most N steps per schedule leg (after --steps-scale)")
    p.add_argument("--preset", default=None, metavar="NAME",
                   help="replace every stage's base preset (e.g. tiny, for a quick check of the chain), keeping "
                        "the recipe's changed sections")
    p.add_argument("--plan", action="store_true", help="print the stages with their settings and stop")
    p.add_argument("--list", action="store_true", help="list the shipped recipes and stop")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from thinslice.errors import ThinsliceError
    from thinslice.train import recipes
    from thinslice.train.reproduce import Overrides, plan, reproduce

    if args.list:
        for name in recipes.available():
            recipe = recipes.read_recipe(name)
            print(f"{name}: {recipe.weights}: {recipe.description}")
        return 0
    names = recipes.available() if args.recipes == ["all"] else args.recipes
    if not names:
        raise ThinsliceError("name a recipe (" + ", ".join(recipes.available()) + ", all) or a .toml file")
    ov = Overrides(steps_scale=args.steps_scale, max_steps=args.max_steps, preset=args.preset, device=args.device)
    for name in names:
        recipes.load(name)  # every recipe checked before the first one trains
    deadline = time.time() + args.time_limit_min * 60 if args.time_limit_min else None
    for name in names:
        if args.plan:
            print("\n".join(plan(name, ov, args.out)))
            continue
        ov.time_limit_s = None if deadline is None else max(0.0, deadline - time.time())
        if reproduce(name, args.data, args.out, ov) is None:
            return 0  # the time limit: the same command continues
    return 0
