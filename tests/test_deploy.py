"""deploy/: every file starts what it describes, with its own configuration file.

Each test installs a file as its header says, with only the paths moved into a temporary folder
(/etc, /var/lib and /opt for the systemd units; the project folder for run-user.sh and
supervisord.conf), runs the command the file would run, sees the worker come up (a heartbeat,
and for the systemd worker a scored image) or the receiver answer DCMTK's echoscu, and stops it
with the file's stop signal. The DICOM port is the one other thing changed: a free one, so that
a test never meets another program on 11112. The systemd units are also checked by
`systemd-analyze` (verify clean, exposure) where it is installed.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import REPO, require_programs, write_mammo_like

DEPLOY = REPO / "deploy"
UNIT = DEPLOY / "mammo-screen.service"
RECEIVE_UNIT = DEPLOY / "mammo-screen-receive.service"
NETWORK_DROPIN = DEPLOY / "mammo-screen.service.d" / "network.conf"
PACS_DROPIN = DEPLOY / "mammo-screen.service.d" / "send-to-pacs.conf"
SERVICE_CONFIG = DEPLOY / "config.service.toml"
INSTALLED_SCREEN = "/opt/mammo-screen/.venv/bin/screen"
PYTHON_SCREEN = [sys.executable, "-m", "worker"]  # this checkout's `screen`

needs_systemd = pytest.mark.skipif(shutil.which("systemd-analyze") is None,
                                   reason="systemd-analyze not installed")


def test_every_file_in_deploy_is_started_here() -> None:
    """A new file in deploy/ needs its own start test below."""
    tested = {"config.service.toml", "mammo-screen.service", "mammo-screen-receive.service",
              "mammo-screen.service.d/network.conf", "mammo-screen.service.d/send-to-pacs.conf",
              "run-user.sh", "supervisord.conf"}
    shipped = {p.relative_to(DEPLOY).as_posix() for p in DEPLOY.rglob("*") if p.is_file()}
    assert shipped == tested


# ---- systemd: static checks -------------------------------------------------------------------

def _unit_text(unit: Path, dropins: tuple[Path, ...] = ()) -> str:
    """The unit with its drop-ins appended: later assignments win, as systemd applies them."""
    return "\n".join(p.read_text() for p in (unit, *dropins))


def _unit_values(text: str) -> dict[str, list[str]]:
    """Every assignment of the unit, in order; for a single value the last one counts, and
    "Key=" (empty) resets a list, as in systemd."""
    values: dict[str, list[str]] = {}
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith(("#", ";", "[")):
            continue
        key, _, value = line.partition("=")
        values[key] = [] if value == "" else [*values.get(key, []), value]
    return values


UNITS = {"worker": (UNIT,), "receiver": (RECEIVE_UNIT,),
         "worker+network.conf": (UNIT, NETWORK_DROPIN),
         "worker+send-to-pacs.conf": (UNIT, PACS_DROPIN)}


def _verifiable(tmp_path: Path, files: tuple[Path, ...]) -> Path:
    # verify checks that ExecStart exists; point it at a real executable for the check.
    text = _unit_text(files[0], files[1:]).replace(INSTALLED_SCREEN, "/bin/true")
    out = tmp_path / files[0].name
    out.write_text(text)
    return out


@needs_systemd
@pytest.mark.parametrize("name", UNITS)
def test_unit_verifies_cleanly(tmp_path: Path, name: str) -> None:
    proc = subprocess.run(["systemd-analyze", "verify", str(_verifiable(tmp_path, UNITS[name]))],
                          capture_output=True, text=True)
    assert proc.returncode == 0 and proc.stderr.strip() == "", proc.stderr


@needs_systemd
@pytest.mark.parametrize(("name", "most"), [("worker", 0.5), ("receiver", 1.5),
                                            ("worker+network.conf", 1.5),
                                            ("worker+send-to-pacs.conf", 2.0)])
def test_unit_exposure(tmp_path: Path, name: str, most: float) -> None:
    proc = subprocess.run(["systemd-analyze", "security", "--offline=true",
                           str(_verifiable(tmp_path, UNITS[name]))], capture_output=True, text=True)
    match = re.search(r"Overall exposure level for \S+: (\d+\.\d+)", proc.stdout)
    assert match, proc.stdout + proc.stderr
    assert float(match.group(1)) <= most


def test_the_pacs_dropin_opens_one_address_only() -> None:
    """[send] needs Internet sockets to the PACS and nothing wider (docs/pacs.md): the unit's
    IPAddressDeny=any stays, with the PACS's address as the one exception."""
    files = UNITS["worker+send-to-pacs.conf"]
    values = _unit_values(_unit_text(files[0], files[1:]))
    assert values["PrivateNetwork"][-1] == "no"
    assert values["IPAddressDeny"] == ["any"] and values["IPAddressAllow"] == ["192.0.2.10"]
    assert set(values["RestrictAddressFamilies"][-1].split()) == {"AF_UNIX", "AF_INET",
                                                                 "AF_INET6"}


