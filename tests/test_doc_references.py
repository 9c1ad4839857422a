"""Where the docs and the code say something lives, it lives there: every project path
(``worker/processing/pipeline.py``, ``deploy/...``) and every dotted module
(``worker.imaging.preprocess``) that the README, the documentation site or the code names
exists. Measurement history (bench/README.md, models/EXPERIMENTS.md) may name what has gone."""

from __future__ import annotations

import re

from tests.conftest import REPO

CODE = ("worker", "trainer", "export")
PATH = re.compile(r"(?<![\w./-])((?:worker|trainer|export|deploy|bench|tests|docs)/[\w./-]*\w)")
DOTTED = re.compile(r"(?<![\w./])((?:worker|trainer|export)(?:\.[a-z_][a-z0-9_]*)+)")


def _modules() -> set[str]:
    found = set()
    for package in CODE:
        for path in (REPO / package).rglob("*.py"):
            parts = list(path.relative_to(REPO).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            found.add(".".join(parts))
    return found


def _readers_texts() -> dict[str, str]:
    pages = [REPO / "README.md", *sorted((REPO / "docs").rglob("*.md")),
             REPO / "models" / "MODEL_CARD.md"]
    code = [p for package in CODE for p in sorted((REPO / package).rglob("*.py"))]
    return {str(p.relative_to(REPO)): p.read_text() for p in [*pages, *code]}


def broken_references(texts: dict[str, str]) -> list[str]:
    """``file: reference`` for each path that does not exist and, in Markdown, each dotted
    name whose module does not (in code a dotted name may be an attribute, so only paths)."""
    modules = _modules()
    broken = []
    for where, text in texts.items():
        for match in PATH.finditer(text):
            ref = match.group(1).rstrip(".")
            if not (REPO / ref).exists():
                broken.append(f"{where}: {ref}")
        if not where.endswith(".md"):
            continue
        for match in DOTTED.finditer(text):
            parts = match.group(1).split(".")
            if not any(".".join(parts[:n]) in modules for n in range(len(parts), 1, -1)):
                broken.append(f"{where}: {match.group(1)}")
    return broken


def test_every_path_and_module_the_docs_and_code_name_exists() -> None:
    assert broken_references(_readers_texts()) == []


def test_the_check_sees_a_module_that_moved() -> None:
    texts = {"docs/x.md": "see `worker.pipeline` and worker/store.py",
             "worker/x.py": "# as worker/imaging/preprocess.py does; worker.batch_size"}
    assert broken_references(texts) == ["docs/x.md: worker/store.py", "docs/x.md: worker.pipeline"]
