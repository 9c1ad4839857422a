"""Settings from `config.toml`: a fixed schema, defaults, overrides, one-line errors.

Every key the worker understands is declared in SCHEMA; anything else is a mistake the operator
should hear about (a typo in a key silently falling back to a default is how audit trails rot).
"""

from __future__ import annotations

import os
import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ENV_CONFIG = "MAMMO_SCREEN_CONFIG"
DEFAULT_CONFIG_NAME = "config.toml"


class ConfigError(ValueError):
    """A bad configuration file or value; the message names the key."""


class MissingPathError(ConfigError):
    """A configured folder or database that does not exist; the message names the path."""


# section -> key -> (type, default). "path" values are resolved against the config's folder.
SCHEMA: dict[str, dict[str, tuple[str, Any]]] = {
    "paths": {
        "inbox": ("path", "data/inbox"),
        "processed": ("path", "data/processed"),
        "quarantine": ("path", "data/quarantine"),
        "outbox": ("path", "data/outbox"),
        # Off: a missing folder is a mistake (a typo must not become a new empty inbox).
        "create_missing": ("bool", False),
    },
    "database": {
        "url": ("str", "sqlite:///data/screen.db"),
        "busy_timeout_seconds": ("float", 30.0),
    },
    "model": {
        "path": ("path", "models/mammo-lite0-top-384.onnx"),
        "sha256": ("str", ""),
        "threads": ("int", 0),
        "streams": ("int", 1),
        "images_per_call": ("int", 1),
        "operating_point": ("str", ""),
    },
    "worker": {
        "batch_size": ("int", 4),
        "settle_seconds": ("float", 1.0),
        "rescan_seconds": ("float", 30.0),
        "polling": ("bool", False),
        "recursive": ("bool", True),
        "max_pixels": ("int", 100_000_000),
        "max_attempts": ("int", 3),
        "stale_write_seconds": ("float", 3600.0),
        "study_settle_seconds": ("float", 60.0),
        "heartbeat_seconds": ("float", 5.0),
        "heartbeat_stale_seconds": ("float", 30.0),
    },
    "identity": {
        "filename_pattern": ("str", ""),
        "sidecar_csv": ("optpath", ""),
    },
    "dicom": {
        "allowed_modalities": ("strlist", ["MG"]),
        "allow_for_processing": ("bool", False),
    },
    # The fitness verdict of `screen report` (worker/audit/fitness.py): criteria declared before
    # looking at a site's figures.
    "fitness": {
        "level": ("str", "image"),
        "min_cancers": ("int", 20),
        "min_auc": ("float", 0.75),
        "min_sensitivity": ("float", 0.80),
        "min_specificity": ("float", 0.80),
    },
    "receive": {
        "ae_title": ("ae_title", "MAMMO_SCREEN"),
        "bind": ("str", "127.0.0.1"),
        "port": ("int", 11112),
        "allowed_calling_ae_titles": ("ae_title_list", ()),
    },
    "send": {
        "host": ("str", ""),
        "port": ("int", 104),
        "called_ae_title": ("ae_title", "PACS"),
        "calling_ae_title": ("opt_ae_title", ""),
        "results_dir": ("path", "data/dicom-results"),
        "timeout_seconds": ("float", 10.0),
        "backoff_initial_seconds": ("float", 2.0),
        "backoff_max_seconds": ("float", 30.0),
        "uid_prefix": ("str", ""),
    },
}

_POSITIVE = {
    "model.streams",
    "worker.batch_size",
    "worker.settle_seconds",
    "worker.rescan_seconds",
    "worker.max_pixels",
    "worker.max_attempts",
    "worker.stale_write_seconds",
    "worker.heartbeat_seconds",
    "worker.heartbeat_stale_seconds",
    "database.busy_timeout_seconds",
    "send.timeout_seconds",
    "send.backoff_initial_seconds",
    "send.backoff_max_seconds",
}
_UID_ROOT = re.compile(r"(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))*\.")  # PS3.5 9.1, then a dot
_NON_NEGATIVE = {"worker.study_settle_seconds", "model.images_per_call"}


