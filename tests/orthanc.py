"""A real PACS for the tests: Debian's `orthanc`, run in a temporary folder on loopback ports,
spoken to through its REST API (with the standard library: no HTTP client dependency), and
`dciodvfy` (Debian's `dicom3tools`), the IOD checker. Without them the tests that need them
skip, naming the package; under CI (`CI` set) that is a failure, as with
tests/conftest.py `require_programs`."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import time
import urllib.request
from pathlib import Path
from typing import Any

import pytest

AE_TITLE = "ORTHANC"


def _missing(package: str, what: str) -> None:
    why = f"{what} not found: apt-get install {package}"
    if os.environ.get("CI"):
        raise RuntimeError(why)
    pytest.skip(why, allow_module_level=True)


def orthanc_program() -> str:
    """Debian installs Orthanc in /usr/sbin, which is not on every user's PATH."""
    found = shutil.which("Orthanc") or ("/usr/sbin/Orthanc"
                                        if Path("/usr/sbin/Orthanc").exists() else None)
    if found is None:
        _missing("orthanc", "Orthanc")
    return str(found)


def dciodvfy_program() -> str:
    found = shutil.which("dciodvfy")
    if found is None:
        _missing("dicom3tools", "dciodvfy")
    return str(found)


def dciodvfy_errors(path: Path) -> list[str]:
    """dciodvfy's `Error` lines for one file (warnings are not errors)."""
    out = subprocess.run([dciodvfy_program(), str(path)], capture_output=True, text=True,
                         timeout=120)
    return [ln for ln in (out.stdout + out.stderr).splitlines() if ln.startswith("Error")]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Orthanc:
    """One Orthanc server: `start`, `stop` (its storage stays), `start` again."""

    def __init__(self, folder: Path, modalities: dict[str, tuple[str, int]]) -> None:
        self.folder = folder
        self.http_port, self.dicom_port = free_port(), free_port()
        folder.mkdir(parents=True, exist_ok=True)
        self.config = folder / "orthanc.json"
        self.config.write_text(json.dumps({
            "Name": "mammo-screen-test",
            "StorageDirectory": str(folder / "storage"),
            "IndexDirectory": str(folder / "storage"),
            "HttpPort": self.http_port,
            "DicomPort": self.dicom_port,
            "DicomAet": AE_TITLE,
            "RemoteAccessAllowed": False,
            "AuthenticationEnabled": False,
            "DicomModalities": {name: [ae, "127.0.0.1", port]
                                for name, (ae, port) in modalities.items()},
            "Plugins": [],
            "StableAge": 1,
        }))
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    def start(self, timeout: float = 60.0) -> None:
        log = (self.folder / "orthanc.log").open("ab")
        self.proc = subprocess.Popen([orthanc_program(), str(self.config)], stdout=log,
                                     stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, (self.folder / "orthanc.log").read_text()
            try:
                self.get("/system")
                return
            except OSError:
                time.sleep(0.1)
        raise AssertionError("Orthanc did not start")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(60)
        self.proc = None

    def _call(self, method: str, path: str, body: bytes | None = None,
              content_type: str = "application/json") -> Any:
        req = urllib.request.Request(self.url + path, data=body, method=method,
                                     headers={"Content-Type": content_type})
        with urllib.request.urlopen(req, timeout=120) as resp:
            data = resp.read()
        return json.loads(data) if data[:1] in (b"{", b"[") else data

    def get(self, path: str) -> Any:
        return self._call("GET", path)

    def post(self, path: str, payload: Any) -> Any:
        return self._call("POST", path, json.dumps(payload).encode())

    def upload(self, data: bytes) -> dict[str, Any]:
        answer: dict[str, Any] = self._call("POST", "/instances", data, "application/dicom")
        return answer

    def study_id(self, study_uid: str) -> str | None:
        found = self.post("/tools/find", {"Level": "Study",
                                          "Query": {"StudyInstanceUID": study_uid}})
        return found[0] if found else None

    def instances(self, study_uid: str) -> list[dict[str, Any]]:
        """Every instance of the study, with its main tags (SOPClassUID, SOPInstanceUID...)."""
        study = self.study_id(study_uid)
        if study is None:
            return []
        out = []
        for inst in self.get(f"/studies/{study}/instances"):
            tags = self.get(f"/instances/{inst['ID']}/simplified-tags")
            out.append({"id": inst["ID"], **tags})
        return out

    def file(self, instance_id: str) -> bytes:
        data: bytes = self._call("GET", f"/instances/{instance_id}/file")
        return data

    def send_study(self, modality: str, study_uid: str) -> None:
        """Route a study to a modality (C-STORE from Orthanc), waiting until it is done."""
        study = self.study_id(study_uid)
        assert study is not None, study_uid
        self.post(f"/modalities/{modality}/store", {"Resources": [study], "Synchronous": True})
