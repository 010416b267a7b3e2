"""A longer fuzz run of the readers than the test suite's: random hostile NIfTI, NRRD, MHA and DICOM inputs, each
read in a child process (:func:`thinslice.data.hostile.probe`) and judged; prints how many were tried and each
distinct kind of failure with one example input.

    PYTHONPATH=src python benchmarks/fuzz.py --examples 2000 --seconds 600 [--seed 1] [--corpus]

Stops at whichever limit comes first. Exit code 1 when anything failed.
"""

from __future__ import annotations

import argparse
import math
import re
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import numpy as np

from thinslice.data import hostile
from thinslice.data.hostile import EITHER, Hostile, NrrdHeader

EDGE = [0.0, -1.0, 1e-9, 1e9, math.nan, math.inf, 0.5, 3.0, -1e4]


def _edge(rng: np.random.Generator) -> float:
    return float(rng.choice(EDGE)) if rng.random() < 0.6 else float(rng.normal(0, 100))


def random_nifti(rng: np.random.Generator, folder: Path) -> Hostile:
    header = hostile.random_nifti_header(rng)
    if rng.random() < 0.3:
        header = replace(header, version=2, vox_offset=544.0)
    if rng.random() < 0.2:
        header = replace(header, endian=">")
    data = hostile.default_voxels(header)
    data = data[: int(len(data) * float(rng.choice([1.0, 1.0, 0.5, 0.0])))]
    name = "f.nii.gz" if rng.random() < 0.4 else "f.nii"
    path = hostile.nifti_file(folder / name, header, data)
    return Hostile(path, repr(header)[:400], "nifti", EITHER, None, header.claimed_bytes())


def _triple(rng: np.random.Generator, sep: str = " ") -> str:
    return sep.join(f"{_edge(rng):g}" for _ in range(3))


def random_nrrd(rng: np.random.Generator, folder: Path) -> Hostile:
    header = NrrdHeader()
    f = header.fields
    if rng.random() < 0.5:
        f["sizes"] = " ".join(str(int(v)) for v in rng.choice([-1, 0, 1, 2, 8, 6, 40000], 3))
    f["type"] = str(rng.choice(["short", "float", "uchar", "double", "int64", "block", "x"]))
    f["encoding"] = str(rng.choice(["raw", "raw", "gzip", "bzip2", "ascii", "hex", "x"]))
    f["endian"] = str(rng.choice(["little", "big", "none"]))
    if rng.random() < 0.5:
        f["space directions"] = " ".join(f"({_triple(rng, ',')})" for _ in range(3))
    if rng.random() < 0.3:
        f["space origin"] = f"({_triple(rng, ',')})"
    detached = rng.random() < 0.4
    data = hostile.nrrd_voxels()[: int(768 * float(rng.choice([1.0, 0.5, 0.0])))]
    if detached:
        f["data file"] = str(rng.choice(["data.raw", "../data.raw", "/dev/null", "missing.raw"]))
        (folder / "data.raw").write_bytes(data)
    path = hostile.nrrd_file(folder / ("f.nhdr" if detached else "f.nrrd"), header, data)
    return Hostile(path, header.text()[:400].decode(errors="replace"), "nrrd", EITHER)


def random_mha(rng: np.random.Generator, folder: Path) -> Hostile:
    fields = dict(hostile.MHA_BASE)
    if rng.random() < 0.5:
        fields["DimSize"] = " ".join(str(int(v)) for v in rng.choice([-1, 0, 1, 2, 8, 6, 40000], 3))
    fields["ElementType"] = str(rng.choice(["MET_SHORT", "MET_FLOAT", "MET_UCHAR", "MET_DOUBLE", "MET_NONE"]))
    for key in ("ElementSpacing", "Offset"):
        if rng.random() < 0.4:
            fields[key] = _triple(rng)
    if rng.random() < 0.4:
        fields["TransformMatrix"] = " ".join(_triple(rng) for _ in range(3))
    fields["CompressedData"] = str(rng.choice(["False", "True"]))
    data = hostile.nrrd_voxels()[: int(768 * float(rng.choice([1.0, 0.5, 0.0])))]
    data_file = fields.pop("ElementDataFile")
    if rng.random() < 0.4:
        data_file = str(rng.choice(["data.raw", "../data.raw", "/dev/null", "missing.raw"]))
        (folder / "data.raw").write_bytes(data)
        path = folder / "f.mhd"
        text = hostile.mha_text(fields) + f"ElementDataFile = {data_file}\n".encode()
        path.write_bytes(text)
    else:
        path = folder / "f.mha"
        text = hostile.mha_text(fields) + b"ElementDataFile = LOCAL\n"
        path.write_bytes(text + data)
    return Hostile(path, text[:400].decode(errors="replace"), "mha", EITHER)


