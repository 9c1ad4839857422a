"""Reading a batch's files, in the pipeline's decode threads: no database, no shared state.

A file is read and hashed once, with the stat fingerprint that later says, without reading it
again, whether it is still what was read (:func:`load_file`); its model input is made from
those bytes, or for a large file from the file itself while it is still unchanged
(:func:`preprocess_loaded`).
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from worker.imaging.dicom import DicomPolicy
from worker.imaging.errors import ImageError
from worker.imaging.heatmap_geometry import Frame, preprocess_with_frame
from worker.imaging.preprocess import PreprocessSettings

# What says a file is unchanged since it was read: device, inode, size, mtime, ctime (ns).
Fingerprint = tuple[int, int, int, int, int]

# Files up to this size are held in memory from their hashing to their decoding; larger ones
# (full-size mammograms, 15-50 MB) are hashed as they stream by and read again by the decode
# thread, so that memory is bounded by one full image per decoding thread, not by the batch.
KEEP_BYTES = 4 << 20
_CHUNK = 1 << 20


def fingerprint(st: os.stat_result) -> Fingerprint:
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


def sha256_of(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@dataclass(frozen=True)
class Loaded:
    data: bytes | None  # None: over KEEP_BYTES, read again to be decoded
    sha256: str
    fingerprint: Fingerprint


def load_file(path: Path) -> Loaded | OSError | None:
    """Read and hash one file: its bytes (or only its hash, for a large file), or None when
    it changed while being read (still being written after all), or the OSError that
    stopped the read."""
    try:
        before = os.stat(path)
        if before.st_size <= KEEP_BYTES:
            data: bytes | None = path.read_bytes()
            digest, size = sha256_of(data), len(data)
        else:
            data, (digest, size) = None, stream_sha256(path)
        after = os.stat(path)
    except OSError as exc:
        return exc
    if fingerprint(before) != fingerprint(after) or size != after.st_size:
        return None
    return Loaded(data, digest, fingerprint(after))


def stream_sha256(path: Path) -> tuple[str, int]:
    """(SHA-256, bytes read) of a file, a chunk at a time."""
    h, size = hashlib.sha256(), 0
    with open(path, "rb") as fh:
        while chunk := fh.read(_CHUNK):
            h.update(chunk)
            size += len(chunk)
    return h.hexdigest(), size


def preprocess_loaded(source: bytes | Path, read_as: Fingerprint, settings: PreprocessSettings,
                      policy: DicomPolicy) -> tuple[np.ndarray, Frame]:
    """A decode thread's task: the model input (and its geometry, for the heatmap) from the
    bytes read at receipt, or, for a large file, from the file itself, which must still be
    what was hashed then (`read_as`, its fingerprint at the read)."""
    if isinstance(source, bytes):
        return preprocess_with_frame(source, settings, policy)
    changed = ImageError("file changed after it was received; its new content is taken "
                         "as a new file")
    try:
        out = preprocess_with_frame(source, settings, policy)
        unchanged = fingerprint(os.stat(source)) == read_as
    except OSError as exc:
        raise changed from exc
    if not unchanged:  # the pixels may be the new content's: not this record's to score
        raise changed
    return out


def decode_threads() -> int:
    """Threads that read, hash and preprocess: at least two, so that one batch's decoding
    keeps up with ONNX Runtime on the one before (decoding costs a fraction of inference
    for these models), at most four (ONNX Runtime needs the cores too)."""
    return max(2, min(4, os.cpu_count() or 1))
