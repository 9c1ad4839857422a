"""`screen outcomes import`: one vocabulary, all or nothing, no silent overwrite, a history."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from sqlalchemy import func, select

from tests.conftest import REPO
from worker.audit.outcome_labels import OUTCOME_LABELS, describe_vocabulary
from worker.audit.outcomes import OutcomeConflictError, OutcomeFileError, import_outcomes
from worker.records.clock import utcnow
from worker.records.models import ImageRecord, OutcomeChange
from worker.records.store import ImageStatus, Store
from worker.results.listing import outcome_history

SHA = {name: name[0] * 64 for name in ("a.png", "b.png", "c.png")}


def _store(tmp_path: Path) -> Store:
    store = Store(f"sqlite:///{tmp_path / 'o.db'}")
    with store.write() as s:
        for name, sha in SHA.items():
            s.add(
                ImageRecord(
                    filename=name, source_path=f"/inbox/{name}", sha256=sha,
                    status=ImageStatus.SCORED,
                    received_at=utcnow(), score=0.5, attempts=1,
                )
            )
    return store


def _csv(tmp_path: Path, text: str, name: str = "truth.csv") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def test_every_alias_maps_to_its_label(tmp_path: Path) -> None:
    store = _store(tmp_path)
    words = [(w, label) for label, aliases in OUTCOME_LABELS.items() for w in (label, *aliases)]
    for word, label in words:
        assert import_outcomes(store, _csv(tmp_path, f"filename,label\na.png, {word.upper()}\n"),
                               replace=True)
        assert store.outcomes()[SHA["a.png"]] == label
    store.dispose()


def test_an_invalid_row_fails_the_import_with_its_line_and_records_nothing(tmp_path: Path) -> None:
    store = _store(tmp_path)
    bad = _csv(tmp_path, "filename,label\na.png,malignant\nb.png,maybe\n,benign\nc.png,benign\n")
    with pytest.raises(OutcomeFileError) as err:
        import_outcomes(store, bad)
    message = str(err.value)
    assert "2 invalid row(s), nothing imported" in message
    assert "line 3: label 'maybe'" in message and "line 4: no filename or sha256" in message
    assert store.outcomes() == {}

    summary = import_outcomes(store, bad, skip_invalid=True)
    assert summary.invalid == [
        "line 3: label 'maybe' is not in the vocabulary",
        "line 4: no filename or sha256",
    ]
    assert summary.added == 2
    assert store.outcomes() == {SHA["a.png"]: "malignant", SHA["c.png"]: "benign"}
    store.dispose()


def test_a_conflicting_reimport_is_refused_unless_replace_and_kept_in_history(
    tmp_path: Path,
) -> None:
    store = _store(tmp_path)
    first = import_outcomes(store, _csv(tmp_path, "filename,label\na.png,benign\nb.png,benign\n"))
    assert (first.added, first.replaced, first.unchanged) == (2, 0, 0)

    again = import_outcomes(store, _csv(tmp_path, "filename,label\na.png,0\nb.png,benign\n"))
    assert (again.added, again.replaced, again.unchanged, again.updated) == (0, 0, 2, 0)

    changed = _csv(tmp_path, "filename,label\nb.png,benign\na.png,malignant\n", "revised.csv")
    with pytest.raises(OutcomeConflictError) as err:
        import_outcomes(store, changed)
    assert "line 3: a.png is recorded as benign, the file says malignant" in str(err.value)
    assert store.outcomes()[SHA["a.png"]] == "benign"

    summary = import_outcomes(store, changed, replace=True)
    assert (summary.added, summary.replaced, summary.unchanged) == (0, 1, 1)
    assert store.outcomes()[SHA["a.png"]] == "malignant"
    history = outcome_history(store, SHA["a.png"])
    assert [(h["label"], h["previous_label"], h["source"]) for h in history] == [
        ("benign", None, "truth.csv line 2"),
        ("malignant", "benign", "revised.csv line 3"),
    ]
    with store.read() as s:
        assert s.scalar(select(func.count()).select_from(OutcomeChange)) == 3  # a, b, then a
    store.dispose()


def test_a_file_that_contradicts_itself_is_refused(tmp_path: Path) -> None:
    store = _store(tmp_path)
    text = f"sha256,filename,label\n{SHA['a.png']},,malignant\n,a.png,benign\n"
    with pytest.raises(OutcomeFileError, match="line 3: a.png is benign, line 2 said malignant"):
        import_outcomes(store, _csv(tmp_path, text), replace=True)
    assert store.outcomes() == {}
    store.dispose()


def test_cli_messages(tmp_path: Path) -> None:
    _store(tmp_path).dispose()
    url = f"sqlite:///{tmp_path / 'o.db'}"
    run = [sys.executable, "-m", "worker", "outcomes", "import", "--database", url]

    def screen(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([*run, *args], cwd=tmp_path, capture_output=True, text=True,
                              timeout=120)

    bad = _csv(tmp_path, "filename,label\na.png,malignant\nb.png,maybe\n")
    proc = screen(str(bad))
    assert proc.returncode == 1 and len(proc.stderr.strip().splitlines()) == 1
    assert "line 3: label 'maybe'" in proc.stderr and "nothing imported" in proc.stderr

    proc = screen("--skip-invalid", str(bad))
    assert proc.returncode == 0, proc.stderr
    assert "recorded 1 new outcome(s)" in proc.stdout
    assert "skipped 1 invalid row(s)" in proc.stderr and "line 3" in proc.stderr

    proc = screen(str(_csv(tmp_path, "filename,label\na.png,cancer\n")))
    assert proc.returncode == 0 and "nothing changed" in proc.stdout

    proc = screen(str(_csv(tmp_path, "filename,label\na.png,benign\n")))
    assert proc.returncode == 1 and "--replace" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1

    proc = screen("--replace", str(_csv(tmp_path, "filename,label\na.png,benign\n")))
    assert proc.returncode == 0 and "replaced 1" in proc.stdout

    helptext = subprocess.run([*run[:5], "--help"], capture_output=True, text=True).stdout
    readme = (REPO / "README.md").read_text()

    assert describe_vocabulary() in " ".join(helptext.split())
    assert describe_vocabulary() in readme, "the README must list the same vocabulary"
