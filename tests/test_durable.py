"""Durable files (worker/records/durable.py): a reader never sees half a file, an existing file
is never replaced, and the temporary file is gone however it ends. Real files in tmp folders;
a file system without hard links (FAT, some network shares) cannot be mounted here, so its
answer to link(2) (EPERM on Linux's FAT) is given by replacing `os.link` for those tests."""

from __future__ import annotations

import errno
import os
import subprocess
import sys
from pathlib import Path

import pytest

from worker.records.durable import (
    link_new,
    place,
    remove_dead_temps,
    temp_path,
    write_atomically,
    write_new,
    write_temp,
)


def _no_hard_links(monkeypatch: pytest.MonkeyPatch, code: int = errno.EPERM) -> list[Path]:
    calls: list[Path] = []

    def link(src: object, dst: object) -> None:
        calls.append(Path(str(dst)))
        raise OSError(code, os.strerror(code))

    monkeypatch.setattr(os, "link", link)
    return calls


def _same(data: bytes):  # noqa: ANN202
    return lambda p: p.read_bytes() == data


def test_outbox_write_is_atomic_and_never_replaces_another_document(tmp_path: Path) -> None:
    dest = tmp_path / "out" / "S1.001.json"
    assert write_atomically(dest, b'{"a": 1}\n', "r1") == dest
    assert write_atomically(dest, b'{"a": 1}\n', "r1") == dest  # a retry: same bytes, done
    other = write_atomically(dest, b'{"a": 2}\n', "r7")
    assert other.name == "S1.001.r7.json" and dest.read_bytes() == b'{"a": 1}\n'
    with pytest.raises(FileExistsError):
        write_atomically(dest, b'{"a": 3}\n', "r7")
    assert sorted(p.name for p in dest.parent.iterdir()) == ["S1.001.json", "S1.001.r7.json"]


def test_a_document_written_meanwhile_by_another_worker_is_not_replaced(tmp_path: Path) -> None:
    """Two workers racing on one owed document: the one that names its file second finds the
    name taken and leaves the first file in place (same inode: a reader watching the folder
    sees one document, not two), and its temp file is gone."""
    dest = tmp_path / "S1.001.json"
    dest.write_bytes(b'{"a": 1}\n')
    before = dest.stat().st_ino
    tmp = tmp_path / ".S1.001.json.99.tmp"
    assert write_new(b'{"a": 1}\n', tmp, [dest], _same(b'{"a": 1}\n')) == (dest, False)
    assert dest.stat().st_ino == before and not tmp.exists()
    fresh = tmp_path / ".S2.001.json.99.tmp"
    assert write_new(b'{"b": 2}\n', fresh, [tmp_path / "S2.001.json"], _same(b"")) == (
        tmp_path / "S2.001.json", True)
    assert (tmp_path / "S2.001.json").read_bytes() == b'{"b": 2}\n' and not fresh.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["S1.001.json", "S2.001.json"]


def test_other_content_under_a_name_moves_on_to_the_next(tmp_path: Path) -> None:
    (tmp_path / "a.dcm").write_bytes(b"other")
    names = [tmp_path / "a.dcm", tmp_path / "a-1.dcm"]
    assert write_new(b"mine", temp_path(tmp_path, ".t-", ".part"), names, _same(b"mine")) == (
        tmp_path / "a-1.dcm", True)
    assert (tmp_path / "a.dcm").read_bytes() == b"other"
    assert write_new(b"third", temp_path(tmp_path, ".t-", ".part"), names, _same(b"third")) is None
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a-1.dcm", "a.dcm"]  # no temp left


def test_a_name_freed_meanwhile_is_tried_again(tmp_path: Path) -> None:
    """The receiver's case: the file under the name is taken away (the worker moved it) while
    it is compared; the name is free again and gets the new file."""
    name = tmp_path / "u.dcm"
    name.write_bytes(b"earlier")

    def same(p: Path) -> bool:
        p.unlink()  # as the worker moves it away
        return p.read_bytes() == b"new"

    tmp = tmp_path / ".t.part"
    assert write_new(b"new", tmp, [name, tmp_path / "u-1.dcm"], same) == (name, True)
    assert name.read_bytes() == b"new" and not tmp.exists()


def test_without_hard_links_the_file_is_renamed_and_never_replaces_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls = _no_hard_links(monkeypatch)
    dest = tmp_path / "S1.001.json"
    assert write_atomically(dest, b"one", "r1") == dest and dest.read_bytes() == b"one"
    other = write_atomically(dest, b"two", "r2")
    assert other.name == "S1.001.r2.json" and dest.read_bytes() == b"one"
    assert other.read_bytes() == b"two" and calls  # the link was tried, the rename did it
    # A dangling symbolic link is a taken name too: never replaced by the rename.
    (tmp_path / "gone.json").symlink_to(tmp_path / "nowhere")
    tmp = tmp_path / ".gone.tmp"
    write_temp(tmp, b"three")
    assert link_new(tmp, tmp_path / "gone.json") is False
    assert (tmp_path / "gone.json").is_symlink() and tmp.read_bytes() == b"three"
    assert place(tmp, [tmp_path / "gone.json", tmp_path / "gone-1.json"], _same(b"three")) == (
        tmp_path / "gone-1.json", True)
    assert not tmp.exists()  # renamed: the temporary name is gone with it


@pytest.mark.parametrize("code", [errno.ENOTSUP, errno.EOPNOTSUPP, errno.ENOSYS, errno.EMLINK])
def test_every_answer_of_a_file_system_without_links_falls_back(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, code: int
) -> None:
    _no_hard_links(monkeypatch, code)
    assert write_atomically(tmp_path / "d.json", b"x", "r1").read_bytes() == b"x"


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EACCES, errno.EXDEV, errno.EROFS])
def test_another_link_error_is_raised_and_leaves_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, code: int
) -> None:
    """A full disk, no permission, another device: a rename would not do better, so the error
    is the caller's (the outbox retries, the receiver answers out of resources)."""
    _no_hard_links(monkeypatch, code)
    with pytest.raises(OSError) as raised:
        write_atomically(tmp_path / "d.json", b"x", "r1")
    assert raised.value.errno == code
    assert list(tmp_path.iterdir()) == []


def test_a_failed_write_leaves_no_temporary_file(tmp_path: Path) -> None:
    tmp = temp_path(tmp_path, ".receive-", ".part")
    assert tmp.name.startswith(f".receive-{os.getpid()}-") and tmp.suffix == ".part"
    with pytest.raises(TypeError):
        write_temp(tmp, "not bytes")  # type: ignore[arg-type]
    assert not tmp.exists()
    write_temp(tmp, b"x")
    with pytest.raises(FileExistsError):  # a temporary name is never reused
        write_temp(tmp, b"y")
    assert tmp.read_bytes() == b"x"


def test_temporary_files_of_dead_writers_are_removed(tmp_path: Path) -> None:
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    mine = temp_path(tmp_path, ".receive-", ".part")  # this process's: alive
    mine.write_bytes(b"x")
    theirs = tmp_path / f".receive-{dead.pid}-abc.part"
    other = tmp_path / "image.dcm"
    for p in (theirs, other):
        p.write_bytes(b"x")
    assert remove_dead_temps(tmp_path, ".receive-", ".part") == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([mine.name, other.name])
