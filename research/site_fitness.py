"""The fitness verdict (`screen report`) of the shipped model on dev-pool women it was not
trained on, as a site would get it: its validation split (both programmes), and the same
women of one programme only (`rsna_site_id`).

The images go through `screen process` once (real worker, SQLite), with identity from a
sidecar CSV (patient; study = patient, since each woman here has one screening exam; side);
each case is then a copy of that database with only its women's outcomes imported, so the
report audits those alone. Criteria: the [fitness] defaults, declared before this ran.

    python research/site_fitness.py ../shared/data/mammo-3383/labels.csv \\
        --out research/results/site_fitness.json
"""

from __future__ import annotations

import argparse
import csv
import json
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from trainer.dataset import discover, read_columns, split_by_patient  # noqa: E402

MODEL = REPO / "models" / "mammo-lite0-top-384.onnx"


def screen(config: Path, *args: str) -> str:
    proc = subprocess.run([sys.executable, "-m", "worker", "--config", str(config), *args],
                          cwd=REPO, capture_output=True, text=True)
    if proc.returncode:
        raise SystemExit(f"screen {' '.join(args)}: {proc.stderr.strip()}")
    return proc.stdout


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("labels_csv", type=Path)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--work", type=Path, default=REPO / "runs" / "site_fitness")
    a = p.parse_args()

    _, val = split_by_patient(discover(a.labels_csv), 0.2, 0)  # the shipped model's split
    columns = read_columns(a.labels_csv, val, ["rsna_site_id", "laterality"])
    base = a.work / "scored"
    shutil.rmtree(a.work, ignore_errors=True)
    (base / "inbox").mkdir(parents=True)
    with (base / "identity.csv").open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["filename", "patient_id", "study_uid", "laterality"])
        for s, side in zip(val, columns["laterality"], strict=True):
            shutil.copyfile(s.path, base / "inbox" / s.path.name)
            w.writerow([s.path.name, s.patient_id, f"study-{s.patient_id}", side])
    config_text = (
        "[paths]\ninbox = 'inbox'\nprocessed = 'processed'\nquarantine = 'quarantine'\n"
        "outbox = 'outbox'\ncreate_missing = true\n[database]\nurl = 'sqlite:///site.db'\n"
        f"[model]\npath = '{MODEL}'\n[worker]\nsettle_seconds = 0.1\n"
        "[identity]\nsidecar_csv = 'identity.csv'\n")
    (base / "config.toml").write_text(config_text)
    print(screen(base / "config.toml", "process", "--settle-now").strip(), flush=True)

    cases = {"validation split, both programmes": set(),
             **{f"validation split, programme {k} only": {k}
                for k in sorted(set(columns["rsna_site_id"]))}}
    results = {}
    for name, sites in cases.items():
        for level in ("image", "breast"):
            folder = a.work / f"{len(results)}"
            shutil.copytree(base, folder, ignore=shutil.ignore_patterns("inbox", "processed"))
            (folder / "config.toml").write_text(config_text + f"[fitness]\nlevel = '{level}'\n")
            rows = [(s, site) for s, site in zip(val, columns["rsna_site_id"], strict=True)
                    if not sites or site in sites]
            with (folder / "outcomes.csv").open("w") as fh:
                fh.write("filename,label\n")
                fh.writelines(f"{s.path.name},{'malignant' if s.label else 'benign'}\n"
                              for s, _ in rows)
            screen(folder / "config.toml", "outcomes", "import", str(folder / "outcomes.csv"))
            report = json.loads(screen(folder / "config.toml", "report", "--format", "json"))
            results[f"{name}, {level} level"] = {
                "images": len(rows), "women": len({s.patient_id for s, _ in rows}),
                "fitness": report["fitness"]}
            print(f"{name}, {level} level:\n" + "\n".join(
                screen(folder / "config.toml", "report").split("\n\nFITNESS")[1:2]), flush=True)
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
