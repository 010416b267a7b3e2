"""Cohorts: many scans in one command (``thinslice batch``), resumable, with a ledger, a QC page and Ray.

- :mod:`~thinslice.cohort.discover` finds the cases (files, folders, DICOM trees, CSV manifests) and the skips;
- :mod:`~thinslice.cohort.ledger` keeps ``cases.sqlite`` (and its views ``cases.jsonl`` / ``cases.csv``);
- :mod:`~thinslice.cohort.worker` is the per-case function every runner calls;
- :mod:`~thinslice.cohort.local` and :mod:`~thinslice.cohort.ray_runner` run cases here or on a Ray cluster;
- :mod:`~thinslice.cohort.report` writes ``report.html``; :mod:`~thinslice.cohort.batch` ties them together.
"""

from thinslice.cohort.batch import BatchResult, run_batch
from thinslice.cohort.cases import Settings
from thinslice.cohort.ray_runner import RayOptions

__all__ = ["BatchResult", "RayOptions", "Settings", "run_batch"]