@dataclass(frozen=True)
class SendSettings:
    """[send]: where results go (worker/results/pacs_send.py). An empty host sends nothing."""

    host: str = ""
    port: int = 104
    called_ae_title: str = "PACS"
    calling_ae_title: str = "MAMMO_SCREEN"  # [receive] ae_title when not set
    results_dir: Path = Path("data/dicom-results")
    timeout_seconds: float = 10.0
    backoff_initial_seconds: float = 2.0
    backoff_max_seconds: float = 30.0
    uid_prefix: str = ""  # "": pydicom's root

    @property
    def enabled(self) -> bool:
        return bool(self.host)


@dataclass(frozen=True)
class Config:
    base_dir: Path
    source: Path | None
    inbox: Path
    processed: Path
    quarantine: Path
    outbox: Path
    database_url: str
    busy_timeout_seconds: float
    model_path: Path
    model_sha256: str
    model_threads: int
    model_streams: int  # ONNX Runtime calls at once (batches scored side by side)
    model_images_per_call: int  # 0: a whole batch in one ONNX Runtime call
    model_operating_point: str
    batch_size: int
    settle_seconds: float
    rescan_seconds: float
    polling: bool
    recursive: bool
    max_pixels: int
    max_attempts: int
    stale_write_seconds: float
    dicom_allowed_modalities: tuple[str, ...]
    dicom_allow_for_processing: bool
    study_settle_seconds: float
    filename_pattern: str
    sidecar_csv: Path | None  # None: no sidecar
    receive_ae_title: str
    receive_bind: str
    receive_port: int
    receive_allowed_calling_ae_titles: tuple[str, ...]
    create_missing: bool = False
    heartbeat_seconds: float = 5.0
    heartbeat_stale_seconds: float = 30.0
    send: SendSettings = SendSettings()
    fitness: dict[str, Any] = field(default_factory=dict)  # [fitness], checked


def _ae_title_problem(value: object) -> str | None:
    """Why `value` is not a DICOM AE title (PS3.5: 1 to 16 characters, no backslash or control
    characters, not only spaces), or None when it is one."""
    if not isinstance(value, str):
        return "expected a string"
    if not value.strip():
        return "must not be empty"
    if len(value) > 16:
        return "at most 16 characters"
    if any(c == "\\" or not c.isascii() or not c.isprintable() for c in value):
        return "printable ASCII without backslash only"
    return None


def _coerce(name: str, kind: str, value: Any) -> Any:
    if kind == "opt_ae_title":  # "" = not set
        return _coerce_ae_titles(name, "ae_title", value) if value != "" else ""
    if kind in ("ae_title", "ae_title_list"):
        return _coerce_ae_titles(name, kind, value)
    ok = {
        "str": isinstance(value, str),
        "path": isinstance(value, str) and value != "",
        "optpath": isinstance(value, str),
        "int": isinstance(value, int) and not isinstance(value, bool),
        "float": isinstance(value, int | float) and not isinstance(value, bool),
        "bool": isinstance(value, bool),
        "strlist": isinstance(value, list)
        and len(value) > 0
        and all(isinstance(v, str) and v.strip() for v in value),
    }[kind]
    if not ok:
        want = {
            "path": "a non-empty path string",
            "str": "a string",
            "strlist": "a non-empty list of strings",
            "optpath": "a path string ('' for none)",
        }.get(kind, f"a {kind}")
        raise ConfigError(f"config key {name}: expected {want}, got {value!r}")
    if kind == "float":
        value = float(value)
    if kind == "strlist":
        value = tuple(v.strip().upper() for v in value)  # DICOM code strings are upper case
    if name in _POSITIVE and value <= 0:
        raise ConfigError(f"config key {name}: must be positive, got {value!r}")
    if name in _NON_NEGATIVE and value < 0:
        raise ConfigError(f"config key {name}: must be 0 or more, got {value!r}")
    if name == "identity.filename_pattern":
        try:
            compile_pattern(value)
        except IdentityConfigError as exc:
            raise ConfigError(f"config key {name}: {exc}") from None
    if name == "model.threads" and value < 0:
        raise ConfigError(f"config key {name}: must be 0 (automatic) or more, got {value!r}")
    if name == "receive.port" and not 0 <= value <= 65535:
        raise ConfigError(f"config key {name}: must be 0 (any free port) to 65535, got {value!r}")
    if name == "send.port" and not 1 <= value <= 65535:
        raise ConfigError(f"config key {name}: must be 1 to 65535, got {value!r}")
    if name == "send.uid_prefix" and value and not _UID_ROOT.fullmatch(value):
        raise ConfigError(f"config key {name}: expected a UID root ending in '.', "
                          f"such as '1.2.826.0.1.3680043.8.498.', got {value!r}")
    if name == "send.uid_prefix" and len(value) > 40:
        raise ConfigError(f"config key {name}: at most 40 characters (UIDs are 64), got {value!r}")
    if name == "receive.bind" and not value:
        raise ConfigError(f"config key {name}: expected an address such as 127.0.0.1")
    return value


