"""Settings from `config.toml`: a fixed schema, defaults, overrides, one-line errors.

Every key the worker understands is written once, as a field of `Config` (or of a group of
them: `SendSettings`, `FitnessKeys`) declared with `setting("section.key", kind, default)`.
The loader, `SCHEMA` (the docs' configuration reference, the tests) and the command line's
overriding options all read the keys from there; each key's description is its comment in the
shipped config.toml. Anything else in a file is a mistake the operator should hear about (a
typo in a key silently falling back to a default is how audit trails rot).
"""

from __future__ import annotations

import os
import re
import tomllib
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, TypeVar

ENV_CONFIG = "MAMMO_SCREEN_CONFIG"
DEFAULT_CONFIG_NAME = "config.toml"

_T = TypeVar("_T")


class ConfigError(ValueError):
    """A bad configuration file or value; the message names the key."""


class MissingPathError(ConfigError):
    """A configured folder or database that does not exist; the message names the path."""


Check = Callable[[Any], "str | None"]  # a value's problem after "config key NAME: ", or None


@dataclass(frozen=True)
class Key:
    """One key of config.toml. `kind` says how a value is checked and resolved: "path" values
    are taken against the config file's folder, "optpath" too unless "" (none)."""

    section: str
    name: str
    kind: str
    default: Any
    check: Check | None = None

    @property
    def dotted(self) -> str:
        return f"{self.section}.{self.name}"


def setting(key: str, kind: str, default: Any, check: Check | None = None) -> Any:
    """A dataclass field read from config.toml's key `key` ("section.name")."""
    section, _, name = key.partition(".")
    return field(metadata={"key": Key(section, name, kind, default, check)})


def settings_group(group: type, as_dict: bool = False) -> Any:
    """A dataclass field holding a group of settings (a dataclass of `setting` fields), or
    the group's values as a dict."""
    return field(metadata={"group": group, "as_dict": as_dict})


def _positive(value: Any) -> str | None:
    return None if value > 0 else f"must be positive, got {value!r}"


def _non_negative(value: Any) -> str | None:
    return None if value >= 0 else f"must be 0 or more, got {value!r}"


def _threads(value: int) -> str | None:
    return None if value >= 0 else f"must be 0 (automatic) or more, got {value!r}"


def _receive_port(value: int) -> str | None:
    return None if 0 <= value <= 65535 else f"must be 0 (any free port) to 65535, got {value!r}"


def _send_port(value: int) -> str | None:
    return None if 1 <= value <= 65535 else f"must be 1 to 65535, got {value!r}"


def _address(value: str) -> str | None:
    return None if value else "expected an address such as 127.0.0.1"


_UID_ROOT = re.compile(r"(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))*\.")  # PS3.5 9.1, then a dot


def _uid_root(value: str) -> str | None:
    if value and not _UID_ROOT.fullmatch(value):
        return ("expected a UID root ending in '.', such as '1.2.826.0.1.3680043.8.498.', "
                f"got {value!r}")
    if len(value) > 40:
        return f"at most 40 characters (UIDs are 64), got {value!r}"
    return None


def _file_name_pattern(value: str) -> str | None:
    try:
        compile_pattern(value)
    except IdentityConfigError as exc:
        return str(exc)
    return None


@dataclass(frozen=True)
class SendSettings:
    """[send]: where results go (worker/results/pacs_send.py). An empty host sends nothing."""

    host: str = setting("send.host", "str", "")
    port: int = setting("send.port", "int", 104, _send_port)
    called_ae_title: str = setting("send.called_ae_title", "ae_title", "PACS")
    # "": [receive] ae_title
    calling_ae_title: str = setting("send.calling_ae_title", "opt_ae_title", "")
    results_dir: Path = setting("send.results_dir", "path", "data/dicom-results")
    timeout_seconds: float = setting("send.timeout_seconds", "float", 10.0, _positive)
    backoff_initial_seconds: float = setting("send.backoff_initial_seconds", "float", 2.0,
                                             _positive)
    backoff_max_seconds: float = setting("send.backoff_max_seconds", "float", 30.0, _positive)
    uid_prefix: str = setting("send.uid_prefix", "str", "", _uid_root)  # "": pydicom's root

    @property
    def enabled(self) -> bool:
        return bool(self.host)


