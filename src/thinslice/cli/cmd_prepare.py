"""``thinslice prepare``: DICOM studies or volume files -> NIfTI training set with a patient-wise split."""

from __future__ import annotations

import argparse
from pathlib import Path

from thinslice.cli.checks import SEED, ranged
from thinslice.errors import ThinsliceError


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "prepare",
        help="convert a DICOM tree (e.g. LIDC-IDRI) or a folder of volumes into a NIfTI training set",
        description=(
            "Find every series under SRC_DIR (a tree of DICOM studies such as LIDC-IDRI, or a folder of "
            "NIfTI/NRRD/MHA files), convert each usable CT series to OUT_DIR/volumes/*.nii.gz (int16 HU), list all "
            "series with their status in OUT_DIR/series.csv, and split the patients into OUT_DIR/train.txt, "
            "val.txt and test.txt (no patient in two splits)."
        ),
    )
    parser.add_argument("src_dir", metavar="SRC_DIR", help="folder with DICOM studies or volume files")
    parser.add_argument("out_dir", metavar="OUT_DIR", help="output folder (created if missing)")
    parser.add_argument("--min-slices", type=ranged(int, 2, 100_000),
                        default=16, help="skip series with fewer slices (default 16)")
    parser.add_argument("--max-slice-spacing", type=ranged(float, 0.05, 1000), default=3.0,
                        help="skip series whose slices are further apart, in mm (default 3.0)")
    parser.add_argument("--seed", type=SEED, default=0, help="seed of the patient shuffle (default 0)")
    parser.add_argument("--split", type=ranged(float, 0, 1), nargs=3,
                        default=(0.7, 0.15, 0.15), metavar=("TRAIN", "VAL", "TEST"),
                        help="patient fractions of the train/val/test splits (default 0.7 0.15 0.15)")
    parser.add_argument("--no-progress", action="store_true", help="do not show a progress bar")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace the series.csv, split lists and volumes of an earlier prepare in OUT_DIR")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from thinslice.io.prepare import prepare_dataset

    if not args.overwrite:
        refuse_earlier_output(Path(args.out_dir))
    report = prepare_dataset(args.src_dir, args.out_dir, min_slices=args.min_slices,
                             max_slice_spacing=args.max_slice_spacing, seed=args.seed, split=tuple(args.split),
                             progress=not args.no_progress)
    print(report.summary())
    if not report.converted:
        raise ThinsliceError(f"no usable CT series in {args.src_dir}; see the reasons in "
                             f"{report.out_dir / 'series.csv'}")
    return 0


def refuse_earlier_output(out: Path) -> None:
    """One line when OUT_DIR already holds what prepare writes (series.csv, the split lists, volumes/*.nii.gz): a
    second run would replace them, which only ``--overwrite`` may do."""
    from thinslice.io.prepare import SPLIT_NAMES

    found = [out / name for name in ("series.csv", *(f"{s}.txt" for s in SPLIT_NAMES)) if (out / name).exists()]
    if (out / "volumes").is_dir() and any((out / "volumes").glob("*.nii.gz")):
        found.append(out / "volumes")
    if found:
        raise ThinsliceError(f"{out} already holds {', '.join(p.name for p in found)} (an earlier prepare?); pass "
                             "--overwrite to replace them, or choose a new OUT_DIR")
