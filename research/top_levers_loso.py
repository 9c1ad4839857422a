"""Screen levers of the top recipe on leave-one-site-out, over several seeds.

One leave-one-site-out fit moves by ~0.03 with its seed alone (models/EXPERIMENTS.md), so a
single panel row cannot tell two recipes apart by less than that. This script fits each
lever's two leave-one-site-out directions with several seeds on the same cached maps (the
panel's first figure, :func:`trainer.panel.leave_one_site_out`) and prints each direction's
mean and spread over the seeds; the finalist then takes the whole panel (`screen panel`).
Every fit is appended to ``--out`` (JSON lines) as it ends, and a rerun skips fits already
there.

    python research/top_levers_loso.py ../shared/data/mammo-3383/labels.csv \\
        --site-column rsna_site_id --machine-column rsna_machine_id \\
        --out research/results/top_levers_loso.jsonl --seeds 0 1 2 \\
        [--auxiliary-column rsna_density]

``auxiliary_*`` levers learn ``--auxiliary-column`` beside the score; ``adversarial_machine_*``
levers learn the machine with its gradient reversed into the features.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from research.top_levers import (  # noqa: E402
    LeverConfig,
    auxiliary_codes,
    fits_done,
    intensity_view_maps,
    lever_fit_score,
    summary,
)
from trainer.dataset import read_columns  # noqa: E402
from trainer.panel import leave_one_site_out  # noqa: E402
from trainer.panel_recipes import load_pool  # noqa: E402
from trainer.top import build_front, cached_maps  # noqa: E402
from worker.imaging.preprocess import PreprocessSettings  # noqa: E402

BASE = LeverConfig()  # the shipped recipe: 384 px, block 15 trained, 6 epochs
LEVERS: dict[str, LeverConfig] = {
    "shipped": BASE,
    "ema": replace(BASE, ema=True),
    "label_smoothing_0.1": replace(BASE, label_smoothing=0.1),
    "intensity_views_2": replace(BASE, intensity_views=2),
    "epochs_10": replace(BASE, epochs=10),
    "regularised": replace(BASE, dropout=0.5, weight_decay=1e-2),
    # with --auxiliary-column (a reading of the image, e.g. breast density)
    "auxiliary_0.3": replace(BASE, auxiliary_weight=0.3),
    # the machine (--machine-column) as a target the features should not carry
    "adversarial_machine_0.1": replace(BASE, auxiliary_weight=0.1, auxiliary_reversed=True),
    "adversarial_machine_0.3": replace(BASE, auxiliary_weight=0.3, auxiliary_reversed=True),
    "adversarial_machine_1": replace(BASE, auxiliary_weight=1.0, auxiliary_reversed=True),
    # ... with machine-balanced training, whose weights the adversary learns under too
    "machine_balanced": replace(BASE, machine_balanced=True),
    "balanced_adversarial_machine_0.3": replace(BASE, machine_balanced=True,
                                                auxiliary_weight=0.3, auxiliary_reversed=True),
    # ... reading unit-length features, so that growing them cannot raise its loss
    "normalised_adversarial_machine_0.3": replace(BASE, auxiliary_weight=0.3,
                                                  auxiliary_reversed=True,
                                                  auxiliary_normalised=True),
    "normalised_adversarial_machine_1": replace(BASE, auxiliary_weight=1.0,
                                                auxiliary_reversed=True,
                                                auxiliary_normalised=True),
}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("labels_csv")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--only", nargs="*", help="run only these levers, in this order")
    p.add_argument("--site-column", required=True)
    p.add_argument("--machine-column", required=True)
    p.add_argument("--auxiliary-column", help="the auxiliary target of auxiliary_* levers")
    p.add_argument("--cache", type=Path, default=REPO / "runs" / "cache")
    p.add_argument("--crop", action="store_true",
                   help="preprocess with the breast crop (each lever recorded as LEVER+crop)")
    a = p.parse_args()
    names = a.only or list(LEVERS)
    unknown = sorted(set(names) - set(LEVERS))
    if unknown:
        p.error(f"unknown levers: {', '.join(unknown)} (known: {', '.join(LEVERS)})")

    preprocess = PreprocessSettings(size=BASE.size, crop=a.crop)
    suffix = "+crop" if a.crop else ""
    x, data = load_pool(a.labels_csv, a.site_column, a.machine_column, a.cache, preprocess)
    front = build_front(BASE)
    tag = preprocess.to_json()
    plain, mirrored = cached_maps(front, x, BASE, a.cache, tag=tag)
    auxiliary = None
    if any(LEVERS[n].auxiliary_weight and not LEVERS[n].auxiliary_reversed for n in names):
        if not a.auxiliary_column:
            p.error("auxiliary_* levers need --auxiliary-column")
        column = read_columns(a.labels_csv, data.samples, [a.auxiliary_column])[a.auxiliary_column]
        auxiliary, classes = auxiliary_codes(column)
        print(f"auxiliary target {a.auxiliary_column}: {classes}, known for "
              f"{int(np.sum(auxiliary >= 0))} of {len(auxiliary)} images", flush=True)
    machine_codes, _ = auxiliary_codes(list(data.machines))
    most_views = max(LEVERS[n].intensity_views for n in names)
    views = (intensity_view_maps(front, x, replace(BASE, intensity_views=most_views), a.cache,
                                 tag=tag) if most_views else [])

    done = fits_done(a.out)
    a.out.parent.mkdir(parents=True, exist_ok=True)
    for name in names:
        cfg = LEVERS[name]
        for seed in a.seeds:
            if (name + suffix, seed) in done:
                continue
            # The lever's auxiliary target and the column it comes from, if any.
            target, column = ((machine_codes, a.machine_column) if cfg.auxiliary_reversed
                              else (auxiliary, a.auxiliary_column) if cfg.auxiliary_weight
                              else (None, None))
            fit_score = lever_fit_score(cfg, plain, mirrored, data.y, machines=data.machines,
                                        views=views[:cfg.intensity_views], auxiliary=target)
            loso = leave_one_site_out(data, fit_score, seed,
                                      progress=lambda line, n=name, s=seed:
                                      print(f"[{n}{suffix} seed {s}] {line}", flush=True))
            with a.out.open("a") as fh:
                fh.write(json.dumps({"lever": name + suffix, "seed": seed, "recipe": cfg.to_dict(),
                                     "auxiliary_column": column,
                                     "leave_one_site_out": loso}) + "\n")
    print(summary(a.out))



if __name__ == "__main__":
    main()
