"""``thinslice upsample``: thick-slice volume -> thin slices by a registered method (interpolation, CNN, LDM).

Generic options (``--device``, ``--seed``, ``--steps``, ``--samples``, ``--checkpoint``, ``--preset``,
``--patch-size`` and free ``--option KEY=VALUE``) are parsed for every method but only passed to, and checked by,
methods that use them, so new methods plug in without changing this parser.
"""

from __future__ import annotations

import argparse
import logging
import time

from thinslice.cli.checks import (
    ADAPT_STEPS,
    PATCH,
    SAMPLES,
    SEED,
    STEPS,
    check_input,
    check_mm,
    check_output,
    note_replaced,
    output_exists,
    warn_if_sparse,
)
from thinslice.cli.cmd_degrade import refuse_same_path, summary
from thinslice.degrade.grid import thin_grid
from thinslice.degrade.profiles import PROFILES
from thinslice.errors import ThinsliceError

# Option name (as passed to the method) -> attribute in the parsed arguments.
GENERIC_OPTIONS = ("device", "seed", "steps", "samples", "uncertainty", "checkpoint", "preset", "patch_size", "adapt",
                   "adapt_steps",
                   "precision", "profile", "thickness")


log = logging.getLogger("thinslice.cli")


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "upsample",
        help="resample a thick-slice volume to thin slices",
        description="Resample along the slice axis to --spacing mm on the thin grid covering the thick stack (the "
                    "grid a thin scan of the same extent would have). Methods: linear, cubic (B-spline) and any "
                    "installed learned method (see --method help).",
    )
    parser.add_argument("input", metavar="IN", help="thick-slice volume file or DICOM series folder")
    parser.add_argument("output", metavar="OUT", help="output file (.nii.gz, .nrrd, .mha) or folder for DICOM")
    parser.add_argument("--spacing", type=float, required=True, metavar="MM",
                        help="output slice spacing in mm (0.05 to 1000)")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace OUT (and its _std map) when it exists (default: refuse, nothing is replaced)")
    parser.add_argument("--method", default="auto", help="upsampling method (default: auto = the best method whose "
                        "weights ship with thinslice, else cubic); an unknown name "
                        "lists the available ones")
    parser.add_argument("--series", metavar="UID", default=None,
                        help="series to read from a multi-series folder (SeriesNumber or UID; `thinslice info "
                             "FOLDER` lists them)")
    parser.add_argument("--dtype", choices=("int16", "float32"), default="int16",
                        help="output voxel type for file outputs (default: int16 HU)")
    parser.add_argument("--profile", choices=(*PROFILES, "auto"), default=None,
                        help="slice profile of the input, for data consistency (cubic-dc, planes, cnn, ldm; default "
                             "gaussian with FWHM = slice thickness); auto: estimated from the scan itself (shape and "
                             "FWHM, in the report line)")
    parser.add_argument("--thickness", type=float, default=None, metavar="MM",
                        help="slice thickness of the input for data consistency (default: from the file, else the "
                             "slice spacing)")
    learned = parser.add_argument_group("options of learned methods (ignored by linear/cubic)")
    learned.add_argument("--device", default=None, help="torch device, e.g. cpu, cuda, cuda:1 (default: auto)")
    learned.add_argument("--seed", type=SEED, default=None, help="random seed for sampling (0 to 2^32-1)")
    learned.add_argument("--steps", type=STEPS, default=None, help="number of sampling steps (1 to 1000)")
    learned.add_argument("--samples", type=SAMPLES, default=None, help="number of samples to average (1 to 64)")
    learned.add_argument("--uncertainty", action="store_true", default=None,
                         help="write a calibrated std map beside the output (<stem>_std; mean +- 1.645 std is the "
                              "90%% interval): planes from its two passes (cheap), ldm from --samples N (default 4)")
    learned.add_argument("--checkpoint", default=None, help="model checkpoint (file or folder)")
    learned.add_argument("--preset", default=None, help="model preset: tiny, small, paper or a .json file")
    learned.add_argument("--patch-size", type=PATCH, nargs=3, default=None, metavar=("D", "H", "W"),
                         help="process the volume in patches of this size (voxels) to bound memory")
    learned.add_argument("--adapt", action="store_true", default=None,
                         help="cnn, planes: fine-tune on the input itself first (its in-plane axes as training "
                              "pairs; planes: at most 3 minutes, --option adapt_seconds=S)")
    learned.add_argument("--adapt-steps", type=ADAPT_STEPS, default=None, metavar="N",
                         help="fine-tuning steps for --adapt (cnn: default 200, ~20-50 on a CPU; planes: 1500)")
    learned.add_argument("--precision", choices=("fp32", "bf16"), default=None,
                         help="bf16: autocast, about twice as fast on recent CPUs and GPUs (default fp32; planes: "
                              "bf16)")
    learned.add_argument("--option", action="append", default=[], metavar="KEY=VALUE",
                         help="extra method-specific option (repeatable)")
    parser.set_defaults(func=run)


