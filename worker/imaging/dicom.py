"""DICOM mammograms: recognise by content, check the header, decode to the displayed grey image.

A DICOM file is recognised by its bytes (the ``DICM`` marker after the 128-byte preamble, or
a bare data set without preamble), never by its name: PACS exports are often extensionless or
named by SOP Instance UID. Everything that can be refused is refused from the header, before a
pixel is decoded, with a reason that becomes the quarantine reason (:class:`ImageError`).

The pixels follow the DICOM greyscale pipeline (PS3.3 C.11, PS3.4 N.2): stored values ->
Modality LUT or rescale -> VOI LUT Sequence, else window centre/width (LINEAR, LINEAR_EXACT,
SIGMOID), else the full range the modality values can take -> one inversion if the image is
MONOCHROME1 or has Presentation LUT Shape INVERSE. Full bit depth is kept (as floats) until
the window. The result is what a reading station displays, as float32 in [0, 1], 0 = dark.

"FOR PROCESSING" images (raw detector data, before the vendor's display processing) are
refused unless the config allows them: the model has only seen processed, for-presentation
pictures, and a raw image looks nothing like one.

Decoders: pydicom itself (uncompressed, Deflate, RLE); ``pylibjpeg`` + ``pylibjpeg-openjpeg``
(MIT) for JPEG 2000 and HTJ2K; ``python-gdcm`` (BSD) for JPEG, JPEG Lossless and JPEG-LS.
``pylibjpeg-libjpeg`` is GPLv3 and deliberately not used.

pydicom is imported when a DICOM file is first read, not with this module: recognising one
(`is_dicom`) needs only its bytes, and a worker that never meets one starts without it.
"""

from __future__ import annotations

import io
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from worker.imaging.errors import ImageError
from worker.imaging.pixel_codecs import stored_pixels
from worker.imaging.reduction import LongSide, Reduction, reduce_to

if TYPE_CHECKING:
    from pydicom.dataset import Dataset
    from pydicom.uid import UID

    from worker.config import Config

# Where the "DICM" magic sits in a DICOM Part 10 file: after a 128-byte preamble.
MAGIC_OFFSET = 128
MAGIC = b"DICM"
# SOP classes whose images are raw detector data (PS3.4 B.5): DX, mammography, intra-oral.
_FOR_PROCESSING_SOP_CLASSES = frozenset(
    {
        "1.2.840.10008.5.1.4.1.1.1.1.1",  # Digital X-Ray Image Storage - For Processing
        "1.2.840.10008.5.1.4.1.1.1.2.1",  # Digital Mammography X-Ray Image - For Processing
        "1.2.840.10008.5.1.4.1.1.1.3.1",  # Digital Intra-Oral X-Ray Image - For Processing
    }
)
# Value representations, to recognise an explicit-VR data set written without preamble.
_VRS = frozenset(
    b"AE AS AT CS DA DS DT FD FL IS LO LT OB OD OF OL OV OW PN SH SL SQ SS ST SV TM UC UI UL "
    b"UN UR US UT UV".split()
)


@dataclass(frozen=True)
class DicomPolicy:
    """What the operator lets through (config [dicom]); the defaults are the safe choice."""

    allowed_modalities: frozenset[str] = field(default_factory=lambda: frozenset({"MG"}))
    allow_for_processing: bool = False

    @classmethod
    def for_config(cls, config: Config) -> DicomPolicy:
        """The policy a config's [dicom] section sets."""
        return cls(frozenset(config.dicom_allowed_modalities), config.dicom_allow_for_processing)


@dataclass(frozen=True)
class DicomImage:
    """A decoded DICOM image: the displayed grey picture and its header (Pixel Data dropped)."""

    pixels: np.ndarray  # float32 (rows, columns) in [0, 1], 0 = dark as displayed
    dataset: Dataset


# ---- recognising DICOM ------------------------------------------------------------------------


