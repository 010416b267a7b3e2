"""Average the weights of two or more networks of one architecture (a "model soup": one network, no extra cost at
inference), saved as a self-describing weights file with the first network's record.

    .venv/bin/python benchmarks/average_weights.py runs/planes_clin_mix/final/planes.safetensors \
        runs/planes_clin_plain/final/planes.safetensors --out runs/soup_pm/final/planes.safetensors

Works for networks fine-tuned from one start point (here: the clinical x4/x5 networks trained with and without the
acquisition mix, both from the x4 network of 2026-11-30), whose weights stay in one basin; docs/design/clinical.md.
The planes-x4 recipe (``thinslice reproduce planes-x4``) runs the same average as its last stage.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from thinslice.checkpoints.bundle import save_model
from thinslice.checkpoints.files import record_of
from thinslice.train.reproduce import average_weights


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("weights", nargs="+", help="weights files (.safetensors) of one network kind and architecture")
    parser.add_argument("--kind", default="planes")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    model = average_weights([Path(p) for p in args.weights], args.kind)
    record = record_of(model)
    assert record is not None
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    print(f"{args.out}: content hash {save_model(model, args.kind, record.preset, args.out)}")


if __name__ == "__main__":
    main()
