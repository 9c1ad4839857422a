"""Synthetic DICOM files for the tests, built with pydicom: one helper, every case by keyword."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.sequence import Sequence
from pydicom.uid import UID, ExplicitVRLittleEndian, JPEG2000Lossless, RLELossless, generate_uid

MAMMO_FOR_PRESENTATION = "1.2.840.10008.5.1.4.1.1.1.2"
MAMMO_FOR_PROCESSING = "1.2.840.10008.5.1.4.1.1.1.2.1"
# Syntaxes the tests really encode (pydicom's RLE encoder, pylibjpeg-openjpeg for JPEG 2000).
ENCODABLE = (RLELossless, JPEG2000Lossless)


def mammo_like(h: int = 96, w: int = 80, bits: int = 12, seed: int = 0) -> np.ndarray:
    """A 'breast' (an ellipse touching the left edge) on a zero background, `bits`-bit."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    mask = ((xx / (0.6 * w)) ** 2 + ((yy - h / 2) / (0.45 * h)) ** 2) <= 1.0
    img = np.zeros((h, w))
    img[mask] = 0.6 + rng.normal(0, 0.03, mask.sum()) + 0.2 * (1 - xx[mask] / w)
    return np.round(np.clip(img, 0, 1) * (2**bits - 1)).astype(np.uint16)


def ramp12() -> np.ndarray:
    """Every 12-bit value once, 64 x 64: exact checks of the grey-level transforms."""
    return np.arange(4096, dtype=np.uint16).reshape(64, 64)


def voi_lut_item(lut: np.ndarray, first: int = 0, bits: int = 16) -> Dataset:
    item = Dataset()
    item.LUTDescriptor = [len(lut) if len(lut) < 65536 else 0, first, bits]
    item.LUTData = [int(v) for v in lut]
    item["LUTData"].VR = "US"
    item.LUTExplanation = "test LUT"
    return item


