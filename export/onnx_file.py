"""Writing an ONNX model where a worker may load it, one way for the exporter
(export/onnx_export.py) and the attention output (export/attention.py). A module of its own:
the exporter imports export/attention.py, so living there would close an import circle."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any


def save_atomically(proto: Any, out: Path) -> None:
    """Write the ONNX model ``proto`` to ``out`` in one step (beside it, then renamed): never
    a half-written model where a worker may load it."""
    import onnx

    tmp = out.with_name(out.name + ".tmp")
    onnx.save(proto, tmp)
    os.replace(tmp, out)
