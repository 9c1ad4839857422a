"""The model file a worker is told to serve: there, and the one its config names.

Standard library only: the CLI lists `ModelLoadError` among an operator's mistakes without
importing the scorer, whose NumPy and OpenCV (~0.3 s) a starting worker's first look at its
inbox should not wait for.
"""

from __future__ import annotations

import hashlib
from pathlib import Path


class ModelLoadError(RuntimeError):
    """The configured model cannot be used; the message is one line for the operator."""


def file_sha256(path: Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def check_model_file(path: Path, expected_sha256: str = "") -> None:
    """Raise ModelLoadError unless `path` is a file, with `expected_sha256` when one is given."""
    if not path.is_file():
        raise ModelLoadError(f"model file not found: {path}")
    if expected_sha256:
        actual = file_sha256(path)
        if actual != expected_sha256.lower():
            raise ModelLoadError(
                f"model {path} has SHA-256 {actual}, config expects {expected_sha256}"
            )