def _resolve(kind: str, value: Any, base: Path) -> Any:
    """Paths are relative to `base`; an empty optional path means none."""
    if kind == "path":
        return base / value
    if kind == "optpath":
        return (base / value) if value else None
    return value
def _coerce_ae_titles(name: str, kind: str, value: Any) -> str | tuple[str, ...]:
    # Peers compare AE titles without their padding spaces, so neither do we.
    if kind == "ae_title":
        problem = _ae_title_problem(value)
        if problem:
            raise ConfigError(f"config key {name}: not a DICOM AE title ({problem}): {value!r}")
        return value.strip()
    if not isinstance(value, list | tuple):
        raise ConfigError(f"config key {name}: expected a list of AE titles, got {value!r}")
    for item in value:
        problem = _ae_title_problem(item)
        if problem:
            raise ConfigError(f"config key {name}: not a DICOM AE title ({problem}): {item!r}")
    return tuple(item.strip() for item in value)


def _resolve_sqlite_url(url: str, base: Path) -> str:
    # SQLAlchemy resolves relative SQLite paths against the process's cwd; we want the config's.
    prefix = "sqlite:///"
    if url.startswith(prefix) and not url.startswith(prefix + "/") and ":memory:" not in url:
        rel = url[len(prefix) :]
        if rel:
            return prefix + str((base / rel).resolve())
    return url


def default_config_path() -> Path | None:
    env = os.environ.get(ENV_CONFIG)
    if env:
        return Path(env)
    local = Path.cwd() / DEFAULT_CONFIG_NAME
    return local if local.is_file() else None


def load_config(path: str | Path | None = None, overrides: dict[str, Any] | None = None) -> Config:
    """Read `path` (or the default), check every key, apply `overrides` ("section.key": value).

    Overrides come from command-line options, which are already typed; relative override paths
    are taken against the current directory, as a user typing them would expect.
    """
    source = Path(path) if path is not None else default_config_path()
    raw: dict[str, Any] = {}
    if source is not None:
        try:
            with source.open("rb") as fh:
                raw = tomllib.load(fh)
        except FileNotFoundError:
            raise ConfigError(f"config file not found: {source}") from None
        except IsADirectoryError:
            raise ConfigError(f"config path is a folder, not a file: {source}") from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"config file {source} is not valid TOML: {exc}") from None
    base = (source.parent if source is not None else Path.cwd()).resolve()

    values: dict[str, Any] = {}
    for section, content in raw.items():
        if section not in SCHEMA:
            raise ConfigError(f"unknown config section [{section}] in {source}")
        if not isinstance(content, dict):
            raise ConfigError(f"config [{section}] must be a table")
        for key, value in content.items():
            if key not in SCHEMA[section]:
                raise ConfigError(f"unknown config key {section}.{key} in {source}")
            kind = SCHEMA[section][key][0]
            value = _coerce(f"{section}.{key}", kind, value)
            values[f"{section}.{key}"] = _resolve(kind, value, base)
    for section, keys in SCHEMA.items():
        for key, (kind, default) in keys.items():
            values.setdefault(f"{section}.{key}", _resolve(kind, default, base))
    for name, value in (overrides or {}).items():
        if value is None:
            continue
        section, _, key = name.partition(".")
        if key not in SCHEMA.get(section, {}):
            raise ConfigError(f"unknown config key {name}")
        kind = SCHEMA[section][key][0]
        if kind == "path":
            value = Path(value).resolve()
        elif kind == "optpath":
            value = Path(value).resolve() if str(value) else None
        else:
            value = _coerce(name, kind, value)
        values[name] = value

    return Config(
        base_dir=base,
        source=source.resolve() if source is not None else None,
        inbox=Path(values["paths.inbox"]),
        processed=Path(values["paths.processed"]),
        quarantine=Path(values["paths.quarantine"]),
        outbox=Path(values["paths.outbox"]),
        database_url=_resolve_sqlite_url(values["database.url"], base),
        busy_timeout_seconds=values["database.busy_timeout_seconds"],
        model_path=Path(values["model.path"]),
        model_sha256=values["model.sha256"],
        model_threads=values["model.threads"],
        model_streams=values["model.streams"],
        model_images_per_call=values["model.images_per_call"],
        model_operating_point=values["model.operating_point"],
        batch_size=values["worker.batch_size"],
        settle_seconds=values["worker.settle_seconds"],
        rescan_seconds=values["worker.rescan_seconds"],
        polling=values["worker.polling"],
        recursive=values["worker.recursive"],
        max_pixels=values["worker.max_pixels"],
        max_attempts=values["worker.max_attempts"],
        stale_write_seconds=values["worker.stale_write_seconds"],
        dicom_allowed_modalities=tuple(values["dicom.allowed_modalities"]),
        dicom_allow_for_processing=values["dicom.allow_for_processing"],
        study_settle_seconds=values["worker.study_settle_seconds"],
        filename_pattern=values["identity.filename_pattern"],
        sidecar_csv=values["identity.sidecar_csv"],
        receive_ae_title=values["receive.ae_title"],
        receive_bind=values["receive.bind"],
        receive_port=values["receive.port"],
        receive_allowed_calling_ae_titles=tuple(values["receive.allowed_calling_ae_titles"]),
        create_missing=values["paths.create_missing"],
        heartbeat_seconds=values["worker.heartbeat_seconds"],
        heartbeat_stale_seconds=values["worker.heartbeat_stale_seconds"],
        send=_send_settings(values),
        fitness=_fitness(values),
    )


