"""`screen outcomes import`: the biopsy outcomes the audit judges the scores against.

A CSV with a `label` column (the vocabulary of worker/audit/outcome_labels.py) and a
`filename` and/or `sha256` column, recorded all or nothing. Every change is kept in the
`outcome_changes` history.
"""

from __future__ import annotations

import csv
import io
from dataclasses import dataclass, field
from pathlib import Path

from sqlalchemy import select
from sqlalchemy.orm import Session

from worker.audit.outcome_labels import OUTCOME_LABELS, describe_vocabulary
from worker.records.clock import utcnow
from worker.records.models import ImageRecord, Outcome, OutcomeChange
from worker.records.store import Store

_LABEL_OF = {
    word: label for label, aliases in OUTCOME_LABELS.items() for word in (label, *aliases)
}


class OutcomeFileError(ValueError):
    """An outcomes file that cannot be imported as it is; nothing was recorded."""


class OutcomeConflictError(OutcomeFileError):
    """Rows that would change recorded outcomes, without --replace; nothing was recorded."""


@dataclass
class ImportSummary:
    matched: int = 0  # rows that matched at least one screened image
    added: int = 0  # outcomes recorded for the first time
    replaced: int = 0  # outcomes changed (with replace=True); the old ones stay in the history
    unchanged: int = 0  # already recorded with the same label
    unmatched: list[str] = field(default_factory=list)
    invalid: list[str] = field(default_factory=list)  # rows skipped (skip_invalid=True)

    @property
    def updated(self) -> int:
        return self.added + self.replaced


@dataclass(frozen=True)
class _Row:
    line: int
    key: str  # what the row names: its sha256, else its filename
    sha256: str
    filename: str
    label: str


def _normalise_label(value: str) -> str | None:
    return _LABEL_OF.get(value.strip().lower())


def _read_rows(csv_path: Path) -> tuple[list[_Row], list[str]]:
    """The file's rows, and a description of each invalid one (with its line number)."""
    try:
        text = csv_path.read_text(encoding="utf-8-sig")
    except OSError as exc:
        raise OutcomeFileError(f"cannot read outcomes file {csv_path}: {exc.strerror}") from None
    except UnicodeDecodeError:
        raise OutcomeFileError(f"outcomes file {csv_path} is not UTF-8 text") from None
    reader = csv.DictReader(io.StringIO(text))
    cols = set(reader.fieldnames or [])
    if "label" not in cols or not cols & {"filename", "sha256"}:
        raise OutcomeFileError(
            f"{csv_path}: needs a 'label' column and a 'filename' or 'sha256' column, "
            f"found {sorted(cols)}"
        )
    rows: list[_Row] = []
    invalid: list[str] = []
    for row in reader:
        line = reader.line_num
        sha = (row.get("sha256") or "").strip().lower()
        name = (row.get("filename") or "").strip()
        raw_label = row.get("label") or ""
        label = _normalise_label(raw_label)
        if label is None:
            invalid.append(f"line {line}: label {raw_label.strip()!r} is not in the vocabulary")
        elif not sha and not name:
            invalid.append(f"line {line}: no filename or sha256")
        else:
            rows.append(_Row(line, sha or name, sha, name, label))
    return rows, invalid


def _listing(items: list[str], limit: int = 5) -> str:
    more = f"; and {len(items) - limit} more" if len(items) > limit else ""
    return "; ".join(items[:limit]) + more