def is_dicom(data: bytes) -> bool:
    """True for a DICOM Part 10 file (``DICM`` at byte 128) or a bare data set without preamble.

    A bare data set is recognised by its first element: group 0002 (file meta) or 0008
    (identifying attributes), little endian, with an explicit VR or a plausible implicit
    length. The pixel decoder confirms by reading it.
    """
    if data[MAGIC_OFFSET : MAGIC_OFFSET + 4] == MAGIC:
        return True
    return _is_bare_dataset(data)


def _is_bare_dataset(data: bytes) -> bool:
    if len(data) < 8:
        return False
    (group,) = struct.unpack("<H", data[:2])
    if group not in (0x0002, 0x0008):
        return False
    if data[4:6] in _VRS:
        return True
    (length,) = struct.unpack("<I", data[4:8])  # implicit VR: a 4-byte length follows the tag
    return length < min(len(data), 1024)


def file_head(path: str | Path) -> bytes:
    """A file's first 132 bytes, where DICOM's marker ends (raises OSError)."""
    with open(path, "rb") as fh:
        return fh.read(MAGIC_OFFSET + 4)


def is_dicom_file(path: str | Path) -> bool:
    """Whether the file's first bytes are DICOM (for folder discovery; reads 132 bytes)."""
    try:
        head = file_head(path)
    except OSError:
        return False
    return is_dicom(head)


# ---- the header -------------------------------------------------------------------------------


def _dcmread(data: bytes | Path, stop_before_pixels: bool) -> Dataset:
    """Parse a data set from its bytes or its file (a file: Pixel Data read once, no copy of
    the whole file in memory besides)."""
    import pydicom

    head = data if isinstance(data, bytes) else _head(data)
    force = head[MAGIC_OFFSET : MAGIC_OFFSET + 4] != MAGIC  # bare data set: no preamble
    source = io.BytesIO(data) if isinstance(data, bytes) else data
    try:
        return pydicom.dcmread(source, force=force, stop_before_pixels=stop_before_pixels)
    except Exception as exc:  # pydicom raises many types for cut or garbled headers
        raise ImageError(f"not a readable DICOM file: {_one_line(exc)}") from exc


def _head(path: Path) -> bytes:
    try:
        return file_head(path)
    except OSError as exc:
        raise ImageError(f"cannot read file: {exc.strerror}") from exc


def _is_image(ds: Dataset) -> bool:
    # pydicom returns what it could read, without raising, when the bytes stop making sense.
    return "Rows" in ds or "SOPClassUID" in ds


def read_dicom(data: bytes | Path) -> Dataset:
    """The header of a DICOM file, without its pixel data (for identity and checks).

    Raises :class:`ImageError` when the bytes are not a readable DICOM data set.
    """
    ds = _dcmread(data, stop_before_pixels=True)
    if not _is_image(ds):
        raise ImageError("not a readable DICOM file: no image attributes in the data set")
    return ds


def _read_with_pixels(data: bytes | Path) -> Dataset:
    """The whole data set, Pixel Data as undecoded bytes."""
    ds = _dcmread(data, stop_before_pixels=False)
    if _is_image(ds):
        return ds
    # When the file ends inside an undefined-length element (compressed pixel data is one),
    # pydicom drops the whole data set. If the header before the pixels reads, they were cut.
    read_dicom(data)
    raise ImageError("truncated DICOM pixel data: the file ends inside the compressed frames")


def transfer_syntax(ds: Dataset) -> UID:
    """The data set's transfer syntax; for a bare data set, the encoding pydicom read it in."""
    from pydicom.uid import (
        UID,
        ExplicitVRBigEndian,
        ExplicitVRLittleEndian,
        ImplicitVRLittleEndian,
    )

    meta = getattr(ds, "file_meta", None)
    uid = meta.get("TransferSyntaxUID") if meta is not None else None
    if uid:
        return UID(uid)
    implicit, little = getattr(ds, "original_encoding", (True, True))
    if not little:
        return ExplicitVRBigEndian
    return ImplicitVRLittleEndian if implicit else ExplicitVRLittleEndian


