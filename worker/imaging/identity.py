"""Who and which breast: the few identity fields an image needs to join its breast and exam.

Each field comes from the first source that has it:

1. the DICOM header (recognised by content, the ``DICM`` marker at byte 128, not by suffix):
   PatientID, StudyInstanceUID, SOPInstanceUID; laterality from ImageLaterality (0020,0062),
   else the series-level Laterality (0020,0060); view from ViewPosition, else the first item
   of the View Code Sequence (CID 4014 codes, SNOMED CT or their legacy SRT values);
2. the sidecar CSV (``[identity] sidecar_csv``), matched by the name relative to the inbox,
   else by base name;
3. the file-name pattern (``[identity] filename_pattern``), a regular expression searched in
   the name relative to the inbox, with named groups for the fields it provides.

A field no source provides stays unknown (None). An image of unknown laterality still counts
in its exam, but in no breast. Nothing else is read or kept: no patient name, birth date,
accession number or any other header element.
"""

from __future__ import annotations

import csv
import io
import logging
import os
import re
from dataclasses import dataclass, fields, replace
from enum import StrEnum
from pathlib import Path, PurePosixPath
from typing import Any

from worker.config import PATTERN_FIELDS, compile_pattern
from worker.imaging.dicom import MAGIC, MAGIC_OFFSET, file_head

log = logging.getLogger("mammo_screen")

# The fields a pattern or a sidecar may provide (SOP Instance UID is DICOM's alone).
SIDECAR_FIELDS = PATTERN_FIELDS
# Longest value stored per field: UIDs are at most 64 characters, Patient ID 64 (LO).
_MAX_LEN = 64


class Laterality(StrEnum):
    LEFT = "L"
    RIGHT = "R"


# CID 4014 "View for Mammography": SNOMED CT code and legacy SRT code -> ViewPosition term.
VIEW_CODES: dict[str, str] = {
    "399260004": "ML",  # medio-lateral
    "R-10224": "ML",
    "399368009": "MLO",  # medio-lateral oblique
    "R-10226": "MLO",
    "399352003": "LM",  # latero-medial
    "R-10228": "LM",
    "399099002": "LMO",  # latero-medial oblique
    "R-10230": "LMO",
    "399162004": "CC",  # cranio-caudal
    "R-10242": "CC",
    "399196006": "FB",  # caudo-cranial (from below)
    "R-10244": "FB",
    "399188001": "SIO",  # superolateral to inferomedial oblique
    "R-102D0": "SIO",
    "441555000": "ISO",  # inferomedial to superolateral oblique
    "R-40AAA": "ISO",
    "399192008": "XCCL",  # cranio-caudal exaggerated laterally
    "R-1024A": "XCCL",
    "399101009": "XCCM",  # cranio-caudal exaggerated medially
    "R-1024B": "XCCM",
    "127457009": "SPECIMEN",  # tissue specimen from breast
    "G-8310": "SPECIMEN",
}


@dataclass(frozen=True)
class Identity:
    patient_id: str | None = None
    study_uid: str | None = None
    laterality: str | None = None  # "L", "R" or None
    view: str | None = None  # "CC", "MLO", ... or None
    sop_instance_uid: str | None = None

    def fill_from(self, other: Identity) -> Identity:
        """This identity, with each unknown field taken from `other`."""
        return replace(
            self,
            **{
                f.name: getattr(other, f.name)
                for f in fields(self)
                if getattr(self, f.name) is None and getattr(other, f.name) is not None
            },
        )

    def as_columns(self) -> dict[str, str | None]:
        return {f.name: getattr(self, f.name) for f in fields(self)}


def is_dicom(data: bytes | Path) -> bool:
    """A DICOM Part 10 file, from its bytes or (reading 132 bytes) its path."""
    if isinstance(data, Path):
        try:
            data = file_head(data)
        except OSError:
            return False
    return data[MAGIC_OFFSET : MAGIC_OFFSET + 4] == MAGIC


def _text(value: object) -> str | None:
    if value is None:
        return None
    text = str(value).strip().strip("\x00").strip()
    return text[:_MAX_LEN] if text else None


def normalise_laterality(value: object) -> str | None:
    """'L'/'R' (any case, or LEFT/RIGHT); anything else, such as 'B' (both), is unknown."""
    text = (_text(value) or "").upper()
    if text in ("L", "LEFT"):
        return Laterality.LEFT.value
    if text in ("R", "RIGHT"):
        return Laterality.RIGHT.value
    return None


def normalise_view(value: object) -> str | None:
    text = (_text(value) or "").upper().replace(" ", "")
    return text or None