def _match(s: Session, rows: list[_Row], summary: ImportSummary
           ) -> tuple[dict[str, _Row], list[str]]:
    """sha256 -> the row that gives its label, and the rows that contradict an earlier one.
    A row's sha256 matches the image with that content; its filename an image whose recorded
    name (relative to the inbox) or base name is equal. Rows that match nothing are added to
    ``summary.unmatched``."""
    by_sha = {sha for (sha,) in s.execute(select(ImageRecord.sha256))}
    by_name: dict[str, set[str]] = {}
    for name, sha in s.execute(select(ImageRecord.filename, ImageRecord.sha256)):
        if sha is None:
            continue  # never read, so no content to attach an outcome to
        by_name.setdefault(name, set()).add(sha)
        by_name.setdefault(Path(name).name, set()).add(sha)
    wanted: dict[str, _Row] = {}
    clashes: list[str] = []
    for row in rows:
        shas = {row.sha256} & by_sha if row.sha256 else set()
        if not shas and row.filename:
            shas = by_name.get(row.filename) or by_name.get(Path(row.filename).name) or set()
        if not shas:
            summary.unmatched.append(row.key)
            continue
        summary.matched += 1
        for digest in sorted(shas):
            earlier = wanted.setdefault(digest, row)
            if earlier.label != row.label:
                clashes.append(
                    f"line {row.line}: {row.key} is {row.label}, "
                    f"line {earlier.line} said {earlier.label}"
                )
    return wanted, clashes


def _record(s: Session, wanted: dict[str, _Row], existing: dict[str, Outcome], csv_path: Path,
            summary: ImportSummary) -> None:
    """Each wanted label that is new or changed, with its change in the history."""
    now = utcnow()
    for sha, row in wanted.items():
        old = existing.get(sha)
        if old is not None and old.label == row.label:
            summary.unchanged += 1
            continue
        source = f"{csv_path.name} line {row.line}"
        s.add(
            OutcomeChange(
                sha256=sha,
                label=row.label,
                previous_label=None if old is None else old.label,
                source=source,
                at=now,
            )
        )
        if old is None:
            s.add(Outcome(sha256=sha, label=row.label, source=csv_path.name, imported_at=now))
            summary.added += 1
        else:
            old.label, old.source, old.imported_at = row.label, csv_path.name, now
            summary.replaced += 1


def import_outcomes(
    store: Store, csv_path: Path, skip_invalid: bool = False, replace: bool = False
) -> ImportSummary:
    """Record true labels from a CSV with `label` and `filename` and/or `sha256` columns.

    All or nothing, in one transaction: an invalid row (a label outside OUTCOME_LABELS, no
    filename or sha256) fails the import unless `skip_invalid`, and a row that would change an
    outcome already recorded fails it unless `replace`. Every change is appended to the
    `outcome_changes` history, so a replaced label is never lost. A filename matches an image
    whose recorded name (relative to the inbox) or base name is equal; rows that match nothing
    are reported, never silently dropped.
    """
    rows, invalid = _read_rows(csv_path)
    if invalid and not skip_invalid:
        raise OutcomeFileError(
            f"{csv_path}: {len(invalid)} invalid row(s), nothing imported: {_listing(invalid)} "
            f"(labels: {describe_vocabulary()}; --skip-invalid skips such rows)"
        )
    summary = ImportSummary(invalid=invalid)
    with store.write() as s:
        wanted, clashes = _match(s, rows, summary)
        if clashes:  # the file contradicts itself: no flag makes that right
            raise OutcomeFileError(
                f"{csv_path}: {len(clashes)} row(s) contradict earlier rows, nothing imported: "
                f"{_listing(clashes)}"
            )
        existing = {
            o.sha256: o for o in s.scalars(select(Outcome).where(Outcome.sha256.in_(wanted)))
        }
        conflicts = [
            f"line {row.line}: {row.key} is recorded as {existing[sha].label}, "
            f"the file says {row.label}"
            for sha, row in wanted.items()
            if sha in existing and existing[sha].label != row.label
        ]
        if conflicts and not replace:
            raise OutcomeConflictError(
                f"{csv_path}: {len(conflicts)} row(s) would change recorded outcomes, nothing "
                f"imported: {_listing(conflicts)} (--replace replaces them; the old labels "
                "stay in the history)"
            )
        _record(s, wanted, existing, csv_path, summary)
    return summary
