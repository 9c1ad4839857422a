"""Find labelled mammograms on disk and split them by patient.

Two layouts are understood:

* a folder with ``benign/`` and ``malignant/`` subfolders (``0/`` and ``1/`` are accepted as
  aliases), optionally one level down under ``train/``, ``valid/`` and ``test/`` (the Roboflow /
  Kaggle export layout; the split each image came from is recorded);
* a CSV with ``filename,label[,patient_id]`` columns, file names relative to the CSV's folder
  (the dev pool's ``labels.csv``). A ``laterality`` column, if present, is kept for breast-level
  evaluation and grouping only; no CSV column is ever a model input.

A folder that holds a ``labels.csv`` is read through that CSV, because only the CSV knows the
patients, and a split that is not by patient leaks the same woman into training and validation.

NumPy and the standard library only: this module must import without TensorFlow.
"""

from __future__ import annotations

import csv
import re
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from worker.imaging.dicom import is_dicom_file
from worker.imaging.preprocess import IMAGE_EXTENSIONS

CLASS_NAMES = ("benign", "malignant")
# Folder names accepted for each class: the project's names and Kaggle's 0/1 export.
_CLASS_DIRS = {"benign": 0, "0": 0, "malignant": 1, "1": 1}
# Split folder name -> the split we record. Roboflow writes "valid"; others write "val".
_SPLIT_DIRS = {"train": "train", "valid": "valid", "val": "valid", "validation": "valid",
               "test": "test"}
_LABEL_VALUES = {"0": 0, "benign": 0, "1": 1, "malignant": 1}
CSV_NAME = "labels.csv"


class DatasetError(ValueError):
    """A layout, label or split problem the user must fix; the message is one line."""


@dataclass(frozen=True)
class Sample:
    """One labelled image. ``label`` is 0 (benign) or 1 (malignant)."""

    path: Path
    label: int
    patient_id: str | None = None
    laterality: str | None = None
    split: str | None = None

    @property
    def breast_id(self) -> str | None:
        """Patient + side: the unit a breast-level score averages over (None if unknown)."""
        if self.patient_id is None or self.laterality is None:
            return None
        return f"{self.patient_id}:{self.laterality}"


def discover(source: str | Path, patient_regex: str | None = None) -> list[Sample]:
    """All labelled images under ``source`` (a folder or a CSV file), in a stable order.

    ``patient_regex``, for folder layouts only: a regular expression whose first group,
    searched in the file name, is the patient id (e.g. ``^(\\d+)_`` for the Roboflow names
    ``<patient>_<image>_png.rf.<hash>.jpg``). Without it, folder images have no patient id.
    Raises ``ValueError`` with a one-line reason when the layout or a label is wrong.
    """
    src = Path(source)
    if not src.exists():
        raise DatasetError(f"{src} does not exist")
    if src.is_file():
        if src.suffix.lower() != ".csv":
            raise DatasetError(f"{src} is a file but not a .csv label list")
        return _discover_csv(src)
    if (src / CSV_NAME).is_file() and not _class_dirs(src):
        return _discover_csv(src / CSV_NAME)
    return _discover_folder(src, patient_regex)


def _class_dirs(folder: Path) -> dict[int, list[Path]]:
    found: dict[int, list[Path]] = {}
    for child in sorted(folder.iterdir()):
        if child.is_dir() and child.name.lower() in _CLASS_DIRS:
            found.setdefault(_CLASS_DIRS[child.name.lower()], []).append(child)
    return found


def _images_in(folder: Path) -> list[Path]:
    # DICOM by content: PACS exports are extensionless or named by SOP Instance UID.
    return sorted(
        p
        for p in folder.rglob("*")
        if p.is_file()
        and (p.suffix.lower() in IMAGE_EXTENSIONS or is_dicom_file(p))
    )


def _discover_folder(root: Path, patient_regex: str | None) -> list[Sample]:
    pattern = re.compile(patient_regex) if patient_regex else None
    split_dirs = {
        child: _SPLIT_DIRS[child.name.lower()]
        for child in sorted(root.iterdir())
        if child.is_dir() and child.name.lower() in _SPLIT_DIRS
    }
    top_classes = _class_dirs(root)
    if top_classes and split_dirs:
        raise DatasetError(
            f"{root} has both class folders and split folders "
            f"({', '.join(d.name for d in split_dirs)}); "
            "use one layout: benign/ + malignant/, or train/ valid/ test/ each holding them"
        )
    groups: list[tuple[Path, str | None]] = (
        [(root, None)] if top_classes else [(d, s) for d, s in split_dirs.items()]
    )
    if not groups:
        raise DatasetError(
            f"{root} has no benign/ and malignant/ subfolders (nor train/ valid/ test/ holding "
            f"them, nor a {CSV_NAME})"
        )
    samples: list[Sample] = []
    for folder, split in groups:
        classes = _class_dirs(folder)
        missing = [CLASS_NAMES[c] for c in (0, 1) if c not in classes]
        if missing:
            raise DatasetError(f"{folder} has no {' or '.join(m + '/' for m in missing)} subfolder")
        for label in (0, 1):
            for class_dir in classes[label]:
                for path in _images_in(class_dir):
                    samples.append(
                        Sample(path, label, _patient_from_name(path, pattern), None, split)
                    )
    _check_both_classes(samples, root)
    return samples


