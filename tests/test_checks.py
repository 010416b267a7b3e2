"""The layer contracts of pyproject.toml ([tool.importlinter]) hold, and they do catch an import that climbs a layer
or crosses a forbidden arrow (so that a passing check means something)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "pyproject.toml"
_RUN = ("import sys; from importlinter.cli import lint_imports; "
        "sys.exit(lint_imports(config_filename=sys.argv[1], no_cache=True, no_logo=True))")


def lint_imports(src: Path, cwd: Path) -> subprocess.CompletedProcess[str]:
    """``lint-imports`` with this checkout's contracts, over the ``thinslice`` package found in ``src``."""
    env = {**os.environ, "PYTHONPATH": str(src), "COLUMNS": "300"}  # one line per contract in the report
    return subprocess.run([sys.executable, "-c", _RUN, str(CONFIG)], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=120)


def test_the_layer_contracts_hold() -> None:
    result = lint_imports(ROOT / "src", ROOT)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "0 broken" in result.stdout


def test_the_contracts_catch_an_import_from_a_higher_layer(tmp_path: Path) -> None:
    package = tmp_path / "src" / "thinslice"
    shutil.copytree(ROOT / "src" / "thinslice", package, ignore=shutil.ignore_patterns("__pycache__", "weights"))
    volume = package / "io" / "volume.py"
    volume.write_text(volume.read_text(encoding="utf-8") + "\nfrom thinslice.degrade import grid  # noqa\n",
                      encoding="utf-8")
    result = lint_imports(tmp_path / "src", tmp_path)
    assert result.returncode != 0, result.stdout
    broken = [line for line in result.stdout.splitlines() if line.endswith("BROKEN")]
    assert any(line.startswith("layers:") for line in broken), result.stdout
    assert "volumes know nothing of slices' physics BROKEN" in broken, result.stdout
    assert "thinslice.io.volume -> thinslice.degrade.grid" in result.stdout
