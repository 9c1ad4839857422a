"""DICOM results for a PACS, built with highdicom: an exam's TID 1500 measurement report and
one image's Secondary Capture. Pure functions of their inputs (the scoring's time is passed
in, never the clock), so the same scoring always gives the same instance.

The report (Comprehensive 3D SR) references every DICOM image scored by SOP Instance UID and
holds, as TID 1501 measurement groups: per image its score, call, threshold and operating point;
per breast and for the exam the combined score and call. The algorithm (mammo-screen, the
model version, the operating point and threshold) is named in each group; the research-use
statement is a TEXT item of the report, the series description and the capture's pixels.
"""

from __future__ import annotations

import datetime as dt
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import cv2
import highdicom as hd
import numpy as np
from highdicom.coding_schemes import CodingSchemeIdentificationItem
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes
from pydicom.sr.coding import Code
from pydicom.uid import ExplicitVRLittleEndian

from worker.imaging.heatmap import overlay_rgb
from worker.records.pacs_queue import SECONDARY_CAPTURE

MANUFACTURER = "mammo-screen"
DISCLAIMER = ("RESEARCH USE ONLY - NOT FOR DIAGNOSTIC USE. mammo-screen is a research tool, "
              "not a medical device: its scores must not be used to make or withhold a "
              "clinical decision.")
BURNED_IN = "NOT FOR DIAGNOSTIC USE"
REPORT_SERIES_DESCRIPTION = "mammo-screen AI report - RESEARCH, NOT FOR DIAGNOSIS"
CAPTURE_SERIES_DESCRIPTION = "mammo-screen AI captures - RESEARCH, NOT FOR DIAGNOSIS"
# The long side of a capture: what a reading workstation shows without the full-size file.
CAPTURE_LONG_SIDE = (1024, 2048)

_SCHEME = "99MMSCR"  # a private coding scheme (PS3.16 8.2: designators starting with 99)
SCORE = Code("score", _SCHEME, "Malignancy score")
THRESHOLD = Code("threshold", _SCHEME, "Decision threshold")
N_IMAGES = Code("n-images", _SCHEME, "Number of images combined")
CALL = Code("call", _SCHEME, "Call at the operating point")
COMMENT = Code("121106", "DCM", "Comment")
NO_UNITS = Code("1", "UCUM", "no units")
IMAGES_UNIT = Code("{images}", "UCUM", "images")
MAMMOGRAPHY = Code("71651007", "SCT", "Mammography")
BREAST = Code("76752008", "SCT", "Breast")
LATERALITY = {"L": Code("7771000", "SCT", "Left"), "R": Code("24028007", "SCT", "Right")}
BOTH_SIDES = Code("51440002", "SCT", "Right and left")
SOURCE_IMAGE = Code("121322", "DCM", "Source image for image processing operation")

# Archives often hold something other than a person's name in PatientName (CBIS-DDSM: the
# case name); highdicom warns about each copy on stderr. The results copy it as it is.
warnings.filterwarnings("ignore", message=".*unlikely to represent the intended person name")


@dataclass(frozen=True)
class Scored:
    """One score at one level (an image, a breast, the exam)."""

    score: float
    label: str
    n_images: int = 1
    laterality: str | None = None  # L, R; None for the exam or an unknown side


@dataclass(frozen=True)
class ReportInput:
    """What the report says; `images` pairs each image's header (no pixels) with its score."""

    images: Sequence[tuple[Dataset, Scored]]
    breasts: Sequence[Scored]
    exam: Scored
    model_version: str
    software_version: str
    threshold: float
    operating_point: str  # the point's rule, e.g. "highest threshold with ... >= 0.90"
    scored_at: dt.datetime
    series_uid: str
    sop_instance_uid: str
    series_number: int
    supersedes: Dataset | None = None  # the earlier report's UIDs (a rescoring)


