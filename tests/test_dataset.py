"""Dataset discovery and patient splits: real files in tmp folders and the real labels.csv."""

from __future__ import annotations

import subprocess
import sys
import warnings
from pathlib import Path

import pytest

from tests.conftest import DATA, REPO, write_mammo_like
from trainer.dataset import (
    DatasetError,
    Sample,
    describe,
    discover,
    limit_samples,
    split_by_patient,
    split_strategy,
)


def _make_folder(root: Path, layout: dict[str, int], names: str = "{i}.png") -> Path:
    """``layout``: relative class folder -> number of small generated images in it."""
    for rel, n in layout.items():
        for i in range(n):
            write_mammo_like(root / rel / names.format(i=i, rel=rel.replace("/", "-")),
                             size=(24, 20), seed=i)
    return root


def test_flat_folder(tmp_path: Path) -> None:
    root = _make_folder(tmp_path / "set", {"benign": 3, "malignant": 2})
    (root / "benign" / "notes.txt").write_text("not an image")
    samples = discover(root)
    assert [s.label for s in samples] == [0, 0, 0, 1, 1]
    assert all(s.split is None and s.patient_id is None for s in samples)
    assert all(s.path.suffix == ".png" for s in samples)


def test_kaggle_numbered_class_folders(tmp_path: Path) -> None:
    root = _make_folder(tmp_path / "set", {"0": 2, "1": 2})
    assert [s.label for s in discover(root)] == [0, 0, 1, 1]


def test_train_valid_test_layout_records_the_split(tmp_path: Path) -> None:
    root = _make_folder(tmp_path / "rf", {
        "train/benign": 4, "train/malignant": 3, "valid/benign": 2, "valid/malignant": 1,
        "test/benign": 1, "test/malignant": 1,
    })
    samples = discover(root)
    assert len(samples) == 12
    by_split = {sp: [s for s in samples if s.split == sp] for sp in ("train", "valid", "test")}
    assert [len(v) for v in by_split.values()] == [7, 3, 2]
    # No patient ids: the folder's own split is used, and test stays out of both sides.
    assert split_strategy(samples) == "folder"
    train, val = split_by_patient(samples, 0.2, seed=0)
    assert train == by_split["train"] and val == by_split["valid"]


def test_patient_ids_from_file_names(tmp_path: Path) -> None:
    root = _make_folder(tmp_path / "rf", {"train/benign": 3, "train/malignant": 2,
                                          "valid/benign": 2, "valid/malignant": 2},
                        names="{i}7_12345{i}_png.rf.abc.jpg")
    samples = discover(root, patient_regex=r"^(\d+)_")
    assert {s.patient_id for s in samples} == {"07", "17", "27"}
    # Patient ids win over the (per-image, leaky) folder split.
    assert split_strategy(samples) == "patient"
    with pytest.raises(DatasetError, match="does not match"):
        discover(root, patient_regex=r"^patient(\d+)")


@pytest.mark.parametrize(
    ("layout", "message"),
    [
        ({}, "no benign/ and malignant/"),
        ({"benign": 2}, "no malignant/ subfolder"),
        ({"train/benign": 2, "valid/malignant": 1, "valid/benign": 1}, "no malignant/"),
        ({"benign": 1, "malignant": 1, "train/benign": 1, "train/malignant": 1}, "one layout"),
        ({"scans/benign": 2}, "no benign/ and malignant/"),
    ],
)
def test_bad_folder_layouts(tmp_path: Path, layout: dict[str, int], message: str) -> None:
    root = tmp_path / "bad"
    root.mkdir()
    _make_folder(root, layout)
    with pytest.raises(ValueError, match=message):
        discover(root)


def test_empty_class_folder(tmp_path: Path) -> None:
    root = _make_folder(tmp_path / "set", {"benign": 2})
    (root / "malignant").mkdir()
    with pytest.raises(DatasetError, match="no malignant images"):
        discover(root)


def test_missing_source(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match="does not exist"):
        discover(tmp_path / "nowhere")
    (tmp_path / "list.txt").write_text("x")
    with pytest.raises(DatasetError, match="not a .csv"):
        discover(tmp_path / "list.txt")


def _write_csv(root: Path, text: str, images: list[str]) -> Path:
    for name in images:
        write_mammo_like(root / name, size=(24, 20))
    path = root / "labels.csv"
    path.write_text(text)
    return path


def test_csv_discovery(tmp_path: Path) -> None:
    csv_path = _write_csv(
        tmp_path, "filename,label,patient_id,laterality,age\n"
        "img/a.png,benign,p1,l,50\nimg/b.png,malignant,p1,R,50\nimg/c.png,1,p2,,61\n"
        "img/d.png,0,,L,70\n",
        ["img/a.png", "img/b.png", "img/c.png", "img/d.png"],
    )
    samples = discover(csv_path)
    assert [s.label for s in samples] == [0, 1, 1, 0]
    assert [s.patient_id for s in samples] == ["p1", "p1", "p2", None]
    assert [s.laterality for s in samples] == ["L", "R", None, "L"]
    assert samples[0].path == tmp_path / "img" / "a.png"
    assert samples[0].breast_id == "p1:L" and samples[2].breast_id is None
    # A folder holding labels.csv (and no class folders) is read through the CSV.
    assert discover(tmp_path) == samples


