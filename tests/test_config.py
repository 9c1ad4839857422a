"""config.toml: defaults, relative paths, overrides, and one-line errors naming the key."""

from __future__ import annotations

from pathlib import Path

import pytest

from worker.config import SCHEMA, ConfigError, load_config

REPO = Path(__file__).resolve().parents[1]


def test_shipped_config_documents_every_key() -> None:
    text = (REPO / "config.toml").read_text()
    for section, keys in SCHEMA.items():
        assert f"[{section}]" in text
        for key in keys:
            assert f"\n{key} = " in text, f"{section}.{key} missing from config.toml"


def test_shipped_config_loads_with_defaults() -> None:
    cfg = load_config(REPO / "config.toml")
    assert cfg.inbox == REPO / "data" / "inbox"
    assert cfg.model_path == REPO / "models" / "mammo-lite0-top-384.onnx"
    assert cfg.database_url == f"sqlite:///{REPO / 'data' / 'screen.db'}"


def test_relative_paths_are_relative_to_the_config_file(tmp_path: Path, monkeypatch) -> None:
    (tmp_path / "sub").mkdir()
    cfg_file = tmp_path / "sub" / "c.toml"
    cfg_file.write_text("[paths]\ninbox = 'in'\n[database]\nurl = 'sqlite:///db/x.db'\n")
    monkeypatch.chdir(tmp_path)
    cfg = load_config(cfg_file)
    assert cfg.inbox == tmp_path / "sub" / "in"
    assert cfg.database_url == f"sqlite:///{tmp_path / 'sub' / 'db' / 'x.db'}"
    assert cfg.processed == tmp_path / "sub" / "data" / "processed"


def test_dicom_keys(tmp_path: Path) -> None:
    assert load_config(REPO / "config.toml").dicom_allowed_modalities == ("MG",)
    cfg_file = tmp_path / "c.toml"
    cfg_file.write_text("[dicom]\nallowed_modalities = ['mg', 'DX']\nallow_for_processing = true\n")
    cfg = load_config(cfg_file)
    assert cfg.dicom_allowed_modalities == ("MG", "DX")
    assert cfg.dicom_allow_for_processing is True


def test_overrides_replace_single_keys(tmp_path: Path) -> None:
    cfg_file = tmp_path / "c.toml"
    cfg_file.write_text("[worker]\nbatch_size = 4\n")
    cfg = load_config(cfg_file, {"worker.batch_size": 32, "paths.inbox": str(tmp_path / "x")})
    assert cfg.batch_size == 32
    assert cfg.inbox == tmp_path / "x"


@pytest.mark.parametrize(
    "text, match",
    [
        ("[paths]\ninbx = 'a'\n", "paths.inbx"),
        ("[pathz]\ninbox = 'a'\n", r"\[pathz\]"),
        ("[worker]\nbatch_size = 'many'\n", "worker.batch_size"),
        ("[worker]\nbatch_size = 0\n", "worker.batch_size"),
        ("[worker]\npolling = 'yes'\n", "worker.polling"),
        ("[model]\nimages_per_call = -1\n", "model.images_per_call"),
        ("[model]\nstreams = 0\n", "model.streams"),
        ("[paths]\ninbox = ''\n", "paths.inbox"),
        ("[paths\n", "not valid TOML"),
        ("[dicom]\nallowed_modalities = 'MG'\n", "dicom.allowed_modalities"),
        ("[dicom]\nallowed_modalities = []\n", "dicom.allowed_modalities"),
        ("[dicom]\nallow_for_processing = 1\n", "dicom.allow_for_processing"),
    ],
)
def test_bad_config_names_the_key(tmp_path: Path, text: str, match: str) -> None:
    cfg_file = tmp_path / "c.toml"
    cfg_file.write_text(text)
    with pytest.raises(ConfigError, match=match) as info:
        load_config(cfg_file)
    assert "\n" not in str(info.value).strip()


def test_missing_config_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.toml")