def random_dicom(rng: np.random.Generator, folder: Path, base: Path) -> Hostile:
    from thinslice.data.odd import edit_headers

    hostile._allow_invalid_values()
    ds_values = ["0", "1", "-1", "NaN", "1e9", "1e-9", "0.7"]
    options: dict[str, Callable[[], object]] = {
        "Rows": lambda: int(rng.choice([0, 1, 4, 8, 16, 65535])),
        "Columns": lambda: int(rng.choice([0, 1, 4, 8, 16, 65535])),
        "BitsAllocated": lambda: int(rng.choice([1, 8, 12, 16, 32])),
        "NumberOfFrames": lambda: int(rng.choice([0, 1, 3, 1000000])),
        "PixelSpacing": lambda: [str(v) for v in rng.choice(ds_values, int(rng.integers(1, 4)))],
        "ImagePositionPatient": lambda: [str(v) for v in rng.choice(ds_values, int(rng.integers(2, 5)))],
        "ImageOrientationPatient": lambda: [str(v) for v in rng.choice(["0", "1", "-1", "NaN", "0.5"], 6)],
        "RescaleSlope": lambda: str(rng.choice(ds_values)),
        "PixelRepresentation": lambda: int(rng.integers(0, 2)),
    }
    keys = list(rng.choice(sorted(options), int(rng.integers(1, 4)), replace=False))
    edits = {str(k): options[str(k)]() for k in keys}
    cut = float(rng.choice([1.0, 1.0, 0.5, 0.0]))
    series = folder / "series"
    shutil.copytree(base, series)
    paths = sorted(series.iterdir())
    one = rng.random() < 0.5

    def change(ds, index):
        for key, value in edits.items():
            setattr(ds, key, value)
        ds.PixelData = ds.PixelData[: int(len(ds.PixelData) * cut) // 2 * 2]

    edit_headers(paths[1:2] if one else paths, change)
    return Hostile(series, f"{'one file' if one else 'all files'}: {edits}, pixel data x{cut}", "dicom", EITHER)


def failure_class(problem: str) -> str:
    """A problem with its numbers and paths taken out, so that failures of one kind count together."""
    text = re.sub(r"/\S+", "PATH", problem)
    return re.sub(r"-?\d[\d.e+-]*", "N", text)[:160]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--examples", type=int, default=500)
    parser.add_argument("--seconds", type=float, default=300.0)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--corpus", action="store_true", help="read the whole hostile corpus first")
    parser.add_argument("--timeout", type=float, default=8.0, help="seconds after which a read counts as a hang")
    args = parser.parse_args()
    rng = np.random.default_rng(args.seed)
    work = Path(tempfile.mkdtemp(prefix="thinslice-fuzz-run-"))
    base = work / "base_series"
    hostile.dicom_series(base, n=3, size=8)
    makers = [random_nifti, random_nrrd, random_mha, lambda r, f: random_dicom(r, f, base)]
    failures: dict[str, list[str]] = {}
    tried, start = 0, time.perf_counter()
    items = hostile.corpus(work / "corpus", args.seed) if args.corpus else []
    try:
        while tried < args.examples and time.perf_counter() - start < args.seconds:
            folder = Path(tempfile.mkdtemp(dir=work))
            item = items[tried] if tried < len(items) else makers[int(rng.integers(len(makers)))](rng, folder)
            tried += 1
            for problem in hostile.judge(item, hostile.probe(item.path, timeout=args.timeout)):
                failures.setdefault(f"{item.kind}: {failure_class(problem)}", []).append(
                    f"{item.description[:300]} -> {problem[:200]}")
            if not item.path.is_relative_to(work / "corpus"):
                shutil.rmtree(folder, ignore_errors=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    failed = sum(len(v) for v in failures.values())
    print(f"{tried} examples in {time.perf_counter() - start:.0f} s: {failed} failed, {len(failures)} kinds")
    for name, examples in sorted(failures.items(), key=lambda kv: -len(kv[1])):
        print(f"\n[{len(examples)}x] {name}\n    e.g. {examples[0]}")
    return 1 if failures else 0


if __name__ == "__main__":
    raise SystemExit(main())
