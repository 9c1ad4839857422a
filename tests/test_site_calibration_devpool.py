"""The calibration target of issue 25, on real data: a site point calibrated for sensitivity
0.90 on half of a site's women gives, on the other half, a sensitivity inside the interval it
stated. The shipped model scores dev-pool women it was not trained on (its validation
split) through `screen process` (real ONNX Runtime, real SQLite); only the calibration
half's outcomes are imported, so `screen calibrate` sees nothing of the other half."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import DATA, SHIPPED_MODEL, run_screen

IMAGES = 200  # a modest sample: scored once per test session


def _screen(config: Path, *args: str) -> str:
    proc = run_screen(*args, config=config, timeout=600)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


@pytest.fixture(scope="session")
def scored_women(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, dict]]:
    """(config, file name -> {patient, malignant, score}) for about IMAGES validation-split
    images of whole women, scored by the shipped model."""
    if not DATA.is_dir():
        pytest.skip(f"dev pool not found at {DATA}")
    from trainer.dataset import discover, split_by_patient

    _, val = split_by_patient(discover(DATA / "labels.csv"), 0.2, 0)  # the model's own split
    by_patient: dict[str, list] = {}
    for s in val:
        by_patient.setdefault(s.patient_id, []).append(s)
    order = np.random.default_rng(25).permutation(sorted(by_patient))
    chosen = []
    for p in order:
        if len(chosen) >= IMAGES:
            break
        chosen += by_patient[p]
    folder = tmp_path_factory.mktemp("site")
    (folder / "inbox").mkdir()
    for s in chosen:
        shutil.copyfile(s.path, folder / "inbox" / s.path.name)
    config = folder / "config.toml"
    config.write_text(
        "[paths]\ninbox = 'inbox'\nprocessed = 'processed'\nquarantine = 'quarantine'\n"
        "outbox = 'outbox'\ncreate_missing = true\n[database]\nurl = 'sqlite:///site.db'\n"
        f"[model]\npath = '{SHIPPED_MODEL}'\n[worker]\nsettle_seconds = 0.1\n"
        "[identity]\nfilename_pattern = '^(?P<patient_id>[^_]+)_'\n")
    _screen(config, "process")
    scores = {r["filename"]: r["score"]
              for r in json.loads(_screen(config, "results", "--format", "json"))}
    women = {s.path.name: {"patient": s.patient_id, "malignant": s.label == 1,
                           "score": scores[s.path.name]} for s in chosen}
    return config, women


def test_sensitivity_on_held_out_women_falls_inside_the_stated_interval(scored_women) -> None:
    config, women = scored_women
    patients = sorted({w["patient"] for w in women.values()})
    half = set(np.random.default_rng(0).permutation(patients)[: len(patients) // 2])
    calibration = {f: w for f, w in women.items() if w["patient"] in half}
    held_out = {f: w for f, w in women.items() if w["patient"] not in half}
    csv = config.parent / "outcomes.csv"
    csv.write_text("filename,label\n" + "".join(
        f"{f},{'malignant' if w['malignant'] else 'benign'}\n" for f, w in calibration.items()))
    _screen(config, "outcomes", "import", str(csv))
    point = json.loads(_screen(config, "calibrate", "--sensitivity", "0.90", "--format", "json"))
    assert point["women"] == len(half) and point["units"] == len(calibration)
    cancers = np.array([w["score"] for w in held_out.values() if w["malignant"]])
    healthy = np.array([w["score"] for w in held_out.values() if not w["malignant"]])
    sensitivity = float(np.mean(cancers >= point["threshold"]))
    low, high = point["sensitivity_ci"]
    print(f"\ncalibrated on {len(half)} women ({point['positives']} malignant images): "
          f"threshold {point['threshold']:.4f}, sensitivity {point['sensitivity']:.3f} "
          f"({low:.3f}-{high:.3f}), specificity {point['specificity']:.3f} "
          f"{point['specificity_ci']}; held out {len(patients) - len(half)} women "
          f"({len(cancers)} malignant images): sensitivity {sensitivity:.3f}, specificity "
          f"{float(np.mean(healthy < point['threshold'])):.3f}")
    assert len(cancers) >= 20 and point["positives"] >= 20
    assert low <= sensitivity <= high