def collect_options(args: argparse.Namespace) -> dict[str, object]:
    """Options the user gave explicitly (generic flags and ``--option KEY=VALUE``)."""
    options: dict[str, object] = {}
    for name in GENERIC_OPTIONS:
        value = getattr(args, name, None)
        if value is not None:
            options[name] = tuple(value) if isinstance(value, list) else value
    for item in args.option:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ThinsliceError(f"--option expects KEY=VALUE, got '{item}'")
        options[key.strip().replace("-", "_")] = value
    return options


def method_options(method, args: argparse.Namespace) -> dict[str, object]:
    """The options ``method`` uses, typed (the one place command-line text becomes option values); a note names the
    flags it ignores."""
    from thinslice.infer.options import coerce_options, option_types

    options = _uncertainty_options(method, collect_options(args))
    ignored = sorted(set(options) - set(method.options))
    if ignored:
        flags = ", ".join("--" + name.replace("_", "-") for name in ignored)
        log.info(f"note: method '{method.name}' does not use {flags}; ignored")
    options = {k: v for k, v in options.items() if k in method.options}
    if "progress" in method.options:
        options.setdefault("progress", not getattr(args, "quiet", False))  # minutes: show how far (-q: not)
    return coerce_options(options, option_types(method.pipeline.Options))


def _uncertainty_options(method, options: dict[str, object]) -> dict[str, object]:
    """``--uncertainty``: planes computes its map itself, ldm from its samples (4 unless --samples says); any other
    method has none, which is an error rather than a silently missing file."""
    from thinslice.infer.upsample import UNCERTAINTY_SAMPLES, uncertainty_by_samples

    if not options.get("uncertainty") or "uncertainty" in method.options:
        return options
    if "samples" not in method.options:
        raise ThinsliceError(f"method '{method.name}' gives no uncertainty map: use --method planes --uncertainty "
                             "(cheap) or --method ldm --samples 4")
    converted = uncertainty_by_samples(method, options)
    if converted.get("samples") != options.get("samples"):
        log.info(f"note: {method.name} --uncertainty takes --samples {UNCERTAINTY_SAMPLES}")
    return converted


def _samples(options: dict[str, object]) -> int:
    """``--samples`` as given (text or number; 1 when absent)."""
    return int(str(options.get("samples") or 1))


def run(args: argparse.Namespace) -> int:
    from thinslice.infer.upsample import get_method, run_method
    from thinslice.io import read_volume, write_volume
    from thinslice.io.writers import write_std_map

    check_input(args.input)
    refuse_same_path(args.output, args.input)
    check_mm(args.spacing, "--spacing")
    check_mm(args.thickness, "--thickness")
    check_output(args.output, args.dtype, overwrite=args.overwrite)
    replacing = output_exists(args.output)
    if args.method != "auto":
        get_method(args.method)  # an unknown name fails before the volume is read
    start = time.perf_counter()
    thick = read_volume(args.input, series_uid=args.series)
    warn_if_sparse(thick)
    spacing = _snapped_spacing(thick, args.spacing)
    thin_grid(thick, spacing)  # an output grid that cannot fit in memory is refused before any method runs
    if args.method == "auto":
        from thinslice.infer.upsample import choose_auto

        args.method, note = choose_auto(thick, spacing)
        if note:
            log.info(f"note: {note}")
    method = get_method(args.method)
    options = method_options(method, args)
    std_path = _std_path(args, options)
    result = run_method(thick, spacing, method=method.name, **options)
    thin = result.volume
    if std_path is not None and "std" in result.extras:
        # A DICOM std map is a series of its own beside the output: source SeriesNumber + 2000, "... <method> std".
        std_existed = output_exists(std_path)
        written_std = write_std_map(result.extras["std"], std_path, method.name)
        note_replaced(written_std, std_existed)
        thin.metadata["std_map"] = str(written_std)
        print(f"wrote {written_std}: std map, {result.report.get('uncertainty', 'uncalibrated')}")
    written = write_volume(thin, args.output, dtype=args.dtype, reference_input=args.input, method=method.name)
    note_replaced(written, replacing)
    print(f"wrote {written}: {thick.num_slices} -> {thin.num_slices} slices, {summary(thin)}, "
          f"{method.name}, {time.perf_counter() - start:.1f} s")
    return 0


def _std_path(args: argparse.Namespace, options: dict[str, object]):
    """Where the uncertainty map goes (``--samples`` >= 2 or ``--uncertainty``): beside the output, ``ct.nii.gz`` ->
    ``ct_std.nii.gz``; checked against the input before any work."""
    from thinslice.io.writers import std_dtype, std_path_for

    if _samples(options) < 2 and not options.get("uncertainty"):
        return None
    path = std_path_for(args.output)
    refuse_same_path(str(path), args.input)
    check_output(path, std_dtype(path), overwrite=args.overwrite)
    return path


def _snapped_spacing(thick, spacing: float) -> float:
    """``--spacing``, or the divisor of the slice spacing it stands for (1.667 for 5 mm slices: 5/3), with a note."""
    from thinslice.degrade.grid import snap_spacing

    snapped = snap_spacing(thick, spacing)
    if snapped != spacing:
        log.info(f"note: --spacing {spacing:g} taken as {snapped:.6g} mm ({thick.slice_spacing:.4g} "
                 f"mm / {round(thick.slice_spacing / snapped)})")
    return snapped
