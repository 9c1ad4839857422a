"""Load an exported ONNX model and score preprocessed images with ONNX Runtime."""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from worker.scoring.model_file import ModelLoadError, check_model_file
from worker.scoring.model_metadata import ATTENTION_NAME, ModelMetadata, ModelMetadataError
from worker.threads import run_in_thread

if TYPE_CHECKING:
    from worker.config import Config

log = logging.getLogger("mammo_screen")


def call_size(images: int, images_per_call: int) -> int:
    """Images per ONNX Runtime call when ``images`` are scored together with a per-call limit
    of ``images_per_call`` (0: none)."""
    return min(images_per_call or images, images)


def threads_per_stream(streams: int) -> int:
    """ONNX Runtime intra-op threads for each of ``streams`` calls made at once: the cores
    shared between them."""
    return max(1, (os.cpu_count() or 1) // streams)


def load_scorer(config: Config) -> Future[Scorer]:
    """Start loading the config's model (importing ONNX Runtime, building its session, one
    warm-up call) in a thread, so that a starting worker imports and opens the rest
    meanwhile; the future raises what :class:`Scorer` raises."""
    return run_in_thread("model-load", _load_and_warm_up, config)


def _load_and_warm_up(config: Config) -> Scorer:
    scorer = Scorer.for_config(config)
    scorer.warm_up(config.batch_size)
    return scorer


class Scorer:
    """An ONNX Runtime session plus the metadata that says how to feed it."""

    @classmethod
    def for_config(cls, config: Config) -> Scorer:
        """The scorer a worker with this config runs."""
        def site_point(metadata: ModelMetadata, name: str) -> ModelMetadata:
            # Imported here: it reads the database, which scoring alone does not need.
            from worker.scoring.site_points import with_site_point

            return with_site_point(config, metadata, name)

        return cls(config.model_path, config.model_sha256, config.model_threads,
                   config.model_operating_point, config.model_images_per_call,
                   config.model_streams, site_point)

    def __init__(self, path: str | Path, expected_sha256: str = "", threads: int = 0,
                 operating_point: str = "", images_per_call: int = 0, streams: int = 1,
                 site_point: Callable[[ModelMetadata, str], ModelMetadata] | None = None
                 ) -> None:
        self.path = Path(path)
        # Calls the caller makes at once (ONNX Runtime sessions are safe to share): with
        # several, each call gets its share of the cores instead of all of them.
        self.streams = streams
        # At most this many images per ONNX Runtime call (0: no limit). A large network's
        # activations grow with the batch while its speed does not (bench/README.md).
        self.images_per_call = images_per_call
        self._warm_call_sizes: set[int] = set()  # the call sizes warm_up has run
        check_model_file(self.path, expected_sha256)
        # Imported here, not at the top: `screen --help` and the commands that only read the
        # database need no ONNX Runtime (its import is slow and large: bench/README.md).
        import onnxruntime as ort

        options = ort.SessionOptions()
        if threads > 0:
            options.intra_op_num_threads = threads
        elif streams > 1:
            options.intra_op_num_threads = threads_per_stream(streams)
        # ONNX Runtime's threads sleep between calls instead of spinning: spinning burns the
        # cores that decoding and the database need between batches (bench/README.md).
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        # No memory pattern: ONNX Runtime would otherwise keep one block sized for every
        # activation of a call alive between calls; without it memory falls and speed does not
        # (bench/README.md). The arena stays on: it is what reuses the freed buffers.
        options.enable_mem_pattern = False
        try:
            self.session = ort.InferenceSession(
                str(self.path), options, providers=["CPUExecutionProvider"]
            )
        except Exception as exc:  # ORT raises its own exception types for bad files
            raise ModelLoadError(
                f"cannot load model {self.path}: {str(exc).splitlines()[0]}"
            ) from exc
        props = self.session.get_modelmeta().custom_metadata_map
        try:
            self.metadata = ModelMetadata.from_props(props)
            if operating_point not in ("", *self.metadata.points) and site_point is not None:
                # Not one of the model's points: a site point (`screen calibrate`) of its
                # version, from the database, or an error saying why not.
                self.metadata = site_point(self.metadata, operating_point)
            # The threshold labels are called at: the configured point, else the model's default.
            self.operating_point, point = self.metadata.operating_point(operating_point)
        except ModelMetadataError as exc:
            raise ModelLoadError(f"{self.path}: {exc}") from exc
        self.threshold = point.threshold
        inputs = self.session.get_inputs()
        if len(inputs) != 1:
            raise ModelLoadError(f"{self.path}: expected one input, found {len(inputs)}")
        self.input_name = inputs[0].name
        outputs = [o.name for o in self.session.get_outputs()]
        self.score_name = outputs[0]
        # Models exported before export/attention.py have no attention output: no heatmaps.
        self.has_attention = ATTENTION_NAME in outputs[1:]
        size = self.metadata.preprocess.size
        shape = inputs[0].shape
        if len(shape) != 4 or shape[1:] not in ([size, size, 1], (size, size, 1)):
            raise ModelLoadError(
                f"{self.path}: input shape {shape} does not match preprocessing size {size}"
            )

    @property
    def version(self) -> str:
        return self.metadata.model_version

    def label_for(self, score: float) -> str:
        benign, malignant = self.metadata.class_names
        return malignant if score >= self.threshold else benign

    def warm_up(self, batch: int) -> None:
        """One call on blank images, of the size a batch of ``batch`` images is scored in:
        ONNX Runtime's first call of a shape costs about twice a steady one (its
        allocations), and a worker would otherwise pay it on its first file. A starting
        worker runs it in the model's loading thread (:func:`load_scorer`), the pipeline
        again in its scoring thread, where it is free once done: once per call size."""
        n = call_size(max(1, batch), self.images_per_call)
        if n in self._warm_call_sizes:
            return
        size = self.metadata.preprocess.size
        blank = np.zeros((size, size, 1), np.float32)
        try:
            self.score_and_attend([blank] * n)
        except Exception as exc:  # a real batch will meet (and report) the same failure
            log.warning("model warm-up failed: %s", str(exc).splitlines()[0])
            return
        self._warm_call_sizes.add(n)

    def score_batch(self, images: Sequence[np.ndarray]) -> np.ndarray:
        """Scores (probability of the positive class) for preprocessed (H, W, 1) arrays."""
        return self.score_and_attend(images, attention=False)[0]

    def score_and_attend(self, images: Sequence[np.ndarray], attention: bool = True
                         ) -> tuple[np.ndarray, np.ndarray | None]:
        """Scores and, when the model has the output and ``attention``, its attention maps
        (N, H, W), each summing to 1. ONNX Runtime runs only the nodes the asked outputs need,
        so the scores alone cost what they did before the output existed."""
        attention = attention and self.has_attention
        if not images:
            return np.zeros((0,), dtype=np.float32), None
        step = call_size(len(images), self.images_per_call)
        if len(images) > step:
            parts = [self.score_and_attend(images[i:i + step], attention)
                     for i in range(0, len(images), step)]
            maps = np.concatenate([m for _, m in parts]) if attention else None
            return np.concatenate([s for s, _ in parts]), maps
        batch = np.stack(images).astype(np.float32, copy=False)
        names = [self.score_name, ATTENTION_NAME] if attention else [self.score_name]
        out = self.session.run(names, {self.input_name: batch})
        scores = np.asarray(out[0], dtype=np.float32).reshape(len(images))
        return scores, (np.asarray(out[1], dtype=np.float32) if attention else None)
