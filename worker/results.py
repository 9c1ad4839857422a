"""Listing recorded results and importing ground-truth outcomes."""

from __future__ import annotations

import csv
import datetime as dt
import io
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sqlalchemy import select

from worker.store import ImageRecord, Outcome, Store, utcnow

RESULT_COLUMNS = (
    "id",
    "filename",
    "sha256",
    "size_bytes",
    "status",
    "score",
    "label",
    "threshold",
    "model_version",
    "received_at",
    "scored_at",
    "error",
    "duplicate_of",
    "final_path",
    "outcome",
    "patient_id",
    "study_uid",
    "laterality",
    "view",
    "sop_instance_uid",
)

VALID_LABELS = ("benign", "malignant")


def _iso(value: dt.datetime | None) -> str | None:
    return None if value is None else value.isoformat() + "Z"


def result_rows(store: Store, since: dt.datetime | None = None) -> list[dict[str, Any]]:
    outcomes = store.outcomes()
    rows = []
    for r in store.all_images(since):
        rows.append(
            {
                "id": r.id,
                "filename": r.filename,
                "sha256": r.sha256,
                "size_bytes": r.size_bytes,
                "status": r.status,
                "score": r.score,
                "label": r.label,
                "threshold": r.threshold,
                "model_version": r.model_version,
                "received_at": _iso(r.received_at),
                "scored_at": _iso(r.scored_at),
                "error": r.error,
                "duplicate_of": r.duplicate_of,
                "final_path": r.final_path,
                "outcome": outcomes.get(r.sha256),
                "patient_id": r.patient_id,
                "study_uid": r.study_uid,
                "laterality": r.laterality,
                "view": r.view,
                "sop_instance_uid": r.sop_instance_uid,
            }
        )
    return rows


def format_rows(
    rows: list[dict[str, Any]], fmt: str, columns: tuple[str, ...] = RESULT_COLUMNS
) -> str:
    """JSON (every key of each row) or CSV (exactly `columns`, in that order)."""
    if fmt == "json":
        return json.dumps(rows, indent=2)
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=columns, lineterminator="\n", extrasaction="ignore")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: "" if row[k] is None else row[k] for k in columns})
    return buf.getvalue()


class OutcomeFileError(ValueError):
    pass


@dataclass
class ImportSummary:
    matched: int = 0
    updated: int = 0
    unmatched: list[str] = field(default_factory=list)
    invalid: list[str] = field(default_factory=list)


def _normalise_label(value: str) -> str | None:
    v = value.strip().lower()
    aliases = {
        "1": "malignant",
        "0": "benign",
        "cancer": "malignant",
        "positive": "malignant",
        "negative": "benign",
    }
    v = aliases.get(v, v)
    return v if v in VALID_LABELS else None


def import_outcomes(store: Store, csv_path: Path) -> ImportSummary:
    """Record true labels from a CSV with `label` and `filename` and/or `sha256` columns.

    A filename matches an image whose recorded name (relative to the inbox) or base name is
    equal; rows that match nothing are reported, never silently dropped.
    """
    try:
        text = csv_path.read_text(encoding="utf-8-sig")
    except OSError as exc:
        raise OutcomeFileError(f"cannot read outcomes file {csv_path}: {exc.strerror}") from None
    reader = csv.DictReader(io.StringIO(text))
    cols = set(reader.fieldnames or [])
    if "label" not in cols or not cols & {"filename", "sha256"}:
        raise OutcomeFileError(
            f"{csv_path}: needs a 'label' column and a 'filename' or 'sha256' column, "
            f"found {sorted(cols)}"
        )
    summary = ImportSummary()
    with store.write() as s:
        by_sha = {sha for (sha,) in s.execute(select(ImageRecord.sha256))}
        by_name: dict[str, set[str]] = {}
        for name, sha in s.execute(select(ImageRecord.filename, ImageRecord.sha256)):
            by_name.setdefault(name, set()).add(sha)
            by_name.setdefault(Path(name).name, set()).add(sha)
        now = utcnow()
        for line_no, row in enumerate(reader, start=2):
            key = (row.get("sha256") or "").strip().lower() or (row.get("filename") or "").strip()
            label = _normalise_label(row.get("label") or "")
            if label is None:
                summary.invalid.append(f"line {line_no}: label {row.get('label')!r}")
                continue
            sha = (row.get("sha256") or "").strip().lower()
            shas = {sha} & by_sha if sha else set()
            if not shas and row.get("filename"):
                name = row["filename"].strip()
                shas = by_name.get(name) or by_name.get(Path(name).name) or set()
            if not shas:
                summary.unmatched.append(key)
                continue
            summary.matched += 1
            for digest in shas:
                existing = s.get(Outcome, digest)
                if existing is None:
                    s.add(
                        Outcome(sha256=digest, label=label, source=csv_path.name, imported_at=now)
                    )
                elif existing.label != label or existing.source != csv_path.name:
                    existing.label, existing.source, existing.imported_at = (
                        label,
                        csv_path.name,
                        now,
                    )
                summary.updated += 1
    return summary