def identity_from_dicom(data: bytes | Path) -> Identity:
    """The identity fields of a DICOM file's header; pixel data is never read here.

    A header pydicom cannot parse gives an empty identity: the decoder, not this step,
    decides whether the file is quarantined.
    """
    import pydicom
    from pydicom.errors import InvalidDicomError

    try:
        source = io.BytesIO(data) if isinstance(data, bytes) else data
        ds = pydicom.dcmread(source, stop_before_pixels=True)
    except InvalidDicomError as exc:
        log.info("unreadable DICOM header (identity unknown) error=%s", exc)
        return Identity()
    except Exception as exc:  # a parser bug on odd input must not stop the worker
        log.warning("DICOM header parse failed (identity unknown) error=%r", exc)
        return Identity()
    try:
        return _identity_from_dataset(ds)
    except Exception as exc:  # a malformed element read lazily: same rule as above
        log.warning("DICOM header element unreadable (identity unknown) error=%r", exc)
        return Identity()


def _identity_from_dataset(ds: Any) -> Identity:
    laterality = normalise_laterality(ds.get("ImageLaterality")) or normalise_laterality(
        ds.get("Laterality")
    )
    view = normalise_view(ds.get("ViewPosition"))
    if view is None:
        view = _view_from_code_sequence(ds.get("ViewCodeSequence"))
    return Identity(
        patient_id=_text(ds.get("PatientID")),
        study_uid=_text(ds.get("StudyInstanceUID")),
        laterality=laterality,
        view=view,
        sop_instance_uid=_text(ds.get("SOPInstanceUID")),
    )


def _view_from_code_sequence(seq: object) -> str | None:
    try:
        item = seq[0]  # type: ignore[index]
    except (TypeError, IndexError, KeyError):
        return None
    code = _text(item.get("CodeValue"))
    return VIEW_CODES.get(code) if code is not None else None


def identity_from_name(name: str, pattern: re.Pattern[str] | None) -> Identity:
    """Fields from the named groups of `pattern` searched in `name` (relative, with '/')."""
    if pattern is None:
        return Identity()
    m = pattern.search(name)
    if m is None:
        return Identity()
    groups = m.groupdict()
    return Identity(
        patient_id=_text(groups.get("patient_id")),
        study_uid=_text(groups.get("study_uid")),
        laterality=normalise_laterality(groups.get("laterality")),
        view=normalise_view(groups.get("view")),
    )


class Sidecar:
    """The sidecar CSV (columns `filename` and any of PATTERN_FIELDS), re-read when it changes.

    It is read when needed rather than once, so that an operator can add rows for images that
    are about to arrive without restarting the worker.
    """

    def __init__(self, path: Path | None) -> None:
        self.path = path
        self._stamp: tuple[int, int] | None = None
        self._rows: dict[str, Identity] = {}

    def _load(self) -> None:
        if self.path is None:
            return
        try:
            st = os.stat(self.path)
        except OSError:
            if self._stamp is not None:
                log.warning("sidecar CSV gone file=%s (identity from it unknown)", self.path)
            self._stamp, self._rows = None, {}
            return
        stamp = (st.st_mtime_ns, st.st_size)
        if stamp == self._stamp:
            return
        try:
            text = self.path.read_text(encoding="utf-8-sig")
        except (OSError, UnicodeDecodeError) as exc:
            log.warning("cannot read sidecar CSV file=%s error=%s", self.path, exc)
            return
        reader = csv.DictReader(io.StringIO(text))
        cols = set(reader.fieldnames or [])
        if "filename" not in cols or not cols & set(SIDECAR_FIELDS):
            log.warning(
                "sidecar CSV file=%s needs a 'filename' column and one of %s; found %s",
                self.path,
                ", ".join(SIDECAR_FIELDS),
                sorted(cols),
            )
            self._stamp, self._rows = stamp, {}
            return
        rows: dict[str, Identity] = {}
        for row in reader:
            name = (row.get("filename") or "").strip()
            if not name:
                continue
            rows[PurePosixPath(name).as_posix()] = Identity(
                patient_id=_text(row.get("patient_id")),
                study_uid=_text(row.get("study_uid")),
                laterality=normalise_laterality(row.get("laterality")),
                view=normalise_view(row.get("view")),
            )
        self._stamp, self._rows = stamp, rows
        log.info("sidecar CSV loaded file=%s rows=%d", self.path, len(rows))

    def lookup(self, name: str) -> Identity:
        self._load()
        found = self._rows.get(name) or self._rows.get(PurePosixPath(name).name)
        return found or Identity()


class IdentityReader:
    """Identity of one received file: DICOM header, then sidecar CSV, then file-name pattern."""

    def __init__(self, filename_pattern: str = "", sidecar_csv: Path | None = None) -> None:
        self.pattern = compile_pattern(filename_pattern)
        self.sidecar = Sidecar(sidecar_csv)

    def identify(self, name: str, data: bytes | Path) -> Identity:
        """`name` is the file's name relative to the inbox, with '/' separators; `data` its
        bytes, or its path (a large file: only the header is read)."""
        ident = identity_from_dicom(data) if is_dicom(data) else Identity()
        ident = ident.fill_from(self.sidecar.lookup(name))
        return ident.fill_from(identity_from_name(name, self.pattern))
