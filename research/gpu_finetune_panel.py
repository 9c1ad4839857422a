"""Full fine-tuning of EfficientNet-Lite0 at 384-512 px, machine-balanced, under the panel, on
one GPU inside a fixed time budget.

The trainer's own pieces, in :func:`trainer.finetune.finetune_fit_score`'s arrangement
(:func:`trainer.panel.network_fit_score` over :func:`trainer.finetune.fit` +
:func:`trainer.fitting.predict` + ``clear_session``), plus an epoch timer; the worker's
preprocessing through :func:`trainer.arrays.cached_arrays`; the panel's own splits and seeds
(leave-one-site-out, then :func:`trainer.panel.holdout_splits`), so the figures compare with
``screen panel``'s. What differs from ``screen panel``: fits run split by split, most
informative first (leave-one-site-out at each size, then hold-outs at the size whose worst
leave-one-site-out AUC is higher), each fit is started only if it is projected to end inside
``--budget``, and every finished fit is appended to ``OUT/fits.jsonl`` at once, so a run
stopped at its limit keeps what it finished. The panel summary (``OUT/panel-SIZE.json``) is
:func:`trainer.panel.run_panel` replayed on the finished fits' scores.

    KERAS_BACKEND=jax python research/gpu_finetune_panel.py DATA/labels.csv --out OUT \\
        --sizes 512 384 --epochs 8 --batch-size 32 --lr 4.2e-4 --budget 500
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import keras  # noqa: E402

from trainer.arrays import cached_arrays  # noqa: E402
from trainer.dataset import Sample, discover, limit_samples  # noqa: E402
from trainer.finetune import FinetuneConfig, fit  # noqa: E402
from trainer.fitting import predict  # noqa: E402
from trainer.panel import (  # noqa: E402
    PanelData,
    breast_auc,
    fmt_auc,
    format_panel,
    holdout_splits,
    machine_balanced_weights,
    network_fit_score,
    run_panel,
)
from worker.audit.metrics import roc_auc, weighted_roc_auc  # noqa: E402
from worker.imaging.preprocess import PreprocessSettings  # noqa: E402

SITE_COLUMN, MACHINE_COLUMN = "rsna_site_id", "rsna_machine_id"
STARTED = time.time()


def say(line: str) -> None:
    print(f"[{time.time() - STARTED:6.1f}s] {line}", flush=True)


def describe_device() -> str:
    backend = keras.backend.backend()
    if backend == "jax":
        import jax

        return f"jax {jax.__version__}: {jax.devices()}"
    if backend == "torch":
        import torch

        name = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no CUDA"
        return f"torch {torch.__version__}: {name}"
    return backend


def present_only(labels: Path, into: Path) -> Path:
    """A copy of ``labels`` with absolute file names, listing only the files that exist (a
    smoke run on part of the staged data)."""
    with labels.open(newline="", encoding="utf-8-sig") as fh:
        reader = csv.DictReader(fh)
        rows = [r for r in reader if (labels.parent / r["filename"]).is_file()]
        fields = reader.fieldnames or []
    into.parent.mkdir(parents=True, exist_ok=True)
    with into.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=fields)
        writer.writeheader()
        for r in rows:
            writer.writerow({**r, "filename": str((labels.parent / r["filename"]).resolve())})
    return into


class EpochTimer(keras.callbacks.Callback):
    """Seconds per epoch (the first includes compilation), logged as it goes."""

    def __init__(self, images_per_epoch: int) -> None:
        super().__init__()
        self.images, self.seconds, self.begun = images_per_epoch, [], 0.0

    def on_epoch_begin(self, epoch: int, logs: dict[str, float] | None = None) -> None:
        self.begun = time.time()

    def on_epoch_end(self, epoch: int, logs: dict[str, float] | None = None) -> None:
        self.seconds.append(time.time() - self.begun)
        say(f"  epoch {epoch + 1}: {self.seconds[-1]:.1f} s, "
            f"{self.images / self.seconds[-1]:.0f} img/s, loss {(logs or {}).get('loss', 0):.4f}")


class Recipe:
    """One size's arrays, panel data and fit function, and a record of its finished fits."""

    def __init__(self, args: argparse.Namespace, samples: list[Sample], labels: Path,
                 size: int) -> None:
        self.size = size
        settings = PreprocessSettings(size=size, intensity="percentile")
        t = time.time()
        self.x, kept = cached_arrays(samples, settings, args.cache, threads=args.threads)
        say(f"{size} px: {len(kept)} images preprocessed in {time.time() - t:.1f} s "
            f"({self.x.nbytes / 1e9:.2f} GB uint8)")
        self.data = PanelData.from_csv(labels, kept, SITE_COLUMN, MACHINE_COLUMN)
        self.cfg = FinetuneConfig(arch="lite0", size=size, epochs=args.epochs,
                                  batch_size=args.batch_size, lr=args.lr,
                                  intensity_augment=True, tta=True,
                                  mixed_bfloat16=args.bf16, machine_balanced=True)
        self.name = f"lite0-ft{size}-mb"
        self.predict_batch = args.predict_batch
        self.done: dict[tuple[int, ...], np.ndarray] = {}  # (seed, *test rows) -> scores
        self.last: dict[str, Any] = {}
        self.fit_score = network_fit_score(self._fit_and_score, self.data.y,
                                           self.data.machines, machine_balanced=True)

    def _fit_and_score(self, tr: np.ndarray, te: np.ndarray, weight: np.ndarray | None,
                       seed: int) -> np.ndarray:
        # trainer.finetune.finetune_fit_score's body, with the epoch timer added.
        timer = EpochTimer((len(tr) // self.cfg.batch_size) * self.cfg.batch_size)
        t = time.time()
        model = fit(self.cfg, self.x[tr], self.data.y[tr], seed, sample_weight=weight,
                    callbacks=[timer])
        trained = time.time() - t
        # Pad the test images to whole batches (blank images, scores dropped): one inference
        # graph per size instead of one per test-set length (a recompilation under JAX).
        xt = self.x[te]
        pad = -len(xt) % self.predict_batch
        if pad:
            xt = np.concatenate([xt, np.zeros((pad, *xt.shape[1:]), xt.dtype)])
        scores = predict(model, xt, self.cfg.tta, batch_size=self.predict_batch)[:len(te)]
        keras.backend.clear_session()
        self.last = {"n_train_kept": int(len(tr)), "train_seconds": round(trained, 1),
                     "predict_seconds": round(time.time() - t - trained, 1),
                     "epoch_seconds": [round(s, 2) for s in timer.seconds]}
        return scores

    def run(self, split: str, tr: np.ndarray, te: np.ndarray, seed: int, out: Path) -> None:
        y, samples, machines = self.data.y, self.data.samples, self.data.machines
        t = time.time()
        scores = np.asarray(self.fit_score(tr, te, seed), np.float64)
        row = {"recipe": self.name, "size": self.size, "split": split, "seed": seed,
               "n_train": int(len(tr)), "n_test": int(len(te)),
               "image_auc": roc_auc(y[te], scores),
               "breast_auc": breast_auc(samples, te, scores),
               "machine_balanced_auc": weighted_roc_auc(
                   y[te], scores, machine_balanced_weights(y[te], machines[te])),
               "seconds": round(time.time() - t, 1), **self.last,
               "config": self.cfg.to_dict(), "backend": keras.backend.backend(),
               "test": te.tolist(), "scores": scores.round(6).tolist()}
        with (out / "fits.jsonl").open("a") as fh:
            fh.write(json.dumps(row) + "\n")
        self.done[(seed, *te.tolist())] = scores
        say(f"{self.name} {split}: image {fmt_auc(row['image_auc'])}, breast "
            f"{fmt_auc(row['breast_auc'])}, machine-balanced "
            f"{fmt_auc(row['machine_balanced_auc'])} ({row['seconds']} s)")

    def summary(self, holdouts: int, out: Path) -> dict[str, Any] | None:
        """:func:`run_panel` on the finished fits (None until both sites are done)."""

        def replay(tr: np.ndarray, te: np.ndarray, seed: int) -> np.ndarray:
            return self.done[(seed, *te.tolist())]

        try:
            result = run_panel(self.data, replay, holdouts, 0.15, 0, progress=None)
        except KeyError:
            return None
        result["recipe"] = {"name": self.name, **self.cfg.to_dict(),
                            "backend": keras.backend.backend()}
        (out / f"panel-{self.size}.json").write_text(json.dumps(result, indent=2) + "\n")
        return result


class Clock:
    """Projects a fit's seconds from the fits already timed (per training image-epoch at the
    same size, or scaled by area from another size, plus the fixed cost of the first)."""

    def __init__(self, budget: float, margin: float) -> None:
        self.budget, self.margin = budget, margin
        self.rates: dict[int, tuple[float, float]] = {}  # size -> (s per image-epoch, fixed s)

    def learn(self, size: int, last: dict[str, Any], images: int, epochs: int) -> None:
        steady = last["epoch_seconds"][1:] or last["epoch_seconds"]
        per = float(np.median(steady)) / max(images, 1)
        fixed = last["train_seconds"] - per * images * epochs + last["predict_seconds"]
        self.rates.setdefault(size, (per, max(fixed, 0.0)))

    def project(self, size: int, images: int, epochs: int) -> float | None:
        if size in self.rates:
            per, fixed = self.rates[size]
        elif self.rates:
            known, (per, fixed) = next(iter(self.rates.items()))
            per *= (size / known) ** 2
        else:
            return None
        return fixed + per * images * epochs

    def allows(self, what: str, size: int, images: int, epochs: int) -> bool:
        need = self.project(size, images, epochs)
        left = self.budget - (time.time() - STARTED)
        ok = left > 0 if need is None else need * self.margin < left
        say(f"{'start' if ok else 'SKIP'} {what}: projected "
            f"{'unknown' if need is None else f'{need:.0f} s'}, {left:.0f} s left")
        return ok


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("labels", type=Path)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--sizes", type=int, nargs="+", default=[512, 384])
    p.add_argument("--epochs", type=int, default=8)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=4.2e-4)
    p.add_argument("--bf16", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--predict-batch", type=int, default=128)
    p.add_argument("--holdouts", type=int, default=10)
    p.add_argument("--budget", type=float, default=500.0,
                   help="Seconds from start by which every fit must be projected to end.")
    p.add_argument("--margin", type=float, default=1.15,
                   help="Safety factor on projected fit times.")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 2)
    p.add_argument("--cache", type=Path, default=None, help="Keep the uint8 arrays here.")
    p.add_argument("--jax-cache", type=Path, default=None,
                   help="JAX persistent compilation cache (fits of one size share graphs).")
    p.add_argument("--holdout-size", type=int, default=None,
                   help="Hold-outs at this size (one of --sizes) [the size whose worst "
                        "leave-one-site-out AUC in this run is higher].")
    p.add_argument("--only", nargs="+", default=[], metavar="SIZE:SPLIT",
                   help="Run only these fits, e.g. 384:loso-site2 512:holdout3 (what a "
                        "run stopped at its limit left out).")
    p.add_argument("--smoke", type=int, default=0,
                   help="Quick check: about N of the images present, one fit per step.")
    args = p.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    say(f"backend {keras.backend.backend()}; {describe_device()}")
    if args.jax_cache and keras.backend.backend() == "jax":
        import jax

        jax.config.update("jax_compilation_cache_dir", str(args.jax_cache))
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
        # Also XLA's autotuning results and compiled kernels: every fit's training step is a
        # new compilation (the LR schedule's step counts are constants in it), but its
        # convolutions and fusions are the same at one size.
        jax.config.update("jax_persistent_cache_enable_xla_caches", "all")

    labels = args.labels
    if args.smoke:
        labels = present_only(labels, Path(tempfile.mkdtemp()) / "labels.csv")
    samples = [s for s in discover(labels) if s.split != "test"]
    if args.smoke:
        samples = limit_samples(samples, args.smoke, seed=0)
    say(f"{len(samples)} images; sizes {args.sizes}, {args.epochs} epochs, batch "
        f"{args.batch_size}, lr {args.lr}, bf16 {args.bf16}, budget {args.budget:.0f} s")
    recipes = {size: Recipe(args, samples, labels, size) for size in args.sizes}
    clock = Clock(args.budget, args.margin)

    def attempt(r: Recipe, split: str, tr: np.ndarray, te: np.ndarray, seed: int
                ) -> bool | None:
        """True: fitted; False: out of time; None: not among ``--only``."""
        if args.only and f"{r.size}:{split}" not in args.only:
            return None
        n = int(len(tr))
        if not clock.allows(f"{r.name} {split} ({n} train images)", r.size, n, args.epochs):
            return False
        r.run(split, tr, te, seed, args.out)
        clock.learn(r.size, r.last, r.last["n_train_kept"], args.epochs)
        return True

    # 1-2: leave-one-site-out at each size, in the panel's order and seed.
    worst_loso: dict[int, float] = {}
    for size, r in recipes.items():
        sites = r.data.sites
        done = []
        for site in sorted(set(sites.tolist()) - {""}):
            tr, te = np.where(sites != site)[0], np.where(sites == site)[0]
            if attempt(r, f"loso-site{site}", tr, te, 0):
                done.append(site)
        if done and len(done) == len(set(sites.tolist()) - {""}):
            result = r.summary(0, args.out)
            aucs = [v["image_auc"] for v in (result or {}).get("leave_one_site_out", {}).values()]
            if aucs and None not in aucs:
                worst_loso[size] = min(aucs)
                say(f"{r.name}: worst leave-one-site-out {worst_loso[size]:.3f}")
    # 3: hold-outs at the size whose worst leave-one-site-out AUC is higher.
    if args.holdout_size or worst_loso:
        best = recipes[args.holdout_size or max(worst_loso, key=lambda s: worst_loso[s])]
        splits = holdout_splits(best.data.samples, args.holdouts, 0.15, 0)
        finished = 0
        for k, (tr, te) in enumerate(splits):
            ran = attempt(best, f"holdout{k + 1}", tr, te, k + 1)
            if ran is False:
                break
            if ran is None:
                continue
            finished += 1
            result = best.summary(finished, args.out)
        say(f"{finished} of {args.holdouts} hold-outs at {best.size} px")
    for r in recipes.values():
        n = sum(1 for key in r.done if key[0] > 0)
        result = r.summary(n, args.out)
        if result is not None:
            print(format_panel(f"{r.name} ({n} hold-outs)", result), flush=True)
    say("done")


if __name__ == "__main__":
    main()