def test_worker_unit_has_no_network_and_its_dropin_gives_it() -> None:
    worker = _unit_values(_unit_text(UNIT))
    assert worker["PrivateNetwork"] == ["yes"] and worker["RestrictAddressFamilies"] == ["AF_UNIX"]
    for files in (UNITS["worker+network.conf"], UNITS["receiver"]):
        values = _unit_values(_unit_text(files[0], files[1:]))
        assert values.get("PrivateNetwork", ["no"])[-1] == "no"  # the last assignment wins
        assert values.get("IPAddressDeny", []) == []
        assert set(values["RestrictAddressFamilies"][-1].split()) == {"AF_UNIX", "AF_INET",
                                                                     "AF_INET6"}
    for files in UNITS.values():
        values = _unit_values(_unit_text(files[0], files[1:]))
        for key in ("NoNewPrivileges", "PrivateTmp", "ProtectHome"):
            assert values[key] == ["yes"], key
        assert values["ProtectSystem"] == ["strict"] and values["User"] == ["mammo-screen"]
        assert values["Restart"] == ["on-failure"] and "StartLimitBurst" in values


def _writable(values: dict[str, list[str]]) -> list[Path]:
    """What ProtectSystem=strict leaves writable: the state directories and ReadWritePaths."""
    state = [Path("/var/lib") / d for entry in values.get("StateDirectory", [])
             for d in entry.split()]
    return state + [Path(p) for entry in values.get("ReadWritePaths", []) for p in entry.split()]


@pytest.mark.parametrize("name", UNITS)
def test_service_config_writes_only_where_the_unit_may(name: str) -> None:
    from worker.config import load_config
    from worker.records.database_url import sqlite_file

    cfg = load_config(SERVICE_CONFIG)
    assert not cfg.create_missing
    text = SERVICE_CONFIG.read_text()
    for key in ("inbox", "processed", "quarantine", "outbox"):  # none left to a default
        assert re.search(rf"^{key} = \"/var/lib/mammo-screen/{key}\"$", text, re.MULTILINE), key
    writable = _writable(_unit_values(_unit_text(UNITS[name][0])))
    db = sqlite_file(cfg.database_url)
    assert db is not None
    needed = [db.parent] + ([cfg.inbox] if name == "receiver" else
                            [cfg.inbox, cfg.processed, cfg.quarantine, cfg.outbox])
    for path in needed:
        assert any(path.is_relative_to(w) for w in writable), path


# ---- starting what each file describes --------------------------------------------------------

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _with_port(config_text: str, port: int) -> str:
    """The config with its [receive] port (not [send]'s, the PACS's) set to `port`."""
    head, section, rest = config_text.partition("\n[receive]\n")
    assert section, "the config has no [receive] section"
    block, following, tail = rest.partition("\n[")
    block, n = re.subn(r"^port = \d+$", f"port = {port}", block, flags=re.MULTILINE)
    assert n == 1, "the config no longer sets [receive] port"
    return head + section + block + following + tail


def _wait_for(what: str, check: Callable[[], Any], proc: subprocess.Popen[bytes] | None,
              log: Path, limit: float = 120.0) -> Any:
    """Poll until check() is truthy; fail at once, with the log, if the process ended."""
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"exited with {proc.returncode} before {what}:\n" + _read(log))
        found = check()
        if found:
            return found
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}:\n" + _read(log))


def _read(log: Path) -> str:
    return log.read_text() if log.is_file() else f"({log} not written)"


def _live_workers(config_path: Path) -> list[dict[str, Any]]:
    from worker.app import status
    from worker.config import ConfigError, load_config

    try:
        return [w for w in status(load_config(config_path))["workers"] if w["state"] == "live"]
    except ConfigError:  # no database yet
        return []


def _echo(port: int) -> bool:
    proc = subprocess.run([shutil.which("echoscu") or "echoscu", "-aec", "MAMMO_SCREEN",
                           "127.0.0.1", str(port)], capture_output=True, timeout=60)
    return proc.returncode == 0


def _scored(config_path: Path, name: str) -> bool:
    from worker.config import load_config
    from worker.records.connect import open_store
    from worker.results.listing import result_rows

    store = open_store(load_config(config_path))
    try:
        return any(r["filename"] == name and r["status"] == "scored" for r in result_rows(store))
    finally:
        store.dispose()


