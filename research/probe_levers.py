"""The lever table for the linear-probe recipe: the "new women, new sites" panel per lever.

Features must be cached first (``screen features``; see models/EXPERIMENTS.md for
the exact commands). Each lever is judged by :func:`trainer.panel.run_panel` (as ``screen
panel --features`` does), its full result written as JSON, and one Markdown row printed:

    python research/probe_levers.py ../shared/data/mammo-3383/labels.csv runs/features \\
        --site-column rsna_site_id --machine-column rsna_machine_id \\
        --out runs/probe_panel s384:avg s384:avg:flip s384:avg:flip:tta s384_crop:avg
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from trainer.features import load_feature_sets  # noqa: E402
from trainer.panel import PanelData, run_panel  # noqa: E402
from trainer.probe import probe_fit_score  # noqa: E402

HEADER = ("| lever | worst | leave-one-site-out (each site) | machine-balanced (mean) | "
          "hold-out image AUC (mean / 5th pct.) | breast (mean) |\n|---|---|---|---|---|---|")


def _f(v: float | None) -> str:
    return "n/a" if v is None else f"{v:.3f}"


def row(name: str, r: dict) -> str:
    h = r["holdouts"]
    loso = ", ".join(f"{s}: {_f(v['image_auc'])}" for s, v in r["leave_one_site_out"].items())
    return (f"| {name} | {_f(r.get('worst'))} | {loso or 'n/a'} | "
            f"{_f(h['machine_balanced_auc']['mean'])} | {_f(h['image_auc']['mean'])} / "
            f"{_f(h['image_auc']['p5'])} | {_f(h['breast_auc']['mean'])} |")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("source")
    p.add_argument("features_dir", type=Path)
    p.add_argument("levers", nargs="+",
                   help="FEATURES[,FEATURES...]:POOLING[:flip][:tta], e.g. s384:avg:flip:tta "
                        "or s256,s384:avg (feature sets side by side)")
    p.add_argument("--site-column", default=None)
    p.add_argument("--machine-column", default=None)
    p.add_argument("--holdouts", type=int, default=10)
    p.add_argument("--out", type=Path, required=True)
    a = p.parse_args()
    a.out.mkdir(parents=True, exist_ok=True)
    rows = []
    for lever in a.levers:
        started = time.time()
        stem, pooling, *flags = lever.split(":")
        samples, feats, settings = load_feature_sets(
            [a.features_dir / f"{x}.npz" for x in stem.split(",")], a.source, pooling)
        y = np.array([s.label for s in samples])
        patients = np.array([s.patient_id or str(s.path) for s in samples])
        data = PanelData.from_csv(a.source, samples, a.site_column, a.machine_column)
        result = run_panel(data, probe_fit_score(feats, y, patients, "flip" in flags,
                                                 "tta" in flags), a.holdouts, progress=None)
        result["recipe"] = {"name": lever, "preprocessing": [json.loads(s) for s in settings]}
        name = lever.replace(":", "_").replace("+", "").replace(",", "-")
        (a.out / f"{name}.json").write_text(json.dumps(result, indent=2) + "\n")
        rows.append(row(lever, result))
        print(rows[-1], f"({time.time() - started:.0f} s)", flush=True)
    print(HEADER)
    print("\n".join(rows))


if __name__ == "__main__":
    main()