def _patient_from_name(path: Path, pattern: re.Pattern[str] | None) -> str | None:
    if pattern is None:
        return None
    match = pattern.search(path.name)
    if match is None:
        raise DatasetError(f"patient pattern {pattern.pattern!r} does not match {path.name}")
    return match.group(1) if match.groups() else match.group(0)


def _discover_csv(csv_path: Path) -> list[Sample]:
    base = csv_path.parent
    with csv_path.open(newline="", encoding="utf-8-sig") as fh:
        reader = csv.DictReader(fh)
        columns = [c.strip().lower() for c in reader.fieldnames or []]
        for needed in ("filename", "label"):
            if needed not in columns:
                raise DatasetError(
                    f"{csv_path} needs a '{needed}' column (has: {', '.join(columns) or 'none'})"
                )
        rows = [{k.strip().lower(): (v or "").strip() for k, v in row.items() if k}
                for row in reader]
    samples: list[Sample] = []
    missing: list[str] = []
    for line_no, row in enumerate(rows, start=2):  # line 1 is the header
        raw_label = row["label"].lower()
        if raw_label not in _LABEL_VALUES:
            raise DatasetError(
                f"{csv_path}:{line_no}: label {row['label']!r} is not one of "
                "benign/malignant/0/1"
            )
        if not row["filename"]:
            raise DatasetError(f"{csv_path}:{line_no}: empty filename")
        path = base / row["filename"]
        if not path.is_file():
            missing.append(row["filename"])
            continue
        split = _SPLIT_DIRS.get(row.get("split", "").lower()) if row.get("split") else None
        samples.append(
            Sample(
                path=path,
                label=_LABEL_VALUES[raw_label],
                patient_id=row.get("patient_id") or None,
                laterality=(row.get("laterality") or "").upper() or None,
                split=split,
            )
        )
    if missing:
        raise DatasetError(
            f"{csv_path}: {len(missing)} listed file(s) not found relative to {base}, "
            f"e.g. {missing[0]}"
        )
    _check_both_classes(samples, csv_path)
    return samples


def _check_both_classes(samples: Sequence[Sample], where: Path) -> None:
    if not samples:
        raise DatasetError(f"no images found in {where}")
    counts = np.bincount([s.label for s in samples], minlength=2)
    if counts.min() == 0:
        absent = CLASS_NAMES[int(np.argmin(counts))]
        raise DatasetError(f"{where}: no {absent} images; training needs both classes")


def split_strategy(samples: Sequence[Sample]) -> str:
    """How :func:`split_by_patient` will split these samples: patient, folder or image."""
    if any(s.patient_id is not None for s in samples):
        return "patient"
    if any(s.split == "valid" for s in samples) and any(s.split == "train" for s in samples):
        return "folder"
    return "image"


def _group_key(s: Sample) -> str:
    # An image without a patient id is its own group; it cannot leak anyone else.
    return s.patient_id if s.patient_id is not None else f"image:{s.path}"


def _strata(samples: Iterable[Sample]) -> dict[int, list[str]]:
    """Patients by stratum (1 = has any malignant image), in sorted order for determinism."""
    positive: dict[str, bool] = {}
    for s in samples:
        key = _group_key(s)
        positive[key] = positive.get(key, False) or s.label == 1
    return {
        stratum: sorted(k for k, pos in positive.items() if int(pos) == stratum)
        for stratum in (0, 1)
    }


