"""``thinslice selfcheck``: which method works best on *your* thick scan, scored without thin truth."""

from __future__ import annotations

import argparse
import json

from thinslice.cli.checks import check_input, ranged
from thinslice.degrade.profiles import PROFILES
from thinslice.errors import ThinsliceError

# The checks degrade by a whole factor of at least 2 and must keep two thick slices and one to spare (as
# :func:`thinslice.evaluate.selfcheck.run_selfcheck` requires): 2 * factor + 2 slices.
_MIN_FACTOR = 2


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "selfcheck",
        help="score the methods on your own thick scan (no thin truth needed) and recommend one",
        description="Degrade IN along its slice axis by --factor (e.g. 5 mm -> 20 mm) and restore it to its own "
                    "slices; and degrade an in-plane axis (fine pixels) to IN's slice thickness and restore it to "
                    "thickness / factor. Each method is scored against what IN itself holds (PSNR, SSIM, body "
                    "HU-MAE, mean of both checks); the best PSNR is recommended.",
    )
    parser.add_argument("input", metavar="IN", help="thick-slice volume file or DICOM series folder")
    parser.add_argument("--methods", nargs="+", default=["linear", "cubic", "cubic-dc", "planes"],
                        help="methods to compare (as in thinslice bench: also ldm, cnn, planes@auto, ...)")
    parser.add_argument("--factor", type=ranged(int, _MIN_FACTOR, 16), default=4,
                        help="degradation factor of the checks (2 to 16, default 4)")
    parser.add_argument("--profile", choices=PROFILES, default="gaussian",
                        help="slice profile the checks simulate (default gaussian)")
    parser.add_argument("--no-inplane", action="store_true", help="only the through-plane check")
    parser.add_argument("--checkpoint", default=None, help="model bundle folder (default: shipped weights)")
    parser.add_argument("--precision", choices=("fp32", "bf16"), default="bf16",
                        help="learned methods' precision (default bf16)")
    parser.add_argument("--series", metavar="UID", default=None, help="series to read from a multi-series folder")
    parser.add_argument("--json", action="store_true",
                        help='print {"methods": {NAME: {"psnr", "ssim", "mae_hu_body"}}, "recommended": NAME, ...}')
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from thinslice.evaluate.selfcheck import format_selfcheck, run_selfcheck
    from thinslice.io import read_volume

    check_input(args.input)
    scan = read_volume(args.input, series_uid=args.series)
    check_length(scan.num_slices, args.factor)
    result = run_selfcheck(scan, Path(args.input).name, args.methods, args.factor, args.profile,
                           inplane=not args.no_inplane, checkpoint=args.checkpoint, precision=args.precision)
    print(json.dumps(result.as_json(), indent=1) if args.json else format_selfcheck(result))
    return 0


def check_length(n_slices: int, factor: int) -> None:
    """One line for a scan too short for ``--factor``: the largest factor that fits, or (when not even the smallest
    does) how many slices selfcheck needs, rather than advice to lower a factor that is already the minimum."""
    if n_slices >= 2 * factor + 2:
        return
    largest = (n_slices - 2) // 2
    if largest >= _MIN_FACTOR:
        raise ThinsliceError(f"the scan has {n_slices} slices, too few to degrade by {factor}: use --factor "
                             f"{largest} or smaller")
    raise ThinsliceError(f"the scan has {n_slices} slices; selfcheck needs at least {2 * _MIN_FACTOR + 2} (it "
                         f"degrades them by {_MIN_FACTOR} or more and restores them)")
