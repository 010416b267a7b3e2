"""The harness of ``benchmarks/reliability.py``: a case runs the real ``thinslice`` program in a subprocess, as a
user would, and checks its exit code, its one-line message and the files it must leave as they were.

Case modules (``benchmarks/reliability_*.py``) import from here and define ``cases() -> list[Case]``; the main
script collects them after its own cases, in file-name order, so every group of cases has its own file.
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

THINSLICE = [sys.executable, "-m", "thinslice.cli.main"]


@dataclass
class Outcome:
    rc: int
    err: str
    out: str
    seconds: float

    @property
    def message(self) -> str:
        lines = [line for line in self.err.strip().splitlines() if line.strip()]
        return lines[-1] if lines else ""

    @property
    def clean(self) -> bool:
        """No traceback, at most one error line."""
        return "Traceback" not in self.err and sum("error:" in line for line in self.err.splitlines()) <= 1


def run(*args: object, timeout: float = 300) -> Outcome:
    start = time.perf_counter()
    proc = subprocess.run([*THINSLICE, *map(str, args)], capture_output=True, text=True, timeout=timeout)
    return Outcome(proc.returncode, proc.stderr, proc.stdout, time.perf_counter() - start)


@dataclass
class Case:
    name: str
    command: str
    expected: str
    check: Callable[[], tuple[bool, str]]


def error_case(name: str, args: list[object], expect_text: str, unchanged: list[Path] = ()) -> Case:
    """A case that must end with rc 2, one clean line containing ``expect_text``, and files left as they were."""
    def check() -> tuple[bool, str]:
        before = {p: p.read_bytes() if p.is_file() else None for p in unchanged}
        res = run(*args)
        same = all((p.read_bytes() if p.is_file() else None) == before[p] for p in unchanged)
        ok = res.rc == 2 and res.clean and expect_text in res.message and same
        return ok, f"rc {res.rc}: {res.message[:150]}" + ("" if same else " (FILES CHANGED)")

    return Case(name, "thinslice " + " ".join(_short(a) for a in args), f"rc 2, one line: ...{expect_text}...",
                check)


def ok_case(name: str, args: list[object], expect_text: str = "", expect_file: Path | None = None) -> Case:
    def check() -> tuple[bool, str]:
        res = run(*args)
        ok = res.rc == 0 and res.clean and expect_text in res.err + res.out
        ok = ok and (expect_file is None or expect_file.exists())
        return ok, f"rc {res.rc}: {(res.message or res.out.strip().splitlines()[-1])[:150]}"

    return Case(name, "thinslice " + " ".join(_short(a) for a in args),
                "rc 0" + (f", says ...{expect_text}..." if expect_text else ""), check)


WORK = Path(tempfile.mkdtemp(prefix="thinslice-reliability-"))


def _short(arg: object) -> str:
    return str(arg).replace(str(WORK) + "/", "")