def split_by_patient(
    samples: Sequence[Sample], val_fraction: float = 0.2, seed: int = 0
) -> tuple[list[Sample], list[Sample]]:
    """(train, validation) with no patient on both sides, stratified by malignant patients.

    Images of the ``test`` split (folder layout) are held out of both. Without any patient id,
    the folder's own train/valid split is used when there is one; otherwise images are split
    one by one (stratified), with a warning, since images of one woman may then be on both sides.
    """
    if not 0.0 < val_fraction < 1.0:
        raise DatasetError(f"val_fraction must be between 0 and 1, got {val_fraction}")
    pool = [s for s in samples if s.split != "test"]
    strategy = split_strategy(pool)
    if strategy == "folder":
        return [s for s in pool if s.split == "train"], [s for s in pool if s.split == "valid"]
    if strategy == "image":
        warnings.warn(
            "no patient ids and no train/valid folders: splitting per image, so one patient's "
            "images may be on both sides and validation figures will be optimistic",
            stacklevel=2,
        )
    elif any(s.patient_id is None for s in pool):
        warnings.warn("some images have no patient id; each is treated as its own patient",
                      stacklevel=2)
    rng = np.random.default_rng(seed)
    val_keys: set[str] = set()
    for keys in _strata(pool).values():
        if not keys:
            continue
        n_val = int(round(val_fraction * len(keys)))
        # Keep at least one group on each side when the stratum allows it.
        n_val = min(max(n_val, 1), len(keys) - 1) if len(keys) > 1 else 0
        order = rng.permutation(len(keys))
        val_keys.update(keys[i] for i in order[:n_val])
    train = [s for s in pool if _group_key(s) not in val_keys]
    val = [s for s in pool if _group_key(s) in val_keys]
    return train, val


def source_folder(source: str | Path) -> Path:
    """The folder a labelled source's file names are relative to: a labels CSV's own folder,
    or the folder itself."""
    source = Path(source)
    return source.parent if source.is_file() else source


def read_predictions(csv_path: str | Path, base: str | Path) -> list[Sample]:
    """The labelled images of a run's ``val_predictions.csv`` (file names relative to
    ``base``, the training source's folder), in file order; [] when there is no such file."""
    path = Path(csv_path)
    if not path.is_file():
        return []
    with path.open(newline="") as fh:
        return [Sample(Path(base) / r["filename"], _LABEL_VALUES[r["label"].lower()],
                       r.get("patient_id") or None, r.get("laterality") or None)
                for r in csv.DictReader(fh)]


def read_columns(csv_path: str | Path, samples: Sequence[Sample], columns: Sequence[str]
                 ) -> dict[str, np.ndarray]:
    """The named CSV columns for each sample ("" where a row or value is missing): grouping
    facts such as site or machine, for evaluation only, never model inputs."""
    csv_path = Path(csv_path)
    if csv_path.is_dir():
        csv_path = csv_path / CSV_NAME
    if not csv_path.is_file():
        if columns:
            raise DatasetError(f"grouping columns need a labels CSV; {csv_path} is not one")
        return {}
    with csv_path.open(newline="", encoding="utf-8-sig") as fh:
        reader = csv.DictReader(fh)
        have = {c.strip().lower(): c for c in reader.fieldnames or []}
        missing = [c for c in columns if c.lower() not in have]
        if missing:
            raise DatasetError(f"{csv_path} has no column {', '.join(missing)} "
                               f"(has: {', '.join(have)})")
        by_path = {str((csv_path.parent / r[have["filename"]].strip()).resolve()): r
                   for r in reader}
    rows = [by_path.get(str(s.path.resolve()), {}) for s in samples]
    return {c: np.array([(r.get(have[c.lower()]) or "").strip() for r in rows])
            for c in columns}


def describe(samples: Sequence[Sample]) -> dict[str, int]:
    """Image, malignant-image and patient counts, for logs and the model card."""
    patients = {s.patient_id for s in samples if s.patient_id is not None}
    return {
        "images": len(samples),
        "malignant_images": sum(s.label for s in samples),
        "benign_images": sum(1 - s.label for s in samples),
        "patients": len(patients),
    }


def limit_samples(samples: Sequence[Sample], n: int, seed: int = 0) -> list[Sample]:
    """About ``n`` images, taken whole patient by whole patient, both classes represented.

    For quick runs and tests: patients are drawn alternately from the malignant and benign
    strata (in a seeded order) until ``n`` images are reached; the original order is kept.
    """
    if n <= 0:
        raise DatasetError(f"limit must be positive, got {n}")
    if n >= len(samples):
        return list(samples)
    rng = np.random.default_rng(seed)
    by_key: dict[str, list[Sample]] = {}
    for s in samples:
        by_key.setdefault(_group_key(s), []).append(s)
    queues = [[keys[i] for i in rng.permutation(len(keys))] for keys in _strata(samples).values()]
    chosen: set[str] = set()
    count = 0
    while count < n and any(queues):
        for queue in queues:
            if queue and count < n:
                key = queue.pop(0)
                chosen.add(key)
                count += len(by_key[key])
    return [s for s in samples if _group_key(s) in chosen]
