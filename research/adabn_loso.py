"""AdaBN on leave-one-site-out: does re-estimating the frozen front's batch-norm statistics
on the held-out site's own images (never its labels) raise its AUC?

Paired, per seed, on the same cached maps and the same fits as ``top_levers_loso.py``
(the shipped recipe, :class:`trainer.top.TopConfig`):

* ``shipped``: the recipe as it is (front with ImageNet statistics on both sides);
* ``adabn_target``: the same top (same training maps, same seed), but the held-out site's
  maps come from a front whose statistics were re-estimated on that site's images: what
  adapting the shipped model to a new site would do;
* ``adabn_both``: every site's maps from a front adapted to that site (training and scoring
  alike), the textbook AdaBN, which would need the model retrained that way.

Each fit is appended to ``--out`` (JSON lines); a rerun skips fits already there.

    python research/adabn_loso.py ../shared/data/mammo-3383/labels.csv \\
        --site-column rsna_site_id --machine-column rsna_machine_id \\
        --out research/results/adabn_loso.jsonl --seeds 0 1 2
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import keras  # noqa: E402

from research.top_levers import fits_done, summary  # noqa: E402
from trainer.adapt import adapt_batch_norm  # noqa: E402
from trainer.panel import leave_one_site_out  # noqa: E402
from trainer.panel_recipes import load_pool  # noqa: E402
from trainer.top import TopConfig, build_front, cached_maps, fit, maps_paths, score  # noqa: E402
from worker.imaging.preprocess import PreprocessSettings  # noqa: E402

BASE = TopConfig()
VARIANTS = ("shipped", "adabn_target", "adabn_both")


def site_adapted_maps(x: np.ndarray, sites: np.ndarray, cache: Path, tag: str, limit: int
                      ) -> tuple[np.ndarray, np.ndarray]:
    """Maps of every image from a front whose BN statistics were re-estimated on the images
    of that image's own site (unlabelled), plain and mirrored."""
    plain = mirrored = None
    for site in sorted(set(sites.tolist()) - {""}):
        rows = np.where(sites == site)[0]
        site_x = x[rows]
        front = build_front(BASE)
        site_tag = f"{tag}:adabn:{site}:{limit}"
        paths = maps_paths(BASE, site_x, site_tag, cache, ("plain", "mirrored"))
        if not all(path.is_file() for path in paths or []):  # else cached: no need to adapt
            started = time.time()
            n = adapt_batch_norm(front, site_x, limit=limit, seed=0)
            print(f"site {site}: {n} BN layers re-estimated on {min(limit, len(rows))} of "
                  f"its {len(rows)} images in {time.time() - started:.0f}s", flush=True)
        p, m = cached_maps(front, site_x, BASE, cache, tag=site_tag)
        if plain is None:
            plain = np.zeros((len(x), *p.shape[1:]), np.float16)
            mirrored = np.zeros_like(plain)
        plain[rows], mirrored[rows] = p, m
        keras.backend.clear_session()
    return plain, mirrored


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("labels_csv")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--site-column", required=True)
    p.add_argument("--machine-column", required=True)
    p.add_argument("--cache", type=Path, default=REPO / "runs" / "cache")
    p.add_argument("--limit", type=int, default=512,
                   help="images per site the statistics are estimated on")
    a = p.parse_args()

    preprocess = PreprocessSettings(size=BASE.size)
    x, data = load_pool(a.labels_csv, a.site_column, a.machine_column, a.cache, preprocess)
    tag = preprocess.to_json()
    base = cached_maps(build_front(BASE), x, BASE, a.cache, tag=tag)
    keras.backend.clear_session()
    adapted = site_adapted_maps(x, data.sites, a.cache, tag, a.limit)
    # variant -> (maps the top trains on, maps the held-out site is scored on)
    maps = {"shipped": (base, base), "adabn_target": (base, adapted),
            "adabn_both": (adapted, adapted)}
    y = data.y

    done = fits_done(a.out)
    a.out.parent.mkdir(parents=True, exist_ok=True)
    # `shipped` and `adabn_target` train the same top (same maps, same seed): it is fitted
    # once, and its scores of the adapted maps are kept for `adabn_target`.
    adapted_scores: dict[tuple[int, bytes], np.ndarray] = {}
    # The shippable comparison (shipped against adabn_target) over every seed first.
    order = [(n, s) for s in a.seeds for n in VARIANTS[:2]] + [(VARIANTS[2], s) for s in a.seeds]
    for name, seed in order:
        if (name, seed) in done:
            continue
        (tp, tm), (sp, sm) = maps[name]

        def fit_score(tr: np.ndarray, te: np.ndarray, seed: int, name=name,
                      tp=tp, tm=tm, sp=sp, sm=sm) -> np.ndarray:
            key = (seed, te.tobytes())
            if name == "adabn_target" and key in adapted_scores:
                return adapted_scores.pop(key)
            started = time.time()
            top = fit(BASE, tp, tm, tr, y[tr], seed)
            out = score(top, sp, sm, te, BASE.tta)
            if name == "shipped":
                adapted_scores[key] = score(top, *adapted, te, BASE.tta)
            print(f"fit on {len(tr)} images in {time.time() - started:.0f}s", flush=True)
            keras.backend.clear_session()
            return out

        loso = leave_one_site_out(data, fit_score, seed,
                                  progress=lambda line, n=name, s=seed:
                                  print(f"[{n} seed {s}] {line}", flush=True))
        with a.out.open("a") as fh:
            fh.write(json.dumps({"lever": name, "seed": seed, "recipe": BASE.to_dict(),
                                 "adabn_images_per_site": a.limit,
                                 "leave_one_site_out": loso}) + "\n")
    print(summary(a.out))


if __name__ == "__main__":
    main()
