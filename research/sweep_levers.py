"""Judge the network-training levers with the "new women, new sites" panel, several at once.

Written for a GPU machine, where one call runs every lever in parallel; each lever is one
``screen panel --finetune`` process with its own options, so any single row can be rerun on
CPU. Results are collected into one JSON (rewritten as levers finish, so a run cut short
still reports what finished).

    python research/sweep_levers.py DATA/labels.csv --out OUTDIR --deadline 480 \\
        --site-column rsna_site_id --machine-column rsna_machine_id
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

# name -> `screen panel` options. Patient-grouped throughout, fixed epochs per fit.
LEVERS: dict[str, list[str]] = {
    "cnn256_scratch": ["--finetune", "cnn", "--size", "256"],
    "lite0_256": ["--finetune", "lite0", "--size", "256"],
    "lite0_256_no_intensity_augment": ["--finetune", "lite0", "--size", "256",
                                       "--no-intensity-augment"],
    "lite0_256_range": ["--finetune", "lite0", "--size", "256", "--intensity", "range"],
    "lite0_384": ["--finetune", "lite0", "--size", "384"],
    "lite0_512": ["--finetune", "lite0", "--size", "512"],
}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("labels_csv")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--epochs", type=int, default=4)
    p.add_argument("--holdouts", type=int, default=10)
    p.add_argument("--site-column", default=None)
    p.add_argument("--machine-column", default=None)
    p.add_argument("--deadline", type=float, default=480.0, help="seconds before giving up")
    p.add_argument("--only", nargs="*", help="run only these levers")
    a = p.parse_args()
    work = Path("/tmp/sweep")
    work.mkdir(parents=True, exist_ok=True)
    a.out.mkdir(parents=True, exist_ok=True)
    procs: dict[str, subprocess.Popen[bytes]] = {}
    for name, opts in LEVERS.items():
        if a.only and name not in a.only:
            continue
        if "--epochs" not in opts:
            opts = [*opts, "--epochs", str(a.epochs)]
        groups = [*(["--site-column", a.site_column] if a.site_column else []),
                  *(["--machine-column", a.machine_column] if a.machine_column else [])]
        cmd = [sys.executable, "-m", "worker", "panel", a.labels_csv, *opts, *groups,
               "--holdouts", str(a.holdouts), "--cache", str(work / "cache"), "--name", name,
               "--out", str(work / f"{name}.json")]
        log = (work / f"{name}.log").open("wb")
        procs[name] = subprocess.Popen(cmd, cwd=REPO, stdout=log, stderr=subprocess.STDOUT,
                                       env={**os.environ, "PYTHONUNBUFFERED": "1"})
    start = time.time()
    while True:
        running = [n for n, pr in procs.items() if pr.poll() is None]
        collect(work, procs, a.out, time.time() - start)
        if not running:
            break
        if time.time() - start > a.deadline:
            for n in running:
                procs[n].kill()
                procs[n].wait()
            collect(work, procs, a.out, time.time() - start)
            break
        time.sleep(15)


def collect(work: Path, procs: dict[str, subprocess.Popen[bytes]], out: Path,
            elapsed: float) -> None:
    results = {}
    logs = []
    for name, pr in procs.items():
        f = work / f"{name}.json"
        results[name] = json.loads(f.read_text()) if f.exists() else {
            "status": "running" if pr.poll() is None else f"exit {pr.returncode}"}
        lines = (work / f"{name}.log").read_text(errors="replace").splitlines()
        keep = [ln for ln in lines if name in ln or "Error" in ln or "Traceback" in ln]
        logs.append(f"== {name}\n" + "\n".join(keep[-30:] + lines[-15:]))
    (out / "sweep.json").write_text(json.dumps({"elapsed_s": round(elapsed), **results},
                                               indent=1))
    (out / "sweep_logs.txt").write_text("\n".join(logs))


if __name__ == "__main__":
    main()