def test_csv_minimal_columns(tmp_path: Path) -> None:
    csv_path = _write_csv(tmp_path, "filename,label\nx.png,benign\ny.png,malignant\n",
                          ["x.png", "y.png"])
    assert [(s.path.name, s.label, s.patient_id) for s in discover(csv_path)] == [
        ("x.png", 0, None), ("y.png", 1, None)]


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("file,label\nx.png,benign\n", "needs a 'filename' column"),
        ("filename,class\nx.png,benign\n", "needs a 'label' column"),
        ("filename,label\nx.png,benign\ny.png,cancer\n", r"labels.csv:3: label 'cancer'"),
        ("filename,label\nx.png,benign\nmissing.png,malignant\n", "1 listed file"),
        ("filename,label\nx.png,benign\n", "no malignant images"),
        ("filename,label\n", "no images found"),
    ],
)
def test_bad_csv(tmp_path: Path, text: str, message: str) -> None:
    csv_path = _write_csv(tmp_path, text, ["x.png", "y.png"])
    with pytest.raises(DatasetError, match=message):
        discover(csv_path)


def _synthetic(n_patients: int = 60) -> list[Sample]:
    """Patients with 2-4 images; every third patient has a malignant breast."""
    samples = []
    for p in range(n_patients):
        for i in range(2 + p % 3):
            label = int(p % 3 == 0 and i % 2 == 0)
            samples.append(Sample(Path(f"{p}_{i}.png"), label, f"p{p}", "LR"[i % 2]))
    return samples


def _check_split(train: list[Sample], val: list[Sample], everyone: list[Sample]) -> None:
    assert not {s.patient_id for s in train} & {s.patient_id for s in val}
    assert sorted(map(str, (s.path for s in train + val))) == sorted(
        str(s.path) for s in everyone if s.split != "test")


def test_patient_split_is_grouped_stratified_and_deterministic() -> None:
    samples = _synthetic()
    train, val = split_by_patient(samples, 0.25, seed=3)
    _check_split(train, val, samples)
    val_patients = {s.patient_id for s in val}
    positive = {s.patient_id for s in samples if s.label == 1}
    assert len(val_patients) == 15  # 25% of 20 malignant + 25% of 40 benign patients
    assert len(val_patients & positive) == 5
    assert split_by_patient(samples, 0.25, seed=3) == (train, val)
    assert split_by_patient(samples, 0.25, seed=4) != (train, val)


def test_per_image_fallback_warns() -> None:
    samples = [Sample(Path(f"{i}.png"), i % 2) for i in range(20)]
    with pytest.warns(UserWarning, match="per image"):
        train, val = split_by_patient(samples, 0.2, seed=0)
    assert len(val) == 4 and {s.label for s in val} == {0, 1}
    assert len(train) == 16


def test_limit_takes_whole_patients() -> None:
    samples = _synthetic()
    small = limit_samples(samples, 20, seed=0)
    assert 20 <= len(small) <= 24 and {s.label for s in small} == {0, 1}
    chosen = {s.patient_id for s in small}
    assert [s for s in samples if s.patient_id in chosen] == small  # whole patients, in order


def test_real_dev_pool_split() -> None:
    labels = DATA / "labels.csv"
    if not labels.is_file():
        pytest.skip(f"dev pool not found at {DATA}")
    samples = discover(labels)
    assert describe(samples) == {"images": 2855, "malignant_images": 988,
                                 "benign_images": 1867, "patients": 818}
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # every image has a patient id: no fallback warning
        train, val = split_by_patient(samples, 0.2, seed=0)
    _check_split(train, val, samples)
    assert split_by_patient(samples, 0.2, seed=0) == (train, val)
    patients = describe(val)["patients"]
    assert 0.18 < patients / 818 < 0.22
    assert 0.25 < describe(val)["malignant_images"] / len(val) < 0.42


def test_importing_the_commands_does_not_import_tensorflow() -> None:
    code = ("import sys, trainer.commands, export.commands; "
            "bad = [m for m in ('tensorflow', 'keras', 'tf2onnx') if m in sys.modules]; "
            "sys.exit(', '.join(bad) or None)")
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr


def test_commands_turn_user_mistakes_into_one_line(tmp_path: Path) -> None:
    from click.testing import CliRunner

    from export.commands import export
    from trainer.commands import train

    runner = CliRunner()
    result = runner.invoke(train, [str(tmp_path / "nowhere"), "--out", str(tmp_path / "run")])
    assert result.exit_code == 1 and "does not exist" in result.output
    _make_folder(tmp_path / "one-class", {"benign": 2})
    result = runner.invoke(train, [str(tmp_path / "one-class"), "--out", str(tmp_path / "run")])
    assert result.exit_code == 1 and "no malignant/ subfolder" in result.output
    export_args = [str(tmp_path / "best.keras"), "--out", str(tmp_path / "m.onnx")]
    result = runner.invoke(export, export_args)
    assert result.exit_code == 1 and "Keras model not found" in result.output
    (tmp_path / "best.keras").write_bytes(b"not a model")
    result = runner.invoke(export, export_args)
    assert result.exit_code == 1 and "metrics.json not found" in result.output
    assert "Traceback" not in result.output
