"""Who and which breast: DICOM headers (each fallback), file-name patterns and a sidecar CSV."""

from __future__ import annotations

import io
import sqlite3
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import write_mammo_like
from worker.app import open_worker
from worker.config import ConfigError, IdentityConfigError, compile_pattern, load_config
from worker.imaging.identity import (
    Identity,
    IdentityReader,
    identity_from_dicom,
    identity_from_name,
    is_dicom,
)

MG_STORAGE = "1.2.840.10008.5.1.4.1.1.1.2"  # Digital Mammography X-Ray Image Storage (presentation)
PATTERN = r"^(?P<patient_id>[^_/]+)_(?P<study_uid>[^_/]+)_(?P<laterality>[LR])_(?P<view>[A-Z]+)\."


def dicom_bytes(
    view_code: tuple[str, str] | None = None, pixels: bool = False, **elements: Any
) -> bytes:
    """A DICOM file (preamble, DICM, file meta) with the given header elements.

    Identifying elements the worker must never keep (name, birth date, accession) are always
    present, so tests can check they are not stored.
    """
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    sop = elements.pop("SOPInstanceUID", generate_uid())
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = MG_STORAGE
    meta.MediaStorageSOPInstanceUID = sop
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.preamble = b"\0" * 128
    ds.SOPClassUID = MG_STORAGE
    ds.SOPInstanceUID = sop
    ds.Modality = "MG"
    ds.PatientName = "Doe^Jane"
    ds.PatientBirthDate = "19610214"
    ds.AccessionNumber = "ACC998877"
    for key, value in elements.items():
        setattr(ds, key, value)
    if view_code is not None:
        item = Dataset()
        item.CodeValue, item.CodingSchemeDesignator = view_code
        item.CodeMeaning = "view"
        ds.ViewCodeSequence = [item]
    if pixels:
        import numpy as np

        ds.Rows, ds.Columns = 8, 8
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
        ds.PixelData = np.full((8, 8), 2000, dtype=np.uint16).tobytes()
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def test_dicom_is_recognised_by_content_not_suffix() -> None:
    data = dicom_bytes(PatientID="P1")
    assert is_dicom(data)
    assert not is_dicom(b"\x89PNG\r\n\x1a\n" + b"\0" * 200)
    assert not is_dicom(b"")


def test_dicom_header_gives_every_field() -> None:
    data = dicom_bytes(
        PatientID="P-001",
        StudyInstanceUID="1.2.3.4",
        SOPInstanceUID="1.2.3.4.5",
        ImageLaterality="L",
        Laterality="R",  # ImageLaterality wins
        ViewPosition="MLO",
        view_code=("399162004", "SCT"),  # ViewPosition wins
    )
    assert identity_from_dicom(data) == Identity("P-001", "1.2.3.4", "L", "MLO", "1.2.3.4.5")


def test_dicom_laterality_falls_back_to_series_laterality_then_unknown() -> None:
    assert identity_from_dicom(dicom_bytes(Laterality="R")).laterality == "R"
    assert identity_from_dicom(dicom_bytes(ImageLaterality="B")).laterality is None  # both
    assert identity_from_dicom(dicom_bytes()).laterality is None


@pytest.mark.parametrize(
    ("code", "view"),
    [
        (("399162004", "SCT"), "CC"),
        (("R-10242", "SRT"), "CC"),
        (("399368009", "SCT"), "MLO"),
        (("R-10226", "SRT"), "MLO"),
        (("399260004", "SCT"), "ML"),
        (("399192008", "SCT"), "XCCL"),
        (("123456", "99LOCAL"), None),  # an unknown code: view unknown, not a guess
    ],
)
def test_dicom_view_falls_back_to_the_view_code_sequence(
    code: tuple[str, str], view: str | None
) -> None:
    assert identity_from_dicom(dicom_bytes(view_code=code)).view == view


def test_dicom_without_view_or_with_an_unparsable_header_is_unknown() -> None:
    assert identity_from_dicom(dicom_bytes(PatientID="P1")).view is None
    broken = b"\0" * 128 + b"DICM" + b"\x02\x00\x10\x00garbage" * 3
    with pytest.warns(UserWarning) as warned:  # pydicom's, on the garbage
        assert identity_from_dicom(broken) == Identity()
    assert any("Expected explicit VR" in str(w.message) for w in warned)


def test_pattern_groups_are_checked() -> None:
    with pytest.raises(IdentityConfigError, match="named groups"):
        compile_pattern(r"(?P<name>\w+)")
    with pytest.raises(IdentityConfigError, match="named groups"):
        compile_pattern(r"(\w+)")
    with pytest.raises(IdentityConfigError, match="regular expression"):
        compile_pattern(r"(?P<patient_id>")
    assert compile_pattern("") is None