def dicom_dataset(
    stored: np.ndarray | None,
    *,
    photometric: str = "MONOCHROME2",
    bits_stored: int = 12,
    modality: str = "MG",
    sop_class: str = MAMMO_FOR_PRESENTATION,
    transfer_syntax: str = ExplicitVRLittleEndian,
    **attrs: Any,
) -> Dataset:
    """A data set with `stored` as its pixels (None: no Pixel Data); `attrs` set verbatim."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.Modality = modality
    ds.PatientID = "TEST-0001"
    ds.StudyInstanceUID = generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.ImageLaterality = "L"
    ds.ViewPosition = "CC"
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = photometric
    if stored is not None:
        frames = stored.shape[0] if stored.ndim == 3 else 1
        ds.Rows, ds.Columns = stored.shape[-2:]
        if frames > 1:
            ds.NumberOfFrames = frames
    else:
        ds.Rows, ds.Columns = 64, 64
    ds.BitsAllocated = 8 if bits_stored <= 8 else 16
    ds.BitsStored = bits_stored
    ds.HighBit = bits_stored - 1
    ds.PixelRepresentation = 1 if stored is not None and stored.dtype.kind == "i" else 0
    for key, value in attrs.items():
        setattr(ds, key, value)
    if stored is not None:
        ds.PixelData = stored.astype(f"<{stored.dtype.kind}{ds.BitsAllocated // 8}").tobytes()
    if transfer_syntax in ENCODABLE:
        ds.compress(transfer_syntax, stored)
    elif transfer_syntax != ExplicitVRLittleEndian:
        # Only a label (an undecodable or made-up syntax): the bytes are not really encoded.
        ds.file_meta.TransferSyntaxUID = transfer_syntax
        native = UID(transfer_syntax).is_transfer_syntax and not UID(transfer_syntax).is_compressed
        if not native and "PixelData" in ds:
            ds.PixelData = encapsulate([ds.PixelData])
    return ds


def to_bytes(ds: Dataset, preamble: bool = True) -> bytes:
    """A Part 10 file (preamble + DICM + file meta), or the bare data set when not `preamble`."""
    out = io.BytesIO()
    if preamble:
        ds.save_as(out, enforce_file_format=True, implicit_vr=False, little_endian=True)
    else:
        pydicom.dcmwrite(out, ds, implicit_vr=False, little_endian=True)
    data = out.getvalue()
    assert (data[128:132] == b"DICM") == preamble
    return data


def dicom_bytes(stored: np.ndarray | None, *, preamble: bool = True, **kwargs: Any) -> bytes:
    return to_bytes(dicom_dataset(stored, **kwargs), preamble)


def with_sequence(*items: Dataset) -> Sequence:
    return Sequence(list(items))


def gdcm_transcode(data: bytes, syntax: str, tmp: Path) -> bytes:
    """Re-encode a DICOM file with python-gdcm (pydicom cannot encode JPEG Lossless or JPEG-LS).

    `syntax`: a gdcm.TransferSyntax constant name, e.g. "JPEGLosslessProcess14_1".
    """
    import gdcm

    src, dst = tmp / "gdcm-in.dcm", tmp / "gdcm-out.dcm"
    src.write_bytes(data)
    reader = gdcm.ImageReader()
    reader.SetFileName(str(src))
    assert reader.Read()
    change = gdcm.ImageChangeTransferSyntax()
    change.SetTransferSyntax(gdcm.TransferSyntax(getattr(gdcm.TransferSyntax, syntax)))
    change.SetInput(reader.GetImage())
    assert change.Change()
    writer = gdcm.ImageWriter()
    writer.SetFile(reader.GetFile())
    writer.SetImage(change.GetOutput())
    writer.SetFileName(str(dst))
    assert writer.Write()
    return dst.read_bytes()


# ---- full-size files, as a site sends them ------------------------------------------------

# Lossless syntaxes a site sends, with how each is made: pydicom (uncompressed), pydicom with
# pylibjpeg-openjpeg (JPEG 2000), or DCMTK's encoders from the uncompressed file.
FULL_SIZE_SYNTAXES = ("uncompressed", "rle", "jpeg-lossless-sv1", "jpeg-ls", "jpeg2000")
_DCMTK_ENCODERS = {
    "rle": ["dcmcrle"],
    "jpeg-lossless-sv1": ["dcmcjpeg", "+e1"],
    "jpeg-ls": ["dcmcjpls", "+el"],  # JPEG-LS lossless
}


def full_size_stored(picture: np.ndarray, rows: int = 4096, cols: int = 3328,
                     seed: int = 0) -> np.ndarray:
    """A dev-pool square (8-bit) as a full-field detector would store it: stretched back to
    the portrait frame (bicubic: a bilinear copy is blurrier than any real detector image,
    and the shipped model's scores drop with blur), 12 bits in 16, with a little detector
    noise (so that the lossless codecs have realistic work to do)."""
    import cv2

    big = cv2.resize(picture.astype(np.float32) * 16.0, (cols, rows),
                     interpolation=cv2.INTER_CUBIC)
    big += np.random.default_rng(seed).normal(0.0, 3.0, big.shape).astype(np.float32)
    return np.clip(np.rint(big), 0, 4095).astype(np.uint16)


def full_size_dicom(picture: np.ndarray, syntax: str, folder: Path, name: str,
                    **attrs: Any) -> Path:
    """Write `picture` (an 8-bit dev-pool square) as a full-size MG FOR PRESENTATION file in
    one of FULL_SIZE_SYNTAXES (12 bits in 16, window 2048/4096). Needs DCMTK for the RLE and
    JPEG ones (`dcmcrle`, `dcmcjpeg`, `dcmcjpls`)."""
    import subprocess

    if syntax not in FULL_SIZE_SYNTAXES:
        raise ValueError(f"unknown syntax {syntax!r}; one of {', '.join(FULL_SIZE_SYNTAXES)}")
    stored = full_size_stored(picture)
    ds = dicom_dataset(
        stored, WindowCenter=2048, WindowWidth=4096,
        PresentationIntentType="FOR PRESENTATION", **attrs,
        transfer_syntax=JPEG2000Lossless if syntax == "jpeg2000" else ExplicitVRLittleEndian,
    )
    out = folder / f"{name}.dcm"
    if syntax in ("uncompressed", "jpeg2000"):
        out.write_bytes(to_bytes(ds))
        return out
    plain = folder / f"{name}.plain.dcm"
    plain.write_bytes(to_bytes(ds))
    subprocess.run([*_DCMTK_ENCODERS[syntax], str(plain), str(out)], check=True)
    plain.unlink()
    return out