def _syntax_label(uid: UID) -> str:
    return f"'{uid.name}' ({uid})" if uid.name != str(uid) else f"{uid} (unknown)"


def is_for_processing(ds: Dataset) -> bool:
    """Raw detector data: Presentation Intent Type, SOP Class or Image Type says so."""
    if str(ds.get("PresentationIntentType", "")).strip().upper() == "FOR PROCESSING":
        return True
    if str(ds.get("SOPClassUID", "")) in _FOR_PROCESSING_SOP_CLASSES:
        return True
    image_type = ds.get("ImageType") or []
    values = [image_type] if isinstance(image_type, str) else list(image_type)
    return any(str(v).strip().upper() == "FOR PROCESSING" for v in values)


def check_header(ds: Dataset, max_pixels: int, policy: DicomPolicy) -> None:
    """Refuse, from the header alone, what the worker cannot or must not score."""
    from pydicom.pixels import get_decoder

    modality = str(ds.get("Modality", "")).strip().upper()
    if modality not in policy.allowed_modalities:
        allowed = ", ".join(sorted(policy.allowed_modalities))
        raise ImageError(
            f"DICOM modality {modality or '(missing)'} is not allowed "
            f"(dicom.allowed_modalities: {allowed})"
        )
    if is_for_processing(ds) and not policy.allow_for_processing:
        raise ImageError(
            "DICOM image is FOR PROCESSING (raw detector data, not the displayed mammogram "
            "the model was trained on); set dicom.allow_for_processing to score it"
        )
    frames = _int(ds.get("NumberOfFrames", 1), default=1)
    if frames > 1:
        raise ImageError(
            f"multi-frame DICOM ({frames} frames, e.g. tomosynthesis): only 2D images are scored"
        )
    rows, cols = _int(ds.get("Rows", 0)), _int(ds.get("Columns", 0))
    if "PixelData" not in ds:
        raise ImageError("DICOM file has no pixel data")
    if rows <= 0 or cols <= 0:
        raise ImageError(f"DICOM image has no size (Rows={rows}, Columns={cols})")
    if rows * cols > max_pixels:
        raise ImageError(
            f"image too large: {cols}x{rows} pixels, over max_pixels={max_pixels}"
        )
    photometric = str(ds.get("PhotometricInterpretation", "")).strip().upper()
    samples = _int(ds.get("SamplesPerPixel", 1), default=1)
    if photometric not in ("MONOCHROME1", "MONOCHROME2") or samples != 1:
        raise ImageError(
            f"DICOM image is not greyscale (PhotometricInterpretation "
            f"{photometric or '(missing)'}, SamplesPerPixel {samples})"
        )
    bits = _int(ds.get("BitsAllocated", 0))
    if bits not in (8, 16, 32):
        raise ImageError(f"DICOM BitsAllocated {bits} is not supported (8, 16 or 32)")
    uid = transfer_syntax(ds)
    try:
        available = get_decoder(uid).is_available
    except NotImplementedError:
        available = False
    if not available:
        raise ImageError(f"no decoder installed for DICOM transfer syntax {_syntax_label(uid)}")
    if not uid.is_compressed:
        expected = rows * cols * bits // 8
        got = len(ds.PixelData)
        if got < expected:
            raise ImageError(f"truncated DICOM pixel data: {got} of {expected} bytes")


def _int(value: object, default: int = 0) -> int:
    try:
        return int(value)  # type: ignore[call-overload]
    except (TypeError, ValueError):
        return default


def _one_line(exc: BaseException, limit: int = 300) -> str:
    """An exception as one short line (pydicom lists each decoder plugin's error on its own)."""
    text = " ".join(line.strip() for line in str(exc).splitlines() if line.strip())
    text = text or type(exc).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