@dataclass(frozen=True)
class FitnessKeys:
    """[fitness]: the criteria of `screen report`'s fitness verdict (worker/audit/fitness.py),
    declared before looking at a site's figures. `Config.fitness` holds them as a dict."""

    level: str = setting("fitness.level", "str", "image")
    min_cancers: int = setting("fitness.min_cancers", "int", 20)
    min_auc: float = setting("fitness.min_auc", "float", 0.75)
    min_sensitivity: float = setting("fitness.min_sensitivity", "float", 0.80)
    min_specificity: float = setting("fitness.min_specificity", "float", 0.80)


@dataclass(frozen=True)
class Config:
    base_dir: Path
    source: Path | None
    # [paths]
    inbox: Path = setting("paths.inbox", "path", "data/inbox")
    processed: Path = setting("paths.processed", "path", "data/processed")
    quarantine: Path = setting("paths.quarantine", "path", "data/quarantine")
    outbox: Path = setting("paths.outbox", "path", "data/outbox")
    # Off: a missing folder is a mistake (a typo must not become a new empty inbox).
    create_missing: bool = setting("paths.create_missing", "bool", False)
    # [database]
    database_url: str = setting("database.url", "str", "sqlite:///data/screen.db")
    busy_timeout_seconds: float = setting("database.busy_timeout_seconds", "float", 30.0,
                                          _positive)
    # [model]
    model_path: Path = setting("model.path", "path", "models/mammo-lite0-top-384.onnx")
    model_sha256: str = setting("model.sha256", "str", "")
    model_threads: int = setting("model.threads", "int", 0, _threads)
    # ONNX Runtime calls at once (batches scored side by side)
    model_streams: int = setting("model.streams", "int", 1, _positive)
    # 0: a whole batch in one ONNX Runtime call
    model_images_per_call: int = setting("model.images_per_call", "int", 1, _non_negative)
    model_operating_point: str = setting("model.operating_point", "str", "")
    # [worker]
    batch_size: int = setting("worker.batch_size", "int", 4, _positive)
    settle_seconds: float = setting("worker.settle_seconds", "float", 1.0, _positive)
    rescan_seconds: float = setting("worker.rescan_seconds", "float", 30.0, _positive)
    polling: bool = setting("worker.polling", "bool", False)
    recursive: bool = setting("worker.recursive", "bool", True)
    max_pixels: int = setting("worker.max_pixels", "int", 100_000_000, _positive)
    max_attempts: int = setting("worker.max_attempts", "int", 3, _positive)
    stale_write_seconds: float = setting("worker.stale_write_seconds", "float", 3600.0,
                                         _positive)
    study_settle_seconds: float = setting("worker.study_settle_seconds", "float", 60.0,
                                          _non_negative)
    heartbeat_seconds: float = setting("worker.heartbeat_seconds", "float", 5.0, _positive)
    heartbeat_stale_seconds: float = setting("worker.heartbeat_stale_seconds", "float", 30.0,
                                             _positive)
    # [identity]
    filename_pattern: str = setting("identity.filename_pattern", "str", "", _file_name_pattern)
    # None: no sidecar
    sidecar_csv: Path | None = setting("identity.sidecar_csv", "optpath", "")
    # [dicom]
    dicom_allowed_modalities: tuple[str, ...] = setting("dicom.allowed_modalities", "strlist",
                                                        ["MG"])
    dicom_allow_for_processing: bool = setting("dicom.allow_for_processing", "bool", False)
    # [fitness], checked
    fitness: dict[str, Any] = settings_group(FitnessKeys, as_dict=True)
    # [receive]
    receive_ae_title: str = setting("receive.ae_title", "ae_title", "MAMMO_SCREEN")
    receive_bind: str = setting("receive.bind", "str", "127.0.0.1", _address)
    receive_port: int = setting("receive.port", "int", 11112, _receive_port)
    receive_allowed_calling_ae_titles: tuple[str, ...] = setting(
        "receive.allowed_calling_ae_titles", "ae_title_list", ())
    # [send]
    send: SendSettings = settings_group(SendSettings)


def _keys(group: type) -> Iterator[Key]:
    for f in fields(group):
        if "key" in f.metadata:
            yield f.metadata["key"]
        elif "group" in f.metadata:
            yield from _keys(f.metadata["group"])


# Every key by its dotted name ("worker.batch_size"), in the order config.toml lists them.
KEYS: dict[str, Key] = {key.dotted: key for key in _keys(Config)}

# section -> key -> (kind, default): the keys as the docs and the tests read them.
SCHEMA: dict[str, dict[str, tuple[str, Any]]] = {}
for _key in KEYS.values():
    SCHEMA.setdefault(_key.section, {})[_key.name] = (_key.kind, _key.default)


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


