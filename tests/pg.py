"""A real PostgreSQL server for the tests: Debian's `postgresql` package, started fresh per test
session in a temporary folder, listening on a Unix socket only, stopped at the end.

initdb refuses to run as root, so under root (CI) the server runs as the package's own
`postgres` user. Without the server programs (a machine with only Python) the tests that need
it skip with the package to install; under CI (`CI` set) that is a failure instead, as with
tests/conftest.py `require_programs`.
"""

from __future__ import annotations

import glob
import itertools
import os
import pwd
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

_counter = itertools.count(1)


def server_bin() -> Path | None:
    """The folder with initdb and pg_ctl: Debian keeps them off PATH, per major version."""
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"),
                   key=lambda p: int(Path(p).parts[-3]) if Path(p).parts[-3].isdigit() else 0)
    if found:
        return Path(found[-1]).parent
    which = shutil.which("initdb")
    return Path(which).resolve().parent if which else None


def _need_server() -> Path:
    folder = server_bin()
    if folder is not None and (folder / "pg_ctl").exists():
        return folder
    why = "PostgreSQL server (initdb, pg_ctl) not found: apt-get install postgresql"
    if os.environ.get("CI"):
        raise RuntimeError(why)
    pytest.skip(why)


class PostgresServer:
    """One initdb'd cluster on a Unix socket in a fresh folder; databases made on demand."""

    def __init__(self, folder: Path, bin_dir: Path) -> None:
        self.folder = folder
        self.bin = bin_dir
        self.data = folder / "data"
        self.socket_dir = folder
        self.user = "postgres"
        self._as: list[str] = []
        if os.geteuid() == 0:
            # initdb refuses root: run the server as the package's own user.
            self._as = ["runuser", "-u", "postgres", "--"]
            entry = pwd.getpwnam("postgres")
            os.chown(folder, entry.pw_uid, entry.pw_gid)
        else:
            self.user = pwd.getpwuid(os.geteuid()).pw_name

    def _run(self, *args: str) -> None:
        subprocess.run([*self._as, *args], check=True, capture_output=True, text=True,
                       cwd=self.folder)

    def start(self) -> None:
        self._run(str(self.bin / "initdb"), "-D", str(self.data), "-U", self.user,
                  "--auth=trust", "-E", "UTF8", "--no-sync")
        options = (f"-k {self.socket_dir} -c listen_addresses='' -c fsync=off "
                   "-c max_connections=200")
        self._run(str(self.bin / "pg_ctl"), "-D", str(self.data), "-l",
                  str(self.folder / "server.log"), "-o", options, "-w", "start")

    def stop(self) -> None:
        subprocess.run([*self._as, str(self.bin / "pg_ctl"), "-D", str(self.data), "-m",
                        "immediate", "-w", "stop"], capture_output=True, cwd=self.folder)

    def url(self, database: str) -> str:
        return f"postgresql+psycopg://{self.user}@/{database}?host={self.socket_dir}"

    def new_database(self) -> str:
        """A fresh, empty database; its SQLAlchemy URL."""
        import psycopg  # the [postgres] extra, in [test] too

        name = f"t{os.getpid()}_{next(_counter)}"
        with psycopg.connect(host=str(self.socket_dir), user=self.user, dbname="postgres",
                             autocommit=True) as con:
            con.execute(f'CREATE DATABASE "{name}"')
        return self.url(name)


def postgres_server() -> Iterator[PostgresServer]:
    """The session fixture's body (see tests/conftest.py `postgres`)."""
    bin_dir = _need_server()
    # Not under pytest's tmp folder: that is private to root, and the server runs as postgres.
    folder = Path(tempfile.mkdtemp(prefix="mammo-pg-"))
    server = PostgresServer(folder, bin_dir)
    try:
        server.start()
        yield server
    finally:
        server.stop()
        shutil.rmtree(folder, ignore_errors=True)
