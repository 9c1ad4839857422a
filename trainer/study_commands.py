"""``features`` and ``baselines``: the click commands over :func:`trainer.features.extract_features`
(what `screen panel --features` reads) and :func:`trainer.baselines.compute_baselines` (what a
model must beat).

Like :mod:`trainer.commands`, everything heavy is imported inside the commands, so that `screen
--help` lists them without Keras or NumPy.
"""

from __future__ import annotations

from pathlib import Path

import click

from trainer.commands import preprocessing_options


@click.command("features")
@click.argument("source", type=click.Path(exists=True, path_type=Path))
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), required=True,
              help="The .npz file to write (rows: the pool's images, test split left out).")
@click.option("--size", default=384, show_default=True, type=int,
              help="Preprocessing: square input size in pixels.")
@preprocessing_options
@click.option("--no-mask", is_flag=True, help="Preprocessing: keep what lies outside the breast.")
@click.option("--flip", is_flag=True,
              help="Also the features of mirrored images (for --flip-train and --tta).")
@click.option("--batch-size", default=16, show_default=True, type=click.IntRange(min=1),
              help="Images per forward pass.")
@click.option("--taps", default=None,
              help="Comma-separated backbone layers to pool instead of the head (e.g. "
                   "block10_add,block14_add); use the features with avg+max.")
def features(source: Path, out: Path, size: int, crop: bool, orient: str, intensity: str,
             no_mask: bool, flip: bool, batch_size: int, taps: str | None) -> None:
    """Compute and cache frozen EfficientNet-Lite0 features of a labelled pool (SOURCE: a
    labels.csv or a labelled folder, as for `screen train`), for `screen panel --features`.

    Example:

    \b
        screen features ../shared/data/mammo-3383/labels.csv --size 384 --flip \\
            --out runs/features/s384.npz
    """
    from trainer.features import extract_features
    from worker.imaging.preprocess import PreprocessSettings

    settings = PreprocessSettings(size=size, crop=crop, orient=orient, intensity=intensity,
                                  mask_background=not no_mask)
    count = extract_features(source, settings, out, flip=flip, batch_size=batch_size,
                             taps=taps.split(",") if taps else None)
    click.echo(f"wrote {out} ({count} images)")


@click.command("baselines")
@click.argument("labels_csv", type=click.Path(path_type=Path))
@click.option("--val-fraction", default=0.2, show_default=True, type=float,
              help="Share of patients held out for validation, as for `screen train`.")
@click.option("--seed", default=0, show_default=True, type=int,
              help="Seeds the patient split, as for `screen train`.")
@click.option("--machine-column", default=None,
              help="CSV column naming each image's machine (metadata_logreg, machine_rate).")
@click.option("--site-column", default=None,
              help="CSV column naming each image's site (metadata_logreg).")
@click.option("--score-column", "score_columns", multiple=True,
              help="A column whose value is itself a baseline score (repeatable).")
def baselines(labels_csv: Path, val_fraction: float, seed: int, machine_column: str | None,
              site_column: str | None, score_columns: tuple[str, ...]) -> None:
    """Validation figures of trivial and metadata-only scorers on the trainer's patient split
    of LABELS_CSV (see trainer/baselines.py), as JSON: what a model must beat.

    Example:

    \b
        screen baselines ../shared/data/mammo-3383/labels.csv \\
            --machine-column rsna_machine_id --site-column rsna_site_id --score-column age
    """
    import json

    from trainer.baselines import compute_baselines

    click.echo(json.dumps(compute_baselines(labels_csv, val_fraction, seed,
                                            machine_column=machine_column,
                                            site_column=site_column,
                                            score_columns=score_columns),
                          indent=2, sort_keys=True))
