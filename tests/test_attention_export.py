"""export/attention.py: the attention output added to real ONNX graphs, run by ONNX Runtime."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from export.attention import (
    AttentionExportError,
    add_attention_output,
    add_attention_to_file,
    probe_images,
    remove_attention_output,
)
from tests.attention_model import make_attention_model
from tests.conftest import REPO, SHIPPED_MODEL, dev_pool_images, make_mean_model
from worker.imaging.preprocess import preprocess_file
from worker.scoring.model_metadata import ATTENTION_NAME, INPUT_NAME, OUTPUT_NAME
from worker.scoring.scorer import Scorer


def _run(path: Path, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    score, attention = session.run([OUTPUT_NAME, ATTENTION_NAME], {INPUT_NAME: x})
    return score, attention


def _blobs(size: int, spots: list[tuple[int, int]]) -> np.ndarray:
    """One dim picture per (row, col) spot, bright there: (N, size, size, 1)."""
    out = np.full((len(spots), size, size, 1), 0.1, np.float32)
    for i, (r, c) in enumerate(spots):
        out[i, r:r + 8, c:c + 8] = 1.0
    return out


def test_the_attention_output_points_where_the_head_looks_and_keeps_the_score(
        tmp_path: Path) -> None:
    src = make_attention_model(tmp_path / "m.onnx")
    out = tmp_path / "with.onnx"
    assert add_attention_to_file(src, out) is True
    x = _blobs(48, [(0, 40), (24, 8), (40, 16)])
    before = ort.InferenceSession(str(src)).run([OUTPUT_NAME], {INPUT_NAME: x})[0]
    score, attention = _run(out, x)
    assert score.tobytes() == before.tobytes()
    assert attention.shape == (3, 6, 6)
    assert np.allclose(attention.sum(axis=(1, 2)), 1.0, atol=1e-5)
    # The weight goes to the bright block: rows and columns in the picture's own order, the
    # mirror pass's map flipped back (unflipped, the mean would put half of it at column 0).
    peaks = [np.unravel_index(np.argmax(a), a.shape) for a in attention]
    assert peaks == [(0, 5), (3, 1), (5, 2)]
    assert attention[0, 0, 5] > 0.9  # both passes agree on the place
    # A mirrored picture gets the mirrored map.
    _, mirrored = _run(out, np.ascontiguousarray(x[:, :, ::-1]))
    assert np.allclose(mirrored, attention[:, :, ::-1], atol=1e-6)
    # Metadata (model version included) kept; a second apply changes nothing.
    assert {p.key: p.value for p in onnx.load(str(out)).metadata_props} == {
        p.key: p.value for p in onnx.load(str(src)).metadata_props}
    data = out.read_bytes()
    assert add_attention_to_file(out) is False and out.read_bytes() == data
    # Removing it gives back the graph as it was.
    model = onnx.load(str(out))
    assert remove_attention_output(model) is True
    assert model.SerializeToString() == onnx.load(str(src)).SerializeToString()


def test_a_model_without_the_mirror_pass(tmp_path: Path) -> None:
    src = make_attention_model(tmp_path / "m.onnx", mirror=False)
    add_attention_to_file(src)
    _, attention = _run(src, _blobs(48, [(16, 40)]))
    assert attention.shape == (1, 6, 6)
    assert np.unravel_index(np.argmax(attention[0]), (6, 6)) == (2, 5)


def test_a_model_without_an_attention_head_is_left_alone_or_refused(tmp_path: Path) -> None:
    mean = make_mean_model(tmp_path / "mean.onnx")
    model = onnx.load(str(mean))
    assert add_attention_output(model, required=False) is False
    with pytest.raises(AttentionExportError, match="no attention head"):
        add_attention_output(model)
    cli = [sys.executable, "-m", "export.attention"]
    proc = subprocess.run([*cli, str(mean)], cwd=REPO, capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 1 and "no attention head" in proc.stderr
    assert "Traceback" not in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
    bad = tmp_path / "notes.onnx"
    bad.write_text("not a model")
    proc = subprocess.run([*cli, str(bad)], cwd=REPO, capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 1 and "not an ONNX model" in proc.stderr


def test_the_shipped_model_with_the_output_scores_bit_identically(tmp_path: Path) -> None:
    """On the real graph: the softmax found, the map 12 x 12, the scores unchanged, and the
    worker's Scorer sees the output (and still scores a model without it)."""
    plain = tmp_path / "plain.onnx"
    model = onnx.load(str(SHIPPED_MODEL))
    remove_attention_output(model)
    onnx.save(model, str(plain))  # the shipped graph as it was exported, score only
    out = tmp_path / "with.onnx"
    add_attention_to_file(plain, out)
    without, with_ = Scorer(plain), Scorer(out)
    assert not without.has_attention and with_.has_attention
    assert with_.version == without.version
    try:
        x = [preprocess_file(p, with_.metadata.preprocess) for p in dev_pool_images(4)]
    except pytest.skip.Exception:
        x = list(probe_images(384, 4))
    scores, maps = with_.score_and_attend(x)
    assert scores.tobytes() == without.score_batch(x).tobytes()
    assert without.score_and_attend(x)[1] is None
    assert maps is not None and maps.shape == (len(x), 12, 12)
    assert np.allclose(maps.sum(axis=(1, 2)), 1.0, atol=1e-4)
    _, mirrored = with_.score_and_attend([np.ascontiguousarray(a[:, ::-1]) for a in x])
    assert np.allclose(mirrored, maps[:, :, ::-1], atol=1e-6)
