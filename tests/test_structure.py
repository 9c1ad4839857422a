"""The shape of the code, held: worker/ imports nothing from trainer/ or export/, no import
circle anywhere, worker/'s wings import only the wings below them (worker/__init__.py), and
no file or function outgrows what a reader takes in at once. Imports inside functions count."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from tests.conftest import REPO

PACKAGES = ("worker", "trainer", "export")
MAX_FILE_LINES = 450
MAX_FUNCTION_LINES = 80

# What each wing of worker/ may import besides itself and the base modules (worker/__init__.py).
WINGS: dict[str, set[str]] = {
    "records": set(),
    "imaging": set(),
    "scoring": {"imaging", "records"},
    "results": {"scoring", "imaging", "records"},
    "audit": {"results", "scoring", "imaging", "records"},
    "processing": {"results", "scoring", "imaging", "records"},
    "intake": {"processing", "results", "scoring", "imaging", "records"},
}
BASE = {"worker.config", "worker.logs", "worker.faults", "worker.threads"}  # usable by every wing
TOP = ("worker.app", "worker.cli", "worker.__main__")  # command line and API: no wing imports them


def _modules() -> dict[str, Path]:
    found = {}
    for package in PACKAGES:
        for path in sorted((REPO / package).rglob("*.py")):
            parts = list(path.relative_to(REPO).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            found[".".join(parts)] = path
    return found


MODULES = _modules()
TREES = {name: ast.parse(path.read_text(), str(path)) for name, path in MODULES.items()}


def _imports(name: str) -> set[str]:
    """The project modules ``name`` imports, at module level or inside functions (a name
    imported from a package counts as its module when it is one)."""
    package = name if MODULES[name].name == "__init__.py" else name.rpartition(".")[0]
    targets: set[str] = set()
    for node in ast.walk(TREES[name]):
        if isinstance(node, ast.Import):
            targets |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*parts, base] if base else parts)
            targets |= {base} | {f"{base}.{alias.name}" for alias in node.names}
    found = set()
    for target in targets:
        while target and target not in MODULES:
            target = target.rpartition(".")[0]
        if target and target != name:
            found.add(target)
    return found


GRAPH = {name: _imports(name) for name in MODULES}


def _cycles() -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(GRAPH[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(GRAPH):
        if v not in index:
            visit(v)
    return found


def _on_top(name: str) -> bool:
    return any(name == top or name.startswith(f"{top}.") for top in TOP)


def _wing(name: str) -> str | None:
    parts = name.split(".")
    return parts[1] if parts[0] == "worker" and len(parts) > 2 and parts[1] in WINGS else None


def test_worker_imports_nothing_from_trainer_or_export() -> None:
    offenders = {name: sorted(t for t in targets if t.split(".")[0] in {"trainer", "export"})
                 for name, targets in GRAPH.items() if name.split(".")[0] == "worker"}
    assert {k: v for k, v in offenders.items() if v} == {}


def test_no_import_circle() -> None:
    assert _cycles() == []


def test_each_wing_imports_only_the_wings_below_it() -> None:
    assert {_wing(name) for name in MODULES} - {None} == set(WINGS), "a wing without its rule"
    wrong = []
    for name, targets in GRAPH.items():
        wing = _wing(name)
        for target in sorted(targets):
            other = _wing(target)
            if wing is not None and _on_top(target):
                wrong.append(f"{name} -> {target} (the command line and the app are on top)")
            elif wing is not None and other not in (None, wing) and other not in WINGS[wing]:
                wrong.append(f"{name} -> {target} ({wing} may not import {other})")
            elif name in BASE and (other is not None or _on_top(target)):
                wrong.append(f"{name} -> {target} (a base module imports no wing)")
    assert wrong == []


def test_the_layering_check_sees_a_wrong_arrow() -> None:
    """The rules above catch an arrow upward (records importing the audit) and a circle."""
    saved = {k: set(v) for k, v in GRAPH.items()}
    try:
        GRAPH["worker.records.store"].add("worker.audit.report")
        with pytest.raises(AssertionError, match="records may not import audit"):
            test_each_wing_imports_only_the_wings_below_it()
        GRAPH["worker.imaging.errors"].add("worker.imaging.preprocess")
        assert any("worker.imaging.errors" in c for c in _cycles())
    finally:
        GRAPH.clear()
        GRAPH.update(saved)


def test_every_wing_says_what_it_owns_and_may_import() -> None:
    for wing in WINGS:
        doc = ast.get_docstring(TREES[f"worker.{wing}"]) or ""
        assert len(doc.split()) >= 30, f"worker/{wing}/__init__.py needs its paragraph"


def test_no_file_or_function_too_long_to_read() -> None:
    long_files = {str(path.relative_to(REPO)): n for path in MODULES.values()
                  if (n := len(path.read_text().splitlines())) > MAX_FILE_LINES}
    long_functions = {
        f"{MODULES[name].relative_to(REPO)}:{node.name}": node.end_lineno - node.lineno + 1
        for name, tree in TREES.items() for node in ast.walk(tree)
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef)
        and node.end_lineno - node.lineno + 1 > MAX_FUNCTION_LINES
    }
    assert long_files == {}
    assert long_functions == {}