def _coerce(key: Key, value: Any) -> Any:
    """`value` checked against its key's kind and rule, and converted (floats, tuples)."""
    name, kind = key.dotted, key.kind
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
    problem = key.check(value) if key.check is not None else None
    if problem:
        raise ConfigError(f"config key {name}: {problem}")
    return value


def _resolve(kind: str, value: Any, base: Path) -> Any:
    """Paths are relative to `base`; an empty optional path means none; lists are tuples."""
    if kind == "path":
        return base / value
    if kind == "optpath":
        return (base / value) if value else None
    if kind in ("strlist", "ae_title_list"):
        return tuple(value)
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
    raw = _read_toml(source) if source is not None else {}
    base = (source.parent if source is not None else Path.cwd()).resolve()
    values = _file_values(raw, source, base)
    for name, key in KEYS.items():
        values.setdefault(name, _resolve(key.kind, key.default, base))
    values.update(_override_values(overrides or {}))
    values["database.url"] = _resolve_sqlite_url(values["database.url"], base)
    _check_send(values)
    _check_fitness(values)
    return _build(Config, values, base_dir=base,
                  source=source.resolve() if source is not None else None)


def _read_toml(source: Path) -> dict[str, Any]:
    try:
        with source.open("rb") as fh:
            return tomllib.load(fh)
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {source}") from None
    except IsADirectoryError:
        raise ConfigError(f"config path is a folder, not a file: {source}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config file {source} is not valid TOML: {exc}") from None


def _file_values(raw: dict[str, Any], source: Path | None, base: Path) -> dict[str, Any]:
    """The file's keys, checked, by dotted name; relative paths taken against `base`."""
    values: dict[str, Any] = {}
    for section, content in raw.items():
        if section not in SCHEMA:
            raise ConfigError(f"unknown config section [{section}] in {source}")
        if not isinstance(content, dict):
            raise ConfigError(f"config [{section}] must be a table")
        for name, value in content.items():
            key = KEYS.get(f"{section}.{name}")
            if key is None:
                raise ConfigError(f"unknown config key {section}.{name} in {source}")
            values[key.dotted] = _resolve(key.kind, _coerce(key, value), base)
    return values


def _override_values(overrides: dict[str, Any]) -> dict[str, Any]:
    """Command-line values by dotted name (None: not given); paths against the cwd."""
    values: dict[str, Any] = {}
    for name, value in overrides.items():
        if value is None:
            continue
        key = KEYS.get(name)
        if key is None:
            raise ConfigError(f"unknown config key {name}")
        if key.kind == "path":
            value = Path(value).resolve()
        elif key.kind == "optpath":
            value = Path(value).resolve() if str(value) else None
        else:
            value = _coerce(key, value)
        values[name] = value
    return values


def _check_send(values: dict[str, Any]) -> None:
    """[send]: the backoff's order; the host without spaces; the calling AE title by default
    [receive]'s."""
    initial, cap = values["send.backoff_initial_seconds"], values["send.backoff_max_seconds"]
    if cap < initial:
        raise ConfigError(f"config key send.backoff_max_seconds: must be at least "
                          f"send.backoff_initial_seconds ({initial}), got {cap}")
    values["send.host"] = values["send.host"].strip()
    values["send.calling_ae_title"] = values["send.calling_ae_title"] or values["receive.ae_title"]


def _check_fitness(values: dict[str, Any]) -> None:
    level = values["fitness.level"]
    if level not in ("image", "breast", "exam"):
        raise ConfigError(f"fitness.level must be image, breast or exam, got {level!r}")
    if values["fitness.min_cancers"] < 1:
        raise ConfigError("fitness.min_cancers must be at least 1")
    for key in ("min_auc", "min_sensitivity", "min_specificity"):
        value = values[f"fitness.{key}"]
        if not 0.0 <= value <= 1.0:
            raise ConfigError(f"fitness.{key} must be between 0 and 1, got {value}")


def _build(group: type[_T], values: dict[str, Any], **given: Any) -> _T:
    """A dataclass of settings filled from `values`, its groups too."""
    kwargs = dict(given)
    for f in fields(group):  # type: ignore[arg-type]
        if "key" in f.metadata:
            kwargs[f.name] = values[f.metadata["key"].dotted]
        elif "group" in f.metadata:
            part = _build(f.metadata["group"], values)
            kwargs[f.name] = asdict(part) if f.metadata["as_dict"] else part
    return group(**kwargs)


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