def _algorithm(inp: ReportInput) -> hd.sr.AlgorithmIdentification:
    return hd.sr.AlgorithmIdentification(
        name=MANUFACTURER, version=inp.model_version,
        parameters=[f"operating point: {inp.operating_point}",
                    f"threshold: {inp.threshold:.6f}",
                    f"software version: {inp.software_version}"])


def _group(inp: ReportInput, what: Scored, uid: str, identifier: str,
           sources: Sequence[Dataset]) -> hd.sr.MeasurementsAndQualitativeEvaluations:
    side = LATERALITY.get(what.laterality or "", BOTH_SIDES if identifier == "exam" else None)
    measurements = [hd.sr.Measurement(name=SCORE, value=round(what.score, 6), unit=NO_UNITS),
                    hd.sr.Measurement(name=THRESHOLD, value=round(inp.threshold, 6),
                                      unit=NO_UNITS)]
    if identifier != "image":
        measurements.append(hd.sr.Measurement(name=N_IMAGES, value=what.n_images,
                                              unit=IMAGES_UNIT))
    call = Code(what.label, _SCHEME, f"{what.label} at the operating point")
    return hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(uid=uid, identifier=identifier),
        algorithm_id=_algorithm(inp),
        finding_sites=[hd.sr.FindingSite(anatomic_location=BREAST, laterality=side)],
        measurements=measurements,
        qualitative_evaluations=[hd.sr.QualitativeEvaluation(name=CALL, value=call)],
        source_images=[hd.sr.SourceImageForMeasurementGroup.from_source_image(ds)
                       for ds in sources] or None,
    )


def build_report(inp: ReportInput, tracking_uid: Callable[[str], str]
                 ) -> hd.sr.Comprehensive3DSR:
    """The exam's TID 1500 report; `tracking_uid(name)` gives each group's fixed UID."""
    headers = [with_blanks(ds) for ds, _ in inp.images]
    groups = [_group(inp, s, tracking_uid(f"image:{ds.SOPInstanceUID}"), "image", [ds])
              for ds, s in inp.images]
    for b in inp.breasts:
        side = [ds for ds, s in inp.images if s.laterality == b.laterality]
        groups.append(_group(inp, b, tracking_uid(f"breast:{b.laterality}"),
                             f"breast {b.laterality}", side))
    groups.append(_group(inp, inp.exam, tracking_uid("exam"), "exam", []))
    device = hd.sr.ObserverContext(
        observer_type=codes.DCM.Device,
        observer_identifying_attributes=hd.sr.DeviceObserverIdentifyingAttributes(
            uid=tracking_uid("device"), name=MANUFACTURER, manufacturer_name=MANUFACTURER,
            model_name=inp.model_version))
    report = hd.sr.MeasurementReport(
        observation_context=hd.sr.ObservationContext(observer_device_context=device),
        procedure_reported=MAMMOGRAPHY, imaging_measurements=groups)
    report[0].ContentSequence.append(hd.sr.TextContentItem(
        name=COMMENT, value=DISCLAIMER, relationship_type=hd.sr.RelationshipTypeValues.CONTAINS))
    sr = hd.sr.Comprehensive3DSR(
        evidence=headers, content=report[0], series_instance_uid=inp.series_uid,
        series_number=inp.series_number, sop_instance_uid=inp.sop_instance_uid,
        instance_number=1, manufacturer=MANUFACTURER, is_complete=True, is_final=False,
        is_verified=False, series_description=REPORT_SERIES_DESCRIPTION,
        software_versions=inp.software_version, manufacturer_model_name=inp.model_version,
        content_date=inp.scored_at.date(), content_time=inp.scored_at.time(),
        series_date=inp.scored_at.date(), series_time=inp.scored_at.time(),
        previous_versions=[inp.supersedes] if inp.supersedes is not None else None,
        transfer_syntax_uid=ExplicitVRLittleEndian,
        coding_schemes=[CodingSchemeIdentificationItem(
            designator=_SCHEME, name="mammo-screen result codes",
            responsible_organization=MANUFACTURER)],
    )
    _pin_times(sr, inp.scored_at)
    return sr


