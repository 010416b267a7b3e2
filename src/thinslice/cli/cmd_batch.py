"""``thinslice batch``: a cohort (files, folders, DICOM trees, CSV manifests) to thin slices in one resumable run.

Writes the outputs, the ledger (``cases.sqlite``, exported as ``cases.csv`` + ``cases.jsonl``) and the QC page
(``report.html``) into ``--out``.
Exit code 0 when no case failed, 1 when some did (their reasons are in the ledger), 2 for a usage error.
"""

from __future__ import annotations

import argparse

from thinslice.cli.method_flags import add_method_arguments
from thinslice.io.formats import output_suffixes


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "batch",
        help="upsample a cohort: folders, DICOM trees or a CSV manifest; resumable, with a ledger and QC page",
        description="Upsample every case found in INPUT... (volume files, folders, DICOM trees: every axial CT "
                    "series; a .csv manifest with columns input, output, spacing, method, options, series) into "
                    "--out. Re-running the same command skips the cases already done and retries failed ones. "
                    "Exit code 0: no case failed; 1: some failed (see cases.csv).",
    )
    parser.add_argument("inputs", nargs="+", metavar="INPUT", help="volume file, folder, DICOM tree or .csv manifest")
    parser.add_argument("--out", required=True, metavar="DIR", help="folder for outputs, ledger and report.html")
    parser.add_argument("--spacing", type=float, default=None, metavar="MM",
                        help="output slice spacing in mm (required unless the manifest gives every case's)")
    parser.add_argument("--method", default="auto", help="upsampling method (default auto, as thinslice upsample)")
    parser.add_argument("--format", dest="fmt", default="auto", choices=("auto", *output_suffixes()),
                        help="output format (default auto: the input's; DICOM series stay DICOM series)")
    parser.add_argument("--dtype", choices=("int16", "float32"), default="int16", help="voxel type of file outputs")
    parser.add_argument("--workers", type=int, default=None, metavar="N",
                        help="cases run at once on this machine (default 1); with --ray: at most N Ray workers")
    parser.add_argument("-q", "--quiet", action="store_true", default=argparse.SUPPRESS,
                        help="no progress bar and no line per case (errors only; same as thinslice -q batch)")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace existing files under the output names that this batch did not write (by "
                             "default such a case fails and the file is left as it is)")
    parser.add_argument("--no-thumbnails", dest="thumbnails", action="store_false",
                        help="leave the thumbnails out of report.html")
    dist = parser.add_argument_group("distribution on Ray (pip install 'thinslice[ray]')")
    dist.add_argument("--ray", metavar="auto|ADDRESS", default=None,
                      help="run on Ray: auto = the running cluster, else a new local one; or a cluster address "
                           "(host:6379); inputs and --out must be on a file system all nodes see")
    dist.add_argument("--cpus-per-worker", type=float, default=1.0, metavar="N",
                      help="CPUs each Ray worker reserves (default 1: one worker per CPU slot)")
    dist.add_argument("--gpus-per-worker", type=float, default=0.0, metavar="N",
                      help="GPUs each Ray worker reserves (e.g. 1: one worker per GPU; default 0)")
    add_method_arguments(parser, parser.add_argument_group("method options (as thinslice upsample; each method "
                                                           "takes those it uses)"), "options of learned methods")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from thinslice.cohort import RayOptions, Settings, run_batch
    from thinslice.errors import ThinsliceError
    from thinslice.infer.options import flag_values

    if args.workers is not None and args.workers < 1:
        raise ThinsliceError("--workers must be at least 1")
    if args.spacing is not None and not args.spacing > 0:
        raise ThinsliceError("--spacing must be a positive number of mm")
    settings = Settings(spacing=args.spacing, method=args.method, options=flag_values(args), fmt=args.fmt,
                        dtype=args.dtype, thumbnails=args.thumbnails, overwrite=args.overwrite)
    ray = None
    if args.ray is not None:
        ray = RayOptions(address=args.ray, workers=args.workers or 0, cpus_per_worker=args.cpus_per_worker,
                         gpus_per_worker=args.gpus_per_worker)
    result = run_batch(args.inputs, args.out, settings, workers=args.workers or 1, ray=ray,
                       progress=not args.quiet)
    counts = ", ".join(f"{n} {status}" for status, n in sorted(result.counts.items()))
    if not args.quiet:
        print(f"{result.out_dir}: {counts} ({result.ran} run now, {result.already_done} already done); "
              f"ledger {result.out_dir / 'cases.csv'}, QC page {result.report}")
    return result.exit_code