@contextmanager
def _running(argv: list[str], cwd: Path, env: dict[str, str], log: Path,
             stop_signal: int = signal.SIGTERM, stop_within: float = 120.0,
             ) -> Iterator[subprocess.Popen[bytes]]:
    """The command, running; on leaving, stopped with `stop_signal`, which it must obey within
    `stop_within` seconds with exit status 0."""
    with log.open("wb") as out:
        proc = subprocess.Popen(argv, cwd=cwd, env={**os.environ, **env,
                                                    "PYTHONPATH": str(REPO)},
                                stdout=out, stderr=subprocess.STDOUT)
    stopped = False
    try:
        yield proc
        proc.send_signal(stop_signal)
        assert proc.wait(timeout=stop_within) == 0, log.read_text()
        stopped = True
    finally:
        if not stopped and proc.poll() is None:
            proc.kill()
            proc.wait()


def _installed_unit(files: tuple[Path, ...], root: Path, port: int
                    ) -> tuple[list[str], dict[str, str], Path, Path]:
    """What `systemctl start` runs after the unit's install steps, with /etc, /var/lib and /opt
    moved under `root`: argv, environment, working folder, and the config file it reads.
    systemd makes the unit's StateDirectory folders; nothing else is created."""
    values = _unit_values(_unit_text(files[0], files[1:]))

    def moved(text: str) -> str:
        return (text.replace("/etc/mammo-screen", f"{root}/etc/mammo-screen")
                .replace("/var/lib/mammo-screen", f"{root}/var/lib/mammo-screen")
                .replace("/opt/mammo-screen", str(REPO)))

    config = root / "etc" / "mammo-screen" / "config.toml"  # install -Dm644 ... as the header
    config.parent.mkdir(parents=True)
    config.write_text(_with_port(moved(SERVICE_CONFIG.read_text()), port))
    for entry in values["StateDirectory"]:
        for folder in entry.split():
            (root / "var" / "lib" / folder).mkdir(parents=True, exist_ok=True)
    (exec_start,) = values["ExecStart"]
    argv = shlex.split(exec_start)
    assert argv[0] == INSTALLED_SCREEN
    env = dict(e.split("=", 1) for entry in values["Environment"] for e in shlex.split(entry))
    env = {k: moved(v) for k, v in env.items()}
    assert env["MAMMO_SCREEN_CONFIG"] == str(config)
    (workdir,) = values["WorkingDirectory"]
    return PYTHON_SCREEN + argv[1:], env, Path(moved(workdir)), config


def _stop_signal(values: dict[str, list[str]]) -> tuple[int, float]:
    return (getattr(signal, values["KillSignal"][-1]), float(values["TimeoutStopSec"][-1]))


@pytest.mark.parametrize("name", ["worker", "worker+network.conf", "worker+send-to-pacs.conf"])
def test_worker_unit_starts_and_scores(tmp_path: Path, name: str) -> None:
    files = UNITS[name]
    argv, env, cwd, config = _installed_unit(files, tmp_path, _free_port())
    assert argv[-1] == "watch"
    sig, within = _stop_signal(_unit_values(_unit_text(files[0], files[1:])))
    log = tmp_path / "journal.log"
    with _running(argv, cwd, env, log, sig, within) as proc:
        _wait_for("the worker's heartbeat", lambda: _live_workers(config), proc, log)
        inbox = tmp_path / "var" / "lib" / "mammo-screen" / "inbox"
        write_mammo_like(inbox / ".a.png", seed=1).rename(inbox / "a.png")
        _wait_for("a.png scored", lambda: _scored(config, "a.png"), proc, log)
    assert _live_workers(config) == []  # stopped cleanly
    assert (tmp_path / "var" / "lib" / "mammo-screen" / "processed" / "a.png").is_file()


def test_receiver_unit_starts_and_answers_echo(tmp_path: Path) -> None:
    require_programs("dcmtk", "echoscu")
    port = _free_port()
    argv, env, cwd, _config = _installed_unit(UNITS["receiver"], tmp_path, port)
    assert argv[-1] == "receive"
    sig, within = _stop_signal(_unit_values(_unit_text(RECEIVE_UNIT)))
    log = tmp_path / "journal.log"
    with _running(argv, cwd, env, log, sig, within) as proc:
        _wait_for("a C-ECHO answered", lambda: _echo(port), proc, log)
    assert "receiving ae_title=MAMMO_SCREEN" in log.read_text()


