"""The log is one line per event: a library's warning (pydicom's on a malformed header) too."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from tests.conftest import run_screen
from tests.dicom_files import dicom_bytes, mammo_like


def test_a_pydicom_warning_is_one_log_line(workdir: Path) -> None:
    # A Patient ID over LO's 64 characters: pydicom warns as it reads the header.
    with pytest.warns(UserWarning, match="exceeds the maximum length"):  # as it writes, too
        data = dicom_bytes(mammo_like(), PatientID="P" * 70)
    (workdir / "inbox" / "long-id.dcm").write_bytes(data)
    proc = run_screen("process", "--timeout", "30", config=workdir / "config.toml")
    assert proc.returncode == 0, proc.stderr
    lines = proc.stderr.splitlines()
    stamped = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d+ [A-Z]+ ")
    assert [ln for ln in lines if not stamped.match(ln) and not ln.startswith("processed ")] == []
    (warning,) = [ln for ln in lines if "warning category=" in ln]
    assert re.search(r"WARNING warning category=UserWarning source=pydicom/\S+:\d+ message=The "
                     r"value length \(70\) exceeds the maximum length of 64", warning), warning