# ---- the Secondary Capture ----------------------------------------------------------------


def capture_pixels(display: np.ndarray, lines: Sequence[str],
                   heatmap: np.ndarray | None = None) -> np.ndarray:
    """The picture as shown (float in [0, 1], 0 dark) brought to a workstation's size, the
    heatmap over it when given, and a band above it with `lines` burned in: uint8 RGB."""
    low, high = CAPTURE_LONG_SIDE
    rows, cols = display.shape
    scale = min(max(low / max(rows, cols), 1.0), high / max(rows, cols))
    size = (max(1, round(cols * scale)), max(1, round(rows * scale)))
    shrink = scale < 1.0
    picture = cv2.resize(display.astype(np.float32), size,
                         interpolation=cv2.INTER_AREA if shrink else cv2.INTER_LINEAR)
    grey = np.clip(picture * 255.0 + 0.5, 0, 255).astype(np.uint8)
    rgb = overlay_rgb(grey, heatmap) if heatmap is not None else np.repeat(
        grey[:, :, None], 3, axis=2)
    return np.vstack([_text_band(size[0], lines), rgb])


def _text_band(width: int, lines: Sequence[str]) -> np.ndarray:
    """White text on black, one row per line, each scaled to fit the width."""
    font, thickness = cv2.FONT_HERSHEY_SIMPLEX, max(1, width // 600)
    line_height = max(24, width // 28)
    band = np.zeros((line_height * len(lines) + line_height // 2, width, 3), np.uint8)
    for i, text in enumerate(lines):
        (w, h), _ = cv2.getTextSize(text, font, 1.0, thickness)
        scale = min((width - 2 * (line_height // 3)) / w, 0.7 * line_height / h)
        colour = (255, 255, 0) if i == 0 else (255, 255, 255)
        cv2.putText(band, text, (line_height // 3, (i + 1) * line_height), font, scale,
                    colour, thickness, cv2.LINE_AA)
    return band


@dataclass(frozen=True)
class CaptureInput:
    source: Dataset  # the scored image's header (no pixels needed)
    display: np.ndarray  # its picture as shown, float [0, 1]
    image: Scored
    model_version: str
    software_version: str
    threshold: float
    scored_at: dt.datetime
    series_uid: str
    sop_instance_uid: str
    series_number: int
    instance_number: int


def build_capture(inp: CaptureInput, heatmap: np.ndarray | None = None) -> hd.sc.SCImage:
    """One image's Secondary Capture: its picture, score and the warning burned in, in its
    study, referencing it; with the model's attention map over it when `heatmap` is given."""
    s = inp.image
    lines = [f"{BURNED_IN} - research tool, not a medical device",
             f"mammo-screen score {s.score:.3f}: {s.label} (threshold {inp.threshold:.3f})",
             f"model {inp.model_version}" + (" - attention map" if heatmap is not None else "")]
    pixels = capture_pixels(inp.display, lines, heatmap)
    src = with_blanks(inp.source)
    orientation = _orientation(src)
    laterality = str(src.get("ImageLaterality", "") or src.get("Laterality", "")).strip()
    sc = hd.sc.SCImage.from_ref_dataset(
        ref_dataset=src, pixel_array=pixels, photometric_interpretation="RGB",
        bits_allocated=8, coordinate_system="PATIENT", series_instance_uid=inp.series_uid,
        series_number=inp.series_number, sop_instance_uid=inp.sop_instance_uid,
        instance_number=inp.instance_number, manufacturer=MANUFACTURER,
        patient_orientation=orientation or ("A", "F"),
        laterality=laterality if laterality in ("L", "R") else None,
        series_description=CAPTURE_SERIES_DESCRIPTION, software_versions=inp.software_version,
        manufacturer_model_name=inp.model_version,
        content_date=inp.scored_at.date(), content_time=inp.scored_at.time(),
        series_date=inp.scored_at.date(), series_time=inp.scored_at.time(),
        transfer_syntax_uid=ExplicitVRLittleEndian,
    )
    if orientation is None:
        sc.PatientOrientation = None  # type 2: unknown rather than made up
    sc.DateOfSecondaryCapture, sc.TimeOfSecondaryCapture = sc.ContentDate, sc.ContentTime
    _pin_times(sc, inp.scored_at)
    sc.BurnedInAnnotation = "YES"
    sc.ImageComments = f"{BURNED_IN}. {DISCLAIMER}"
    sc.DerivationDescription = "mammo-screen result: source image with score burned in"
    ref = Dataset()
    ref.ReferencedSOPClassUID = src.SOPClassUID
    ref.ReferencedSOPInstanceUID = src.SOPInstanceUID
    ref.PurposeOfReferenceCodeSequence = [hd.sr.CodedConcept.from_code(SOURCE_IMAGE)]
    sc.SourceImageSequence = [ref]
    return sc


def _pin_times(ds: Dataset, when: dt.datetime) -> None:
    """The scoring's time where highdicom writes the clock's (instance creation, its own
    contribution): the same scoring then always gives the same bytes, so an instance built
    again after a crash or a lost file is the one already sent."""
    ds.InstanceCreationDate, ds.InstanceCreationTime = ds.ContentDate, ds.ContentTime
    for item in ds.get("ContributingEquipmentSequence", []):
        if "ContributionDateTime" in item:
            item.ContributionDateTime = when.strftime("%Y%m%d%H%M%S.%f")


# Patient and study attributes the results copy, all type 2 (present, maybe empty) in them.
_COPIED = ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyDate",
           "StudyTime", "ReferringPhysicianName", "StudyID", "AccessionNumber")


def with_blanks(src: Dataset) -> Dataset:
    """A copy of a source header with each copied attribute it lacks present and empty: the
    results then say "unknown" for it, as DICOM's type 2 means, instead of failing."""
    out = Dataset()
    out.update(src)
    for keyword in _COPIED:
        if keyword not in out:
            setattr(out, keyword, None)
    return out


def _orientation(src: Dataset) -> tuple[str, str] | None:
    """The source's Patient Orientation when it is two values highdicom takes (one direction
    letter each); None otherwise (some archives hold the view, "CC", there)."""
    value = src.get("PatientOrientation")
    if isinstance(value, str) or value is None or len(value) != 2:
        return None
    allowed = {v.value for v in hd.PatientOrientationValuesBiped}
    row, col = (str(v).strip() for v in value)
    return (row, col) if row in allowed and col in allowed else None


def warm_up() -> None:
    """Build a tiny report and capture once: highdicom reads its tables of the standard on
    first use (about a second), which the first exam's results should not wait for."""
    source = Dataset()
    source.SOPClassUID, source.SOPInstanceUID = SECONDARY_CAPTURE, "1.2.3.4"
    source.StudyInstanceUID, source.SeriesInstanceUID = "1.2.3", "1.2.3.5"
    source.Modality, source.Rows, source.Columns = "MG", 8, 8
    when = dt.datetime(2000, 1, 1)
    scored = Scored(0.5, "benign", laterality="L")
    build_capture(CaptureInput(source, np.zeros((8, 8), np.float32), scored, "m", "s", 0.5,
                               when, "1.2.3.6", "1.2.3.7", 1, 1))
    build_report(ReportInput([(source, scored)], [scored], scored, "m", "s", 0.5, "rule", when,
                             "1.2.3.8", "1.2.3.9", 1), lambda role: "1.2.3.10")


def predecessor(study_uid: str, series_uid: str, sop_instance_uid: str, sop_class_uid: str
                ) -> Dataset:
    """The UIDs of an earlier report, as highdicom's `previous_versions` reads them."""
    ds = Dataset()
    ds.StudyInstanceUID, ds.SeriesInstanceUID = study_uid, series_uid
    ds.SOPInstanceUID, ds.SOPClassUID = sop_instance_uid, sop_class_uid
    return ds