# ---- the pixels -------------------------------------------------------------------------------


def _stored_range(ds: Dataset) -> tuple[float, float]:
    """The range of modality values as pydicom's apply_windowing defines it (PS3.3 C.11.1).

    Unsorted on purpose: with a negative rescale slope pydicom's window output runs from
    y_min down to y_max, and dividing by the same (y_max - y_min) recovers the standard's
    window output in [0, 1] exactly.
    """
    bits = int(ds.BitsStored)
    if ds.get("ModalityLUTSequence"):
        lo, hi = 0.0, float(2 ** int(ds.ModalityLUTSequence[0].LUTDescriptor[2]) - 1)
    elif int(ds.get("PixelRepresentation", 0)) == 0:
        lo, hi = 0.0, float(2**bits - 1)
    else:
        lo, hi = float(-(2 ** (bits - 1))), float(2 ** (bits - 1) - 1)
    slope, intercept = ds.get("RescaleSlope"), ds.get("RescaleIntercept")
    if slope is not None and intercept is not None:
        lo, hi = lo * float(slope) + float(intercept), hi * float(slope) + float(intercept)
    return lo, hi


def _has_window(ds: Dataset) -> bool:
    return ds.get("WindowCenter") is not None and ds.get("WindowWidth") is not None


def _has_voi_lut(ds: Dataset) -> bool:
    seq = ds.get("VOILUTSequence")
    return bool(seq) and seq[0].get("LUTDescriptor") is not None and "LUTData" in seq[0]


def voi_lut_table(item: Dataset) -> tuple[np.ndarray, int, int]:
    """A VOI LUT Sequence item's (table, first mapped value, output bits), read as viewers do.

    PS3.3 C.11.2.1.1: with 8-bit entries the LUT Data holds one byte per entry (value length
    = number of entries, padded to even), but some implementations pad each entry to a
    16-bit word; the value length tells the two apart. pydicom unpacks OW data as 16-bit words
    whatever the descriptor says, so the bytes are read here. Where the data's largest entry
    does not fit the descriptor's bit count, the data wins (as Horos, Cornerstone and dicom-rs
    do): scaling by the descriptor would clip the picture.
    """
    entries, first, bits = (int(v) for v in item.LUTDescriptor)
    entries = entries or 65536
    raw = item["LUTData"].value
    if isinstance(raw, (bytes, bytearray)):
        data = bytes(raw)
    else:  # read as US: the values of 16-bit words
        values = [raw] if isinstance(raw, int) else list(raw)
        data = np.asarray(values, dtype="<u2").tobytes()
    if bits <= 8 and len(data) in (entries, entries + 1):
        table = np.frombuffer(data[:entries], dtype=np.uint8)
    elif len(data) >= 2 * entries:
        # 16-bit words; 8-bit entries padded to words keep their value in the low byte,
        # except from writers that put it in the high byte (and leave the low one zero).
        table = np.frombuffer(data[: 2 * entries], dtype="<u2")
        if bits <= 8 and table.any() and not (table & 0xFF).any():
            table = table >> 8
    else:
        raise ValueError(f"VOI LUT Data holds {len(data)} bytes for {entries} entries")
    largest = int(table.max()) if table.size else 0
    bits = max(bits, largest.bit_length())
    return table, first, bits


