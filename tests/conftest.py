"""Shared fixtures: real files in tmp folders, a real (tiny) ONNX model, real SQLite."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

import cv2
import numpy as np
import pytest

from worker.config import Config, load_config
from worker.imaging.preprocess import PreprocessSettings
from worker.scoring.model_metadata import INPUT_NAME, OUTPUT_NAME, ModelMetadata, OperatingPoint

if TYPE_CHECKING:
    from worker.app import Worker

REPO = Path(__file__).resolve().parents[1]


def run_screen(*args: str, config: Path | None = None, cwd: Path = REPO,
               env: dict[str, str] | None = None,
               timeout: float = 180) -> subprocess.CompletedProcess[str]:
    """`screen ARGS` as a real process (`python -m worker`), with `--config CONFIG` first when
    given; run from the repository so that this checkout's code is the one tested."""
    prefix = ["--config", str(config)] if config is not None else []
    return subprocess.run([sys.executable, "-m", "worker", *prefix, *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=timeout)


def screen_env(**extra: str) -> dict[str, str]:
    """The environment of a `screen` process under test: unbuffered, and with no fault point
    (worker/faults.py) inherited from the test run, only one that `extra` names."""
    env = {k: v for k, v in os.environ.items() if k != "MAMMO_SCREEN_CRASH_AT"}
    return {**env, "PYTHONUNBUFFERED": "1", **extra}


def run_with_faults(config: Path, *args: str, crash_at: str | None = None, timeout: float = 300
                    ) -> subprocess.CompletedProcess[str]:
    """`screen --config CONFIG ARGS` as a real process, made to crash at `crash_at` when given
    (``POINT`` or ``POINT:N``, see worker/faults.py)."""
    env = screen_env(MAMMO_SCREEN_CRASH_AT=crash_at) if crash_at else screen_env()
    return run_screen(*args, config=config, env=env, timeout=timeout)


def require_programs(package: str, *programs: str) -> None:
    """For a test module that talks to real Debian programs (a DICOM client, a browser):
    `.ci/run` installs them, so under CI a missing one fails the run; elsewhere the module is
    skipped with the package to install, so the README's test command passes on a machine that
    has only Python."""
    missing = [p for p in programs if shutil.which(p) is None]
    if not missing:
        return
    why = f"{', '.join(missing)} not found: apt-get install {package}"
    if os.environ.get("CI"):
        raise RuntimeError(why)
    pytest.skip(why, allow_module_level=True)
DATA = Path(os.environ.get("MAMMO_DATA", REPO.parent / "shared" / "data" / "mammo-3383"))
# The default config's model (see models/MODEL_CARD.md).
SHIPPED_MODEL = REPO / "models" / "mammo-lite0-top-384.onnx"


def make_mean_model(
    path: Path,
    size: int = 32,
    threshold: float = 0.5,
    version: str = "test-mean-1",
    aggregation: dict[str, str] | None = None,
    operating_points: dict[str, float] | None = None,  # name -> threshold; first is default
    batch: int | str = "N",  # an int fixes the batch dimension (ONNX Runtime refuses others)
) -> Path:
    """A real ONNX graph: score = sigmoid(8 * (mean pixel - 0.25)). Brighter tissue, higher score.

    Built with onnx.helper so the worker's tests need no TensorFlow.
    """
    import onnx
    from onnx import TensorProto, helper

    inp = helper.make_tensor_value_info(INPUT_NAME, TensorProto.FLOAT, [batch, size, size, 1])
    out = helper.make_tensor_value_info(OUTPUT_NAME, TensorProto.FLOAT, [batch, 1])
    nodes = [
        helper.make_node("ReduceMean", [INPUT_NAME, "axes"], ["m"], keepdims=0),
        helper.make_node("Unsqueeze", ["m", "one"], ["m2"]),
        helper.make_node("Sub", ["m2", "b"], ["c"]),
        helper.make_node("Mul", ["c", "a"], ["d"]),
        helper.make_node("Sigmoid", ["d"], [OUTPUT_NAME]),
    ]
    inits = [
        helper.make_tensor("axes", TensorProto.INT64, [3], [1, 2, 3]),
        helper.make_tensor("one", TensorProto.INT64, [1], [1]),
        helper.make_tensor("b", TensorProto.FLOAT, [], [0.25]),
        helper.make_tensor("a", TensorProto.FLOAT, [], [8.0]),
    ]
    graph = helper.make_graph(nodes, "mean_model", [inp], [out], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 8
    meta = ModelMetadata(
        preprocess=PreprocessSettings(size=size),
        threshold=threshold,
        model_version=version,
        threshold_rule="fixed for tests",
        metrics={"auc": 0.5},
        **({"aggregation": aggregation} if aggregation is not None else {}),
        **({"operating_points": {k: OperatingPoint(t, f"test point {k}")
                                 for k, t in operating_points.items()},
            "default_operating_point": next(iter(operating_points))}
           if operating_points else {}),
    )
    for k, v in meta.to_props().items():
        entry = model.metadata_props.add()
        entry.key, entry.value = k, v
    onnx.checker.check_model(model)
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(path))
    return path


def write_mammo_like(
    path: Path,
    size: tuple[int, int] = (96, 80),
    bright: float = 0.6,
    white_background: bool = False,
    dtype: type = np.uint8,
    seed: int = 0,
) -> Path:
    """A synthetic 'breast': an ellipse of tissue on a dark background touching the left side."""
    h, w = size
    rng = np.random.default_rng(seed)
    maxv = 65535 if dtype == np.uint16 else 255
    img = np.zeros((h, w), dtype=np.float64)
    yy, xx = np.mgrid[0:h, 0:w]
    mask = ((xx / (0.6 * w)) ** 2 + ((yy - h / 2) / (0.45 * h)) ** 2) <= 1.0
    img[mask] = bright + rng.normal(0, 0.03, mask.sum())
    img = np.clip(img, 0, 1)
    if white_background:
        img = 1.0 - img
    arr = np.round(img * maxv).astype(dtype)
    path.parent.mkdir(parents=True, exist_ok=True)
    ext = path.suffix.lower() if path.suffix.lower() in {".png", ".jpg", ".tif", ".pgm"} else ".png"
    ok, buf = cv2.imencode(ext, arr)
    if not ok:
        raise RuntimeError(f"could not encode {path}")
    path.write_bytes(buf.tobytes())
    return path


def write_site_config(folder: Path, rest: str, outbox: bool = False) -> Path:
    """`folder`/config.toml for a site whose folders (inbox, processed, quarantine, and the
    outbox when asked) sit in `folder`, made as needed; `rest`: the sections after [paths]."""
    (folder / "inbox").mkdir(parents=True, exist_ok=True)
    config = folder / "config.toml"
    config.write_text(
        "[paths]\ninbox = 'inbox'\nprocessed = 'processed'\nquarantine = 'quarantine'\n"
        + ("outbox = 'outbox'\n" if outbox else "") + "create_missing = true\n" + rest
    )
    return config


@pytest.fixture
def mean_model(tmp_path: Path) -> Path:
    return make_mean_model(tmp_path / "models" / "mean.onnx")


@pytest.fixture
def workdir(tmp_path: Path, mean_model: Path) -> Iterator[Path]:
    """A config folder with its own config.toml pointing at the tiny model."""
    for folder in ("inbox", "processed", "quarantine", "outbox"):
        (tmp_path / folder).mkdir()
    (tmp_path / "config.toml").write_text(
        "[paths]\ninbox = 'inbox'\nprocessed = 'processed'\nquarantine = 'quarantine'\n"
        "outbox = 'outbox'\n[database]\nurl = 'sqlite:///screen.db'\n"
        f"[model]\npath = '{mean_model.relative_to(tmp_path).as_posix()}'\n"
        "[worker]\nsettle_seconds = 0.2\nrescan_seconds = 1.0\nbatch_size = 8\n"
    )
    yield tmp_path


@pytest.fixture
def config(workdir: Path) -> Config:
    return load_config(workdir / "config.toml")


@contextmanager
def watching(worker: Worker) -> Iterator[threading.Thread]:
    """The worker's watch loop, running in a thread and ready; on leaving, stopped, joined
    (the thread is then checked with ``is_alive``) and the worker closed."""
    ready = threading.Event()
    thread = threading.Thread(target=worker.watcher.watch, kwargs={"ready": ready})
    thread.start()
    try:
        assert ready.wait(10), "the watch loop did not start"
        yield thread
    finally:
        worker.watcher.stop()
        thread.join(15)
        worker.close()


def dev_pool_images(n: int, label: str | None = None) -> list[Path]:
    """The first n dev-pool images (sorted, so tests are repeatable)."""
    if not DATA.is_dir():
        pytest.skip(f"dev pool not found at {DATA}")
    labels = [label] if label else ["benign", "malignant"]
    out: list[Path] = []
    for lab in labels:
        out += sorted((DATA / "images" / lab).glob("*.jpg"))[: n // len(labels) or 1]
    return out[:n]


def copy_into(paths: list[Path], folder: Path) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    out = []
    for p in paths:
        dest = folder / p.name
        shutil.copyfile(p, dest)
        out.append(dest)
    return out


@pytest.fixture(scope="session")
def postgres() -> Iterator[object]:
    """A real PostgreSQL server for the session (tests/pg.py); skipped without one."""
    from tests.pg import postgres_server

    yield from postgres_server()


@pytest.fixture
def pg_url(postgres: object) -> str:
    """A fresh, empty PostgreSQL database on the session's server."""
    from tests.pg import PostgresServer

    assert isinstance(postgres, PostgresServer)
    return postgres.new_database()