def test_identity_from_a_file_name_pattern() -> None:
    rx = compile_pattern(PATTERN)
    assert (
        identity_from_name(
            "P7_S3_l_CC.png", compile_pattern(PATTERN.replace("[LR]", "[LRlr]"))
        ).laterality
        == "L"
    )
    assert identity_from_name("P7_S3_R_MLO.png", rx) == Identity("P7", "S3", "R", "MLO")
    assert identity_from_name("unrelated.png", rx) == Identity()
    # searched in the name relative to the inbox, so folders can carry identity too
    folders = compile_pattern(r"(?P<patient_id>[^/]+)/(?P<study_uid>[^/]+)/(?P<laterality>[LR])")
    assert identity_from_name("P9/S1/R-cc.png", folders) == Identity("P9", "S1", "R")


def test_sidecar_csv_then_pattern_fill_what_the_header_lacks(tmp_path: Path) -> None:
    sidecar = tmp_path / "ids.csv"
    sidecar.write_text(
        "filename,patient_id,study_uid,laterality,view\nsite/a.png,P1,S1,left,CC\nb.dcm,,,R,\n"
    )
    reader = IdentityReader(r"^(?P<patient_id>X\d+)_(?P<study_uid>S\d+)", sidecar_csv=sidecar)
    png = b"\x89PNG\r\n\x1a\n" + b"\0" * 200
    assert reader.identify("site/a.png", png) == Identity("P1", "S1", "L", "CC")
    assert reader.identify("other/a.png", png) == Identity()  # neither the path nor...
    assert reader.identify("a.png", png) == Identity()  # ...a base name listed
    # DICOM fields first, then the sidecar for laterality, the pattern for nothing more
    data = dicom_bytes(PatientID="D1", StudyInstanceUID="9.9", ViewPosition="CC")
    got = reader.identify("b.dcm", data)
    assert (got.patient_id, got.study_uid, got.laterality, got.view) == ("D1", "9.9", "R", "CC")
    assert got.sop_instance_uid is not None
    # the pattern alone
    assert reader.identify("X5_S7.png", png) == Identity("X5", "S7")
    # an edited sidecar is picked up without a restart
    sidecar.write_text("filename,laterality\nsite/a.png,R\nnew.png,L\n")
    assert reader.identify("site/a.png", png).laterality == "R"
    assert reader.identify("new.png", png).laterality == "L"


def test_config_keys_are_schema_checked(tmp_path: Path) -> None:
    cfg = tmp_path / "c.toml"
    cfg.write_text("[identity]\nfilename_pattern = '(?P<birth_date>\\\\d+)'\n")
    with pytest.raises(ConfigError, match="identity.filename_pattern"):
        load_config(cfg)
    cfg.write_text("[worker]\nstudy_settle_seconds = -1\n")
    with pytest.raises(ConfigError, match="study_settle_seconds"):
        load_config(cfg)
    cfg.write_text("[identity]\nsidecar_csv = 'ids.csv'\n[paths]\noutbox = 'out'\n")
    loaded = load_config(cfg)
    assert loaded.sidecar_csv == tmp_path.resolve() / "ids.csv"
    assert loaded.outbox == tmp_path.resolve() / "out"
    assert load_config(tmp_path / "c.toml", {}).study_settle_seconds == 60.0


def _write_config(workdir: Path, extra: str) -> Path:
    path = workdir / "config.toml"
    path.write_text(path.read_text() + extra)
    return path


def test_pipeline_stores_identity_and_nothing_more(workdir: Path) -> None:
    """A DICOM without extension and a PNG named by the pattern: identity stored per image;
    the patient's name, birth date and accession number are nowhere in the database."""
    cfg_path = workdir / "config.toml"
    text = cfg_path.read_text().replace(
        "[worker]\n", f"[identity]\nfilename_pattern = '{PATTERN}'\n[worker]\n"
    )
    cfg_path.write_text(text)
    config = load_config(cfg_path)
    sop = "1.2.826.0.1.3680043.10.1.7"
    (config.inbox / sop).write_bytes(
        dicom_bytes(
            pixels=True,
            PatientID="PD",
            StudyInstanceUID="1.2.9",
            SOPInstanceUID=sop,
            Laterality="R",
            view_code=("R-10226", "SRT"),
        )
    )
    write_mammo_like(config.inbox / "P1_S1_L_CC.png")
    worker = open_worker(config)
    worker.watcher.run_once(timeout=10)
    worker.close()
    db = Path(config.database_url.removeprefix("sqlite:///"))
    with sqlite3.connect(db) as con:
        rows = con.execute(
            "SELECT filename, patient_id, study_uid, laterality, view, sop_instance_uid "
            "FROM images ORDER BY filename"
        ).fetchall()
    assert rows == [
        ("1.2.826.0.1.3680043.10.1.7", "PD", "1.2.9", "R", "MLO", sop),
        ("P1_S1_L_CC.png", "P1", "S1", "L", "CC", None),
    ]
    stored = b"".join(p.read_bytes() for p in db.parent.glob(db.name + "*"))
    for secret in (b"Doe^Jane", b"19610214", b"ACC998877"):
        assert secret not in stored
