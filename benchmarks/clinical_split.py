"""Write the data split (thinslice.data.split, docs/design/clinical.md) of the shared CT folder as NIfTI files.

    .venv/bin/python benchmarks/clinical_split.py --data ../shared/data/ct --out runs/split

gives runs/split/train/ (training parts), train_unseen/ (the same without ct07 and ct08), heldout/ (ct02 upper 61,
ct07 upper 100, ct08 upper 60 slices) and unseen/ (ct07 and ct08 whole, for the generalisation rows).
"""

from __future__ import annotations

import argparse

from thinslice.data.split import materialise


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", required=True, help="the shared CT folder (MANIFEST.md)")
    parser.add_argument("--out", default="runs/split")
    args = parser.parse_args()
    for which, files in materialise(args.data, args.out).items():
        print(f"{which}: {', '.join(f.name for f in files)}")


if __name__ == "__main__":
    main()
