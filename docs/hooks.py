"""MkDocs hooks: the references that are generated, so that they cannot drift.

- The configuration reference: every key of `worker.config.SCHEMA` (type, default; gathered
  from the `setting(...)` fields of `Config`) with its description taken from its comment in
  the shipped `config.toml`.
- The CLI reference: mkdocs-click reads the `screen` group's commands; those from the
  `mammo_screen.commands` entry points are loaded first so that it sees them.
- The model card: `models/MODEL_CARD.md` and its pictures, as a page.

tests/test_docs.py imports this file to check that nothing is undocumented.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
PLACEHOLDER = "<!-- config-reference -->"
MODEL_CARD = REPO / "models" / "MODEL_CARD.md"

_KEY_LINE = re.compile(r"^([A-Za-z_][A-Za-z0-9_]*)\s*=")
_SECTION_LINE = re.compile(r"^\[([A-Za-z_][A-Za-z0-9_]*)\]\s*$")


def commented_keys(config_toml: Path = REPO / "config.toml") -> dict[str, str]:
    """"section.key" -> the comment above it in config.toml. A key right after another with no
    comment of its own shares that key's comment when it names it (`backoff_max_seconds`)."""
    found: dict[str, str] = {}
    section, comment, previous = "", [], ""
    for raw in config_toml.read_text().splitlines():
        line = raw.strip()
        if line.startswith("#"):
            comment.append(line.lstrip("#").strip())
            previous = ""
        elif match := _SECTION_LINE.match(line):
            section, comment, previous = match.group(1), [], ""
        elif (match := _KEY_LINE.match(line)) and section:
            key = match.group(1)
            # Without a comment of its own, a key shares the one above only if that names it.
            text = " ".join(comment) or (previous if re.search(rf"\b{key}\b", previous) else "")
            found[f"{section}.{key}"] = text
            comment, previous = [], text
        elif not line:
            previous = ""
    return found


def _toml(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_toml(v) for v in value) + "]"
    if isinstance(value, str):
        return json.dumps(value)
    return repr(value)


def _escape(text: str) -> str:
    """Comments quote regular expressions and TOML: keep them literal in Markdown (code spans
    as they are)."""
    parts = re.split(r"(`[^`]*`)", text)
    for i in range(0, len(parts), 2):
        plain = parts[i].replace("&", "&amp;").replace("<", "&lt;")
        parts[i] = re.sub(r"([\\*_\[\]])", r"\\\1", plain)
    return "".join(parts)


def config_reference() -> str:
    """The Markdown list of every config key, section by section, in SCHEMA's order."""
    from worker.config import SCHEMA

    described = commented_keys()
    lines: list[str] = []
    for section, keys in SCHEMA.items():
        lines += [f"## [{section}]", ""]
        for key, (kind, default) in keys.items():
            text = described.get(f"{section}.{key}", "")
            lines.append(f"- **`{key}`** ({kind}; default `{_toml(default)}`): {_escape(text)}")
        lines.append("")
    return "\n".join(lines)


def on_config(config: Any) -> Any:
    from worker.cli import cli

    cli.load_all()  # mkdocs-click lists `cli.commands`
    return config


def on_files(files: Any, config: Any) -> Any:
    from mkdocs.structure.files import File

    files.append(File.generated(config, "model-card.md", abs_src_path=str(MODEL_CARD)))
    for picture in re.findall(r"\]\(([^)/]+\.png)\)", MODEL_CARD.read_text()):
        files.append(File.generated(config, picture, abs_src_path=str(MODEL_CARD.parent / picture)))
    return files


def on_page_markdown(markdown: str, page: Any, config: Any, files: Any) -> str:
    if PLACEHOLDER in markdown:
        return markdown.replace(PLACEHOLDER, config_reference())
    return markdown