def to_display(stored: np.ndarray, ds: Dataset) -> np.ndarray:
    """Stored values -> the displayed grey level, float32 in [0, 1] (0 = dark).

    Modality LUT/rescale, then the VOI LUT Sequence (it wins over a window), else the first
    window centre/width with its VOI LUT Function, else the full range the modality values
    can take; then one inversion for MONOCHROME1 or Presentation LUT Shape INVERSE.
    """
    from pydicom.pixels import apply_modality_lut, apply_voi_lut

    if ds.get("ModalityLUTSequence") and not np.issubdtype(stored.dtype, np.integer):
        stored = np.rint(stored).astype(np.int64)  # a LUT is indexed by whole stored values
    values = apply_modality_lut(stored, ds)
    if _has_voi_lut(ds):
        table, first, bits = voi_lut_table(ds.VOILUTSequence[0])
        # LUT input is integral; values outside the table take its first or last entry.
        index = np.clip(np.rint(values), first, first + len(table) - 1).astype(np.int64)
        x = table[index - first] / float(2**bits - 1)
    elif _has_window(ds):
        lo, hi = _stored_range(ds)
        x = (apply_voi_lut(values, ds, prefer_lut=True) - lo) / (hi - lo)
    else:
        # No window at all: the full range the modality values can take, nothing clipped.
        lo, hi = sorted(_stored_range(ds))
        x = (np.asarray(values, dtype=np.float64) - lo) / ((hi - lo) or 1.0)
    x = np.clip(x, 0.0, 1.0).astype(np.float32)
    if needs_inversion(ds):
        x = np.float32(1.0) - x
    return x


def needs_inversion(ds: Dataset) -> bool:
    """Invert once when the image says minimum = white, however many times it says so.

    MONOCHROME1 means the lowest value is displayed white (PS3.3 C.7.6.3.1.2), and in an
    image Presentation LUT Shape restates it (General Image Module, PS3.3 C.7.6.1: INVERSE
    shall be used with MONOCHROME1, IDENTITY with MONOCHROME2): both describe the same
    inversion, so it is applied once, not twice. MONOCHROME2 with INVERSE is honoured (it is
    inverted). pydicom never inverts by itself.
    """
    photometric = str(ds.get("PhotometricInterpretation", "")).strip().upper()
    shape = str(ds.get("PresentationLUTShape", "")).strip().upper()
    return photometric == "MONOCHROME1" or shape == "INVERSE"


def decode_dicom(
    data: bytes | Path,
    max_pixels: int,
    policy: DicomPolicy | None = None,
    reduction: Reduction | LongSide | None = None,
) -> DicomImage:
    """Check the header, decode the pixels, and return the displayed image with its header.

    `reduction`: a large image is brought down to the model's geometry on its stored values
    (worker.imaging.reduction) before the grey-level transforms, which then run on the small image.
    Only one full-size array lives at a time, and only until it is reduced.
    """
    from pydicom.dataset import FileMetaDataset

    policy = policy or DicomPolicy()
    ds = _read_with_pixels(data)
    check_header(ds, max_pixels, policy)
    uid = transfer_syntax(ds)
    if getattr(ds, "file_meta", None) is None:
        ds.file_meta = FileMetaDataset()
    if "TransferSyntaxUID" not in ds.file_meta:  # a bare data set: say how it was read
        ds.file_meta.TransferSyntaxUID = uid
    rows, cols = int(ds.Rows), int(ds.Columns)
    target = reduction.target(rows, cols) if reduction else None
    scale = reduction.decoder_scale(rows, cols) if reduction else 1
    try:
        stored = stored_pixels(ds, uid, scale)
    except Exception as exc:  # each decoder plugin raises its own types for corrupt data
        raise ImageError(
            f"cannot decode DICOM pixel data ({uid.name}; corrupt or truncated): {_one_line(exc)}"
        ) from exc
    del ds.PixelData  # the header is what callers keep; the pixels are in `stored`
    if stored.ndim != 2:
        raise ImageError(f"DICOM pixel data has shape {stored.shape}, expected one 2D image")
    if target is not None:
        stored = reduce_to(stored, target)
    try:
        pixels = to_display(stored, ds)
    except (ValueError, NotImplementedError, AttributeError, IndexError, TypeError) as exc:
        raise ImageError(f"cannot apply the DICOM grey-level transforms: {_one_line(exc)}") from exc
    return DicomImage(pixels=pixels, dataset=ds)
