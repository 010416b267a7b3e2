"""The package's structure: no import circle between its modules (module-level and function-level imports alike),
so that data flows one way (io -> degrade/models/diffusion -> checkpoints -> examples/infer -> evaluate -> train ->
cli)."""

from __future__ import annotations

import ast
from pathlib import Path

import thinslice

SRC = Path(thinslice.__file__).resolve().parent


def _module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph(root: Path = SRC) -> dict[str, set[str]]:
    """module -> the thinslice modules it imports anywhere in its text."""
    files = {_module_name(f, root): f for f in root.rglob("*.py")}

    def owner(name: str) -> str | None:
        while name and name not in files:
            name = name.rpartition(".")[0]
        return name or None

    graph: dict[str, set[str]] = {m: set() for m in files}
    for module, path in files.items():
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names = [f"{node.module}.{a.name}" for a in node.names]
            else:
                continue
            graph[module] |= {t for n in names if (t := owner(n)) and t != module}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import circle (its modules in order), or None."""
    state: dict[str, int] = {}
    trail: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        trail.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return trail[trail.index(nxt):] + [nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        state[node] = 2
        trail.pop()
        return None

    for start in sorted(graph):
        if start not in state and (found := visit(start)):
            return found
    return None


def test_the_package_has_no_import_circle() -> None:
    cycle = find_cycle(import_graph())
    assert cycle is None, " -> ".join(cycle or [])


def test_the_circle_check_finds_a_circle(tmp_path) -> None:
    pkg = tmp_path / "thinslice"
    (pkg / "a").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "a" / "__init__.py").write_text("")
    (pkg / "a" / "one.py").write_text("from thinslice.a.two import f\n")
    (pkg / "a" / "two.py").write_text("def f():\n    from thinslice.a import one\n")
    assert find_cycle(import_graph(pkg)) == ["thinslice.a.one", "thinslice.a.two", "thinslice.a.one"]


def test_tests_are_arranged_by_package() -> None:
    """A change's tests are found beside each other: every folder of tests/ is named after a package of thinslice
    (tests/io for thinslice.io, ...); the files at the top are the package-wide checks (structure, docs, release)."""
    tests = Path(__file__).resolve().parent
    folders = {p.name for p in tests.iterdir() if p.is_dir() and not p.name.startswith(("__", "."))}
    packages = {p.name for p in SRC.iterdir() if (p / "__init__.py").is_file()}
    assert folders and folders <= packages, sorted(folders - packages)
    assert all(list(tests.glob(f"{name}/test_*.py")) for name in folders)
