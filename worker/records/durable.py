"""Durable, all-or-nothing files: what the outbox and the DICOM receiver write.

A file is written under a temporary name in its final folder, fsynced, then given its final
name by a hard link, which fails if the name exists (a rename would silently replace it), and
the folder is fsynced so that the name survives a power cut too. A reader watching the folder
therefore never sees half a file, and of two writers racing for one name exactly one gets it;
the other finds the file there and decides what it means (the same content: done; other
content: another name).

A file system without hard links (FAT, some network shares) answers the link with one of
:data:`NO_HARD_LINKS`; there the name is checked, then the temporary file renamed (atomic for
the content; only a writer taking the same name between the check and the rename could be
replaced). Any other error of the link (a full disk, no permission, another device) is raised:
a rename would not do better.
"""

from __future__ import annotations

import errno
import os
import secrets
from collections.abc import Callable, Iterable
from pathlib import Path

# What link(2) answers where the file system has no hard links (EPERM: Linux on FAT; ENOTSUP,
# EOPNOTSUPP, ENOSYS: some network and FUSE file systems), or none left (EMLINK).
NO_HARD_LINKS = frozenset({errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.ENOSYS,
                           errno.EMLINK})


def temp_path(folder: Path, prefix: str, suffix: str) -> Path:
    """A fresh temporary name in `folder`: `prefix`, this process's id, a random part, `suffix`
    (the id lets a clean-up tell a dead writer's leftovers from a live one's)."""
    return folder / f"{prefix}{os.getpid()}-{secrets.token_hex(6)}{suffix}"


def remove_dead_temps(folder: Path, prefix: str, suffix: str) -> int:
    """Delete the temporary files (:func:`temp_path`'s names with `prefix` and `suffix`) that
    writers left in `folder` when they died mid-write (their pid is gone); returns how many."""
    removed = 0
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return 0
    for entry in entries:
        name = entry.name
        if not (name.startswith(prefix) and name.endswith(suffix)):
            continue
        pid_text = name[len(prefix) :].split("-", 1)[0]
        if not pid_text.isdigit() or _pid_alive(int(pid_text)):
            continue
        try:
            os.unlink(entry.path)
            removed += 1
        except OSError:
            pass
    return removed


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def write_temp(path: Path, data: bytes) -> None:
    """Create `path` (never an existing file), write all of `data` and fsync it; on any failure
    nothing is left at `path`."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        os.fsync(fd)  # the bytes are on disk before the file has a name anyone reads
    except BaseException:
        os.close(fd)
        path.unlink(missing_ok=True)
        raise
    os.close(fd)


def link_new(tmp: Path, dest: Path) -> bool:
    """Give the finished file `tmp` the name `dest` unless that name exists (then False, and
    `dest` untouched). After a link `tmp` keeps its name too; after the fallback rename it is
    gone: the caller removes it either way (``unlink(missing_ok=True)``)."""
    try:
        os.link(tmp, dest)  # atomic, and refuses to replace an existing name
        return True
    except FileExistsError:
        return False
    except OSError as exc:
        if exc.errno not in NO_HARD_LINKS:
            raise
    if os.path.lexists(dest):  # lexists: a dangling symbolic link is a taken name too
        return False
    os.rename(tmp, dest)
    return True


def fsync_dir(folder: Path) -> None:
    """Make the names in `folder` durable (a new name is an entry of its folder)."""
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def place(tmp: Path, names: Iterable[Path], same: Callable[[Path], bool]
          ) -> tuple[Path, bool] | None:
    """Give the durable file `tmp` the first of `names` that is free, or settle on one that
    already holds the same content (`same(name)`, which may raise FileNotFoundError when the
    file went away meanwhile: the name, free again, is tried again). Returns the name and whether it
    was written now (False: an identical file was there), or None when every name holds
    something else."""
    for name in names:
        while True:
            if link_new(tmp, name):
                fsync_dir(name.parent)
                return name, True
            try:
                if same(name):
                    return name, False
            except FileNotFoundError:
                if not os.path.lexists(name):  # not a dangling symbolic link: really gone
                    continue  # taken away (the worker moved it): the name is free again
            break
    return None


def write_new(data: bytes, tmp: Path, names: Iterable[Path], same: Callable[[Path], bool]
              ) -> tuple[Path, bool] | None:
    """`data` durably under the first free name of `names` (see :func:`place`), through the
    temporary file `tmp` in the same folder, which is gone afterwards whatever happens."""
    write_temp(tmp, data)
    try:
        return place(tmp, names, same)
    finally:
        tmp.unlink(missing_ok=True)


def write_atomically(dest: Path, data: bytes, alternative: str) -> Path:
    """Write `data` durably to `dest` (a document: the outbox's, a result for a PACS).

    If `dest` already holds the same bytes (a retry after a crash, or another worker that wrote
    the same owed document first), that is success and nothing is written; if it holds
    something else, the document goes to `<stem>.<alternative><suffix>` instead: an existing
    document is never replaced. The temporary file is a dot-name, so readers that skip hidden
    files never pick up a partial document.
    """
    dest.parent.mkdir(parents=True, exist_ok=True)
    names = (dest, dest.with_name(f"{dest.stem}.{alternative}{dest.suffix}"))
    for name in names:
        if _holds(name, data):
            return name
    placed = write_new(data, temp_path(dest.parent, f".{dest.name}.", ".tmp"), names,
                       lambda name: _holds(name, data))
    if placed is None:
        raise FileExistsError(f"outbox document exists with other content: {dest}")
    return placed[0]


def _holds(path: Path, data: bytes) -> bool:
    try:
        return path.read_bytes() == data
    except OSError:
        return False
