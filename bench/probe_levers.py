"""The lever table for the linear-probe recipe: one patient-grouped 5-fold CV per lever.

Features must be cached first (``python -m trainer.features``; see models/EXPERIMENTS.md for
the exact commands). Each lever writes its full result as JSON and one Markdown row is
printed per lever, with the shortcut checks (machine 49, leave-one-site-out) beside the AUC:

    python bench/probe_levers.py ../shared/data/mammo-3383/labels.csv runs/features \\
        --out runs/probe_cv s384:avg s384:avg:flip s384:avg:flip:tta s384_crop:avg
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from trainer.probe_cv import ProbeCVConfig, probe_cross_validate  # noqa: E402

HEADER = ("| lever | image AUC (5-fold mean ± sd) | pooled | breast | machine 49 | "
          "site 1 → 2 | site 2 → 1 | sens. | spec. |\n|---|---|---|---|---|---|---|---|---|")


def _f(v: float | None) -> str:
    return "n/a" if v is None else f"{v:.3f}"


def row(name: str, r: dict) -> str:
    loso = r.get("leave_one_site_out_auc", {})
    return (f"| {name} | {r['auc_mean']:.3f} ± {r['auc_sd']:.3f} | {_f(r['auc_pooled'])} | "
            f"{_f(r['breast_auc'])} | {_f(r['machine49_auc'])} | {_f(loso.get('site2'))} | "
            f"{_f(loso.get('site1'))} | {r['sensitivity']:.1%} | {r['specificity']:.1%} |")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("source")
    p.add_argument("features_dir", type=Path)
    p.add_argument("levers", nargs="+",
                   help="FEATURES[,FEATURES...]:POOLING[:flip][:tta], e.g. s384:avg:flip:tta "
                        "or s256,s384:avg (feature sets side by side)")
    p.add_argument("--out", type=Path, required=True)
    a = p.parse_args()
    a.out.mkdir(parents=True, exist_ok=True)
    rows = []
    for lever in a.levers:
        stem, pooling, *flags = lever.split(":")
        cfg = ProbeCVConfig(source=a.source,
                            features=[a.features_dir / f"{x}.npz" for x in stem.split(",")],
                            pooling=pooling, flip_train="flip" in flags, tta="tta" in flags,
                            name=lever)
        result = probe_cross_validate(cfg)
        (a.out / f"{lever.replace(':', '_').replace('+', '').replace(',', '-')}.json").write_text(
            json.dumps(result, indent=2) + "\n")
        rows.append(row(lever, result))
        print(rows[-1], f"({result['seconds']:.0f} s)", flush=True)
    print(HEADER)
    print("\n".join(rows))


if __name__ == "__main__":
    main()