def _fresh_project(root: Path, port: int) -> Path:
    """What a fresh clone holds that the worker needs: config.toml as shipped (but for its DICOM
    port), the folders that ship under data/ (only those) and models/ (a link)."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "config.toml").write_text(_with_port((REPO / "config.toml").read_text(), port))
    kept = sorted(REPO.glob("data/*/.gitkeep"))
    assert kept, "no folders ship under data/"
    for keep in kept:
        (root / keep.parent.relative_to(REPO)).mkdir(parents=True)
    (root / "models").symlink_to(REPO / "models")
    return root


def test_a_fresh_clone_processes_with_the_shipped_config_and_creates_no_typo(
        tmp_path: Path) -> None:
    """The README's first steps need no create_missing: the folders ship in git."""
    from tests.conftest import run_screen

    project = _fresh_project(tmp_path / "project", _free_port())
    write_mammo_like(project / "data" / "inbox" / "a.png", seed=1)
    done = run_screen("process", cwd=project)  # ./config.toml, found in the current folder
    assert done.returncode == 0 and "scored 1" in done.stdout, done.stderr
    assert (project / "data" / "processed" / "a.png").is_file()
    before = sorted(project.rglob("*"))
    for typo in (["--inbox", "data/inbx"], ["--database", "sqlite:///data/scren.db"]):
        refused = run_screen("process", *typo, cwd=project)
        assert refused.returncode == 1 and "not found" in refused.stderr, refused.stderr
        assert sorted(project.rglob("*")) == before


def _systemd_run_argv(script: Path) -> tuple[list[str], dict[str, str]]:
    """The service command of `systemd-run ... CMD ARGS` in a shell script, and its -p
    properties."""
    joined = re.sub(r"\\\n\s*", " ", script.read_text())
    match = re.search(r"^\s*(?:exec\s+)?(systemd-run .*)$", joined, re.MULTILINE)
    assert match, "no systemd-run command found"
    tokens = shlex.split(match.group(1))
    props = dict(tokens[i + 1].split("=", 1) for i, t in enumerate(tokens) if t == "-p")
    first = next(i for i, t in enumerate(tokens) if t.endswith("/.venv/bin/screen"))
    return tokens[first:], props


def test_run_user_sh_starts_the_worker(tmp_path: Path) -> None:
    project = _fresh_project(tmp_path / "project", _free_port())
    argv, props = _systemd_run_argv(DEPLOY / "run-user.sh")
    argv = [a.replace("$PWD", str(project)) for a in argv]
    assert argv[0] == f"{project}/.venv/bin/screen" and argv[-1] == "watch"
    config = Path(argv[argv.index("--config") + 1])
    log = tmp_path / "journal.log"
    with _running(PYTHON_SCREEN + argv[1:], project, {}, log,
                  getattr(signal, props["KillSignal"]), float(props["TimeoutStopSec"])) as proc:
        _wait_for("the worker's heartbeat", lambda: _live_workers(config), proc, log)
    assert _live_workers(config) == []


def _supervisorctl(conf: Path, *args: str) -> str:
    return subprocess.run([sys.executable, "-m", "supervisor.supervisorctl", "-c", str(conf),
                           *args], capture_output=True, text=True, timeout=60).stdout


def test_supervisord_conf_starts_worker_and_receiver(tmp_path: Path) -> None:
    require_programs("dcmtk", "echoscu")
    port = _free_port()
    project = _fresh_project(tmp_path / "project", port)
    (project / "deploy").mkdir()
    socket_dir = Path(tempfile.mkdtemp(prefix="sv"))  # a socket path must be under 108 bytes
    text = (DEPLOY / "supervisord.conf").read_text()
    for old, new in (("%(here)s/../.venv/bin/screen", " ".join(PYTHON_SCREEN)),
                     ("%(here)s/../data/supervisor.sock", str(socket_dir / "s.sock"))):
        assert old in text, f"deploy/supervisord.conf no longer contains {old}"
        text = text.replace(old, new)
    conf = project / "deploy" / "supervisord.conf"  # %(here)s/.. is the project folder
    conf.write_text(text)
    log = project / "data" / "supervisord.log"
    try:
        with _running([sys.executable, "-m", "supervisor.supervisord", "-n", "-c", str(conf)],
                      project, {}, tmp_path / "supervisord.out", signal.SIGTERM, 160) as proc:
            _wait_for("both programs RUNNING", lambda: re.search(
                r"mammo-screen\s+RUNNING.*\n.*mammo-screen-receive\s+RUNNING",
                _supervisorctl(conf, "status")), proc, log)
            _wait_for("the worker's heartbeat", lambda: _live_workers(project / "config.toml"),
                      proc, project / "data" / "mammo-screen.log")
            _wait_for("a C-ECHO answered", lambda: _echo(port), proc,
                      project / "data" / "mammo-screen-receive.log")
        assert _live_workers(project / "config.toml") == []
        assert "receiving ae_title" in (project / "data" / "mammo-screen-receive.log").read_text()
    finally:
        shutil.rmtree(socket_dir, ignore_errors=True)
