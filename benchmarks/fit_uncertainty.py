"""Fit the uncertainty calibration that ships beside the weights: the command lives in the package
(:mod:`thinslice.evaluate.fit_uncertainty`, also ``python -m thinslice.evaluate.fit_uncertainty``); this script runs
it, and the design-point scripts beside it import its helpers from here.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/fit_uncertainty.py [--methods planes ldm] [--dry-run] ...
"""

from __future__ import annotations

from thinslice.evaluate.fit_uncertainty import (  # noqa: F401 - re-exported for uncertainty_designs/coverage.py
    CLASSES,
    DEFAULT_FACTORS,
    FEATURES,
    central_crop,
    fit,
    main,
    pipeline_for,
    run_case,
)

if __name__ == "__main__":
    main()
