"""The release as a user gets it: the wheel and the sdist build without a warning, the wheel holds every file the
package ships, and installed outside the checkout it runs every shipped method with its shipped weights.

An editable install (what `make` sets up) reads files from the checkout, so a package-data pattern that misses a new
weights file or config folder would pass every other test and ship a broken wheel; this test reads only the wheel.
"""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

import thinslice
from thinslice.infer.upsample import available_methods

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "src" / "thinslice"
pytestmark = pytest.mark.slow


def _clean_env(**extra: str) -> dict[str, str]:
    """The environment without the variables that change what a build prints or what Python imports."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONDONTWRITEBYTECODE")}
    env.update(extra)
    return env


def _shipped_files() -> set[str]:
    """Every file under src/thinslice that git tracks (or would: new untracked files count too)."""
    listed = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard", "src/thinslice"],
                            cwd=ROOT, capture_output=True, text=True)
    if listed.returncode != 0:  # not a git checkout (e.g. an unpacked sdist): every file on disk
        return {str(p.relative_to(ROOT / "src")) for p in PACKAGE.rglob("*") if p.is_file()
                and "__pycache__" not in p.parts}
    return {line[len("src/"):] for line in listed.stdout.splitlines() if line}


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> tuple[Path, Path, str]:
    out = tmp_path_factory.mktemp("dist")
    proc = subprocess.run([sys.executable, "-m", "build", "--no-isolation", "--outdir", str(out), str(ROOT)],
                          capture_output=True, text=True, env=_clean_env(), cwd=out)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-3000:]
    wheels, sdists = list(out.glob("*.whl")), list(out.glob("*.tar.gz"))
    assert len(wheels) == 1 and len(sdists) == 1, sorted(p.name for p in out.iterdir())
    return wheels[0], sdists[0], log


def test_the_build_prints_no_warning(built) -> None:
    _, _, log = built
    warnings = [line for line in log.splitlines() if "warning" in line.lower()]
    assert not warnings, "\n".join(warnings[:20])


def test_the_wheel_holds_every_shipped_file_and_its_metadata(built) -> None:
    wheel, _, _ = built
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
        meta_name = next(n for n in names if n.endswith(".dist-info/METADATA"))
        metadata = archive.read(meta_name).decode()
    missing = sorted(_shipped_files() - names)
    assert not missing, f"files of the package missing from the wheel: {missing}"
    assert f"Version: {thinslice.__version__}" in metadata
    assert "License-Expression: Apache-2.0" in metadata
    for field in ("Classifier: Topic :: Scientific/Engineering :: Medical Science Apps.",
                  "Classifier: Intended Audience :: Science/Research", "Project-URL: Source", "Keywords:"):
        assert field in metadata, field
    assert any(n.endswith("licenses/NOTICE") for n in names), "the NOTICE (data attributions) is not in the wheel"


@pytest.fixture(scope="module")
def installed(built, tmp_path_factory) -> Path:
    """The wheel installed into a folder outside the checkout (its dependencies come from this environment)."""
    wheel, _, _ = built
    target = tmp_path_factory.mktemp("site")
    proc = subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "--no-index", "--quiet",
                           "--target", str(target), str(wheel)], capture_output=True, text=True, env=_clean_env())
    assert proc.returncode == 0, proc.stderr[-2000:]
    return target


def _installed_run(target: Path, args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    script = target / "bin" / "thinslice"
    return subprocess.run([sys.executable, str(script), *args], capture_output=True, text=True, cwd=cwd,
                          env=_clean_env(PYTHONPATH=str(target)), timeout=600)


def test_the_installed_wheel_runs_every_shipped_method(installed, tmp_path) -> None:
    where = subprocess.run([sys.executable, "-c", "import thinslice, sys; print(thinslice.__file__)"],
                           capture_output=True, text=True, cwd=tmp_path, env=_clean_env(PYTHONPATH=str(installed)))
    assert Path(where.stdout.strip()).is_relative_to(installed), where.stdout + where.stderr
    version = _installed_run(installed, ["--version"], tmp_path)
    assert version.returncode == 0 and version.stdout.strip() == f"thinslice {thinslice.__version__}"
    make_input = ("from thinslice.data.phantom import make_chest_phantom; from thinslice.degrade import degrade; "
                  "from thinslice.io import write_volume; "
                  "thin = make_chest_phantom(shape=(24, 48, 48), spacing=(2.0, 2.0, 1.25), seed=2); "
                  "write_volume(degrade(thin, factor=4, profile='gaussian'), 'thick.nii.gz')")
    made = subprocess.run([sys.executable, "-c", make_input], capture_output=True, text=True, cwd=tmp_path,
                          env=_clean_env(PYTHONPATH=str(installed)))
    assert made.returncode == 0, made.stderr[-2000:]
    for method in available_methods():
        out = tmp_path / f"{method}.nii.gz"
        res = _installed_run(installed, ["-q", "upsample", "thick.nii.gz", out.name, "--spacing", "1.25",
                                         "--method", method], tmp_path)
        assert res.returncode == 0, f"{method}: {res.stderr[-1500:]}"
        info = _installed_run(installed, ["info", out.name], tmp_path)
        assert info.returncode == 0 and "1.25" in info.stdout, f"{method}: {info.stdout}{info.stderr}"
