"""The documentation a user reads: no development bookkeeping in it, it builds, and it covers the whole CLI.

Three checks: (1) README, docs, sources and the weights manifest name designs by topic or date, never by a
numbered work round or an issue number (those mean nothing to a reader outside the project); (2) the mkdocs site
builds with ``--strict`` (no broken link, no page left out of the navigation, every API page renders from the
docstrings); (3) every sub-command and every ``--option`` of the real argparse parser has an entry in the user
guide, so an option added to the program without documentation fails here.
"""

from __future__ import annotations

import argparse
import importlib.util
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
GUIDE = ROOT / "docs" / "guide"

# Development labels: "session 8", "session-5", "sessions 4-5", "issue 18", "issue #4", "round 3", "work round",
# and a bare "#21" in prose. Not flagged: "series #1" (a SeriesNumber in a message), CSS colours ("color:#777",
# "#b3261e"), Markdown headings ("## Usage") and anchors ("page.md#recipe").
LABELS = [
    re.compile(r"(?<![a-z])sessions?[-_ ]?\d+", re.IGNORECASE),
    re.compile(r"\bissues?[-_ ]?#?\d+", re.IGNORECASE),
    re.compile(r"\b(?:work[- ])?rounds? \d+\b", re.IGNORECASE),
    re.compile(r"\bwork[- ]rounds?\b", re.IGNORECASE),
    re.compile(r"(?<![\w&:;{}#/.\"'-])(?<!series )#\d{1,3}\b(?![\w-])", re.IGNORECASE),
]
# docs/reliability.md below this marker is written by benchmarks/reliability.py (the observed messages).
GENERATED_MARKER = "<!-- table -->"


def _scanned_files() -> list[Path]:
    files = [ROOT / "README.md", ROOT / "src" / "thinslice" / "weights" / "manifest.json"]
    files += sorted((ROOT / "docs").rglob("*.md"))
    files += sorted((ROOT / "src").rglob("*.py"))
    return [f for f in files if f.is_file()]


def _lines_to_scan(path: Path) -> list[tuple[int, str]]:
    lines = path.read_text(encoding="utf-8").splitlines()
    if path.name == "reliability.md" and GENERATED_MARKER in lines:
        lines = lines[: lines.index(GENERATED_MARKER)]
    return list(enumerate(lines, start=1))


def label_hits(text: str) -> list[str]:
    """The development labels in one line of text."""
    return [m.group(0) for pattern in LABELS for m in pattern.finditer(text)]


@pytest.mark.parametrize("line, expected", [
    ("planes, session 5", ["session 5"]),
    ("the session-8 weights", ["session-8"]),
    ("runs/planes_x4_session5.safetensors", ["session5"]),
    ("(sessions 4-5)", ["sessions 4"]),
    ("geometry is right (issue 18)", ["issue 18"]),
    ("the goal of issue #4 is met", ["issue #4", "#4"]),
    ("Real archives (#18): tilted grids", ["#18"]),
    ("work round 3 measured", ["work round 3", "work round"]),
    ("rc 0: thinslice upsample: series #1: 2 coronal image(s)", []),
    ("body{color:#222} .bad{color:#b3261e}", []),
    ("## Recipe: 2-core CPU, 90 minutes", []),
    ("see docs/design/planes.md#recipe-2-core-cpu-90-minutes", []),
    ("padding values such as -2048/-3024 HU", []),
    ("a Ray session (ray.init) starts one", []),
])
def test_label_patterns(line: str, expected: list[str]) -> None:
    """The patterns catch the labels the documents used to carry and leave HU values, colours and anchors alone."""
    assert label_hits(line) == expected


def test_no_work_round_or_issue_labels() -> None:
    """Designs are named by topic or date (e.g. "the clinical retrain (2026-12-06)"), never by work round or issue."""
    found = []
    for path in _scanned_files():
        for number, line in _lines_to_scan(path):
            for hit in label_hits(line):
                found.append(f"{path.relative_to(ROOT)}:{number}: {hit!r} in {line.strip()[:100]!r}")
    assert not found, "development labels (name the design by topic or date instead):\n" + "\n".join(found)


@pytest.mark.slow
def test_mkdocs_build_strict(tmp_path: Path) -> None:
    """The user guide, design notes, model cards and API reference build without a warning."""
    if importlib.util.find_spec("mkdocs") is None or importlib.util.find_spec("mkdocstrings") is None:
        pytest.skip("mkdocs/mkdocstrings not installed: pip install -e '.[docs]'")
    done = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path / "site"),
                           "--config-file", str(ROOT / "mkdocs.yml")], cwd=ROOT, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-4000:]
    assert (tmp_path / "site" / "index.html").is_file()
    assert (tmp_path / "site" / "api" / "index.html").is_file()


def _commands_and_options() -> list[tuple[str, str]]:
    """(sub-command, option string) for every option of every sub-command; ("", name) for the sub-commands."""
    from thinslice.cli.main import build_parser

    parser = build_parser()
    found = [("", s) for a in parser._actions for s in a.option_strings if s.startswith("--") and s != "--help"]
    for action in parser._actions:
        if not isinstance(action, argparse._SubParsersAction):
            continue
        for name, sub in action.choices.items():
            found.append(("", name))
            found += [(name, s) for a in sub._actions for s in a.option_strings if s.startswith("--") and s != "--help"]
    return found


def test_every_command_and_option_has_a_guide_entry() -> None:
    """Each sub-command appears in the user guide (docs/guide/*.md) as ``thinslice NAME``, and each of its --options
    on a guide page that names that command; read from the parser the program builds, so that an option added
    later without documentation fails here."""
    pages = {p.name: p.read_text(encoding="utf-8") for p in sorted(GUIDE.glob("*.md"))}
    assert pages, f"no guide pages in {GUIDE}"
    everything = "\n".join(pages.values())
    missing = []
    for command, option in _commands_and_options():
        if command == "":
            names_it = re.search(rf"thinslice (?:-\w+ )?{re.escape(option)}(?![\w-])", everything)
            if not names_it and not re.search(rf"`{re.escape(option)}`", everything):
                missing.append(option)
            continue
        about = [t for t in pages.values() if re.search(rf"thinslice {re.escape(command)}(?![\w-])", t)]
        if not any(re.search(rf"(?<![\w-]){re.escape(option)}(?![\w-])", t) for t in about):
            missing.append(f"thinslice {command} {option}")
    assert not missing, "not in docs/guide/*.md (on a page about the command): " + ", ".join(missing)