def _send_settings(values: dict[str, Any]) -> SendSettings:
    initial, cap = values["send.backoff_initial_seconds"], values["send.backoff_max_seconds"]
    if cap < initial:
        raise ConfigError(f"config key send.backoff_max_seconds: must be at least "
                          f"send.backoff_initial_seconds ({initial}), got {cap}")
    return SendSettings(
        host=values["send.host"].strip(),
        port=values["send.port"],
        called_ae_title=values["send.called_ae_title"],
        calling_ae_title=values["send.calling_ae_title"] or values["receive.ae_title"],
        results_dir=Path(values["send.results_dir"]),
        timeout_seconds=values["send.timeout_seconds"],
        backoff_initial_seconds=initial,
        backoff_max_seconds=cap,
        uid_prefix=values["send.uid_prefix"],
    )


def _fitness(values: dict[str, Any]) -> dict[str, Any]:
    out = {key: values[f"fitness.{key}"] for key in SCHEMA["fitness"]}
    if out["level"] not in ("image", "breast", "exam"):
        raise ConfigError(f"fitness.level must be image, breast or exam, got {out['level']!r}")
    if out["min_cancers"] < 1:
        raise ConfigError("fitness.min_cancers must be at least 1")
    for key in ("min_auc", "min_sensitivity", "min_specificity"):
        if not 0.0 <= out[key] <= 1.0:
            raise ConfigError(f"fitness.{key} must be between 0 and 1, got {out[key]}")
    return out


# [identity] filename_pattern: checked when the config loads, so a bad pattern is one line.
PATTERN_FIELDS = ("patient_id", "study_uid", "laterality", "view")


class IdentityConfigError(ValueError):
    """A bad file-name pattern; the message names the problem."""


def compile_pattern(pattern: str) -> re.Pattern[str] | None:
    """The configured file-name pattern, checked: valid, with only known named groups."""
    if not pattern:
        return None
    try:
        rx = re.compile(pattern)
    except re.error as exc:
        raise IdentityConfigError(f"not a valid regular expression: {exc}") from None
    groups = set(rx.groupindex)
    unknown = groups - set(PATTERN_FIELDS)
    if unknown or not groups:
        raise IdentityConfigError(
            f"named groups must be among {', '.join(PATTERN_FIELDS)}; found "
            f"{', '.join(sorted(groups)) or 'none'}"
        )
    return rx
