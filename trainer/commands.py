"""``train`` and ``panel``: the click commands over :func:`trainer.train.train` and
:func:`trainer.panel.run_panel`.

Keras (and so TensorFlow) is imported inside the command, so that importing this module to
register the command in the worker's CLI costs nothing and needs no [train] extra.
Run standalone with ``python -m trainer.commands SOURCE --out DIR``.
"""

from __future__ import annotations

import shlex
from collections.abc import Callable, Sequence
from pathlib import Path

import click

from trainer.recipes import CNN, FINETUNE, PANEL_RECIPES, PROBE, RECIPES, SHIPPED, TOP, arch_help


class IntensityChoice(click.Choice):
    """``worker.imaging.preprocess.INTENSITY_MODES``, read when first needed (help of the command
    itself, or parsing): importing it loads OpenCV, which `screen --help` should not pay."""

    def __init__(self) -> None:
        super().__init__((), case_sensitive=True)

    @property  # type: ignore[override]
    def choices(self) -> Sequence[str]:
        from worker.imaging.preprocess import INTENSITY_MODES

        return INTENSITY_MODES

    @choices.setter
    def choices(self, _: Sequence[str]) -> None:
        pass


def preprocessing_options(command: Callable[..., None]) -> Callable[..., None]:
    """--crop, --orient and --intensity: the worker's preprocessing settings a run uses."""
    for option in (
        click.option("--intensity", type=IntensityChoice(), default="percentile",
                     show_default=True,
                     help="Preprocessing: how grey levels are normalised within the breast."),
        click.option("--orient", type=click.Choice(["none", "left"]), default="none",
                     show_default=True,
                     help="Preprocessing: 'left' mirrors images so the breast faces one way."),
        click.option("--crop", is_flag=True,
                     help="Preprocessing: crop to the breast before resizing."),
    ):  # applied last to first, so that help lists them first to last
        command = option(command)
    return command


def _lr(lr: float) -> str:
    """A learning rate as help text writes it: 1e-3, 3e-4."""
    return f"{lr:.0e}".replace("e-0", "e-")


def invocation(ctx: click.Context) -> str:
    """The command with every option spelled out (defaults too), for the run's record:
    rerunning it reproduces the run even if a default changes later."""
    words = [ctx.command_path]
    for param in ctx.command.params:
        value = ctx.params.get(param.name or "")
        if isinstance(param, click.Argument):
            words.append(shlex.quote(str(value)))
        elif isinstance(param, click.Option) and value is not None:
            if param.is_flag and param.secondary_opts:
                words.append(param.opts[0] if value else param.secondary_opts[0])
            elif param.is_flag:
                if value:
                    words.append(param.opts[0])
            else:
                words += [param.opts[0], shlex.quote(str(value))]
    return " ".join(words)


@click.command("train")
@click.argument("source", type=click.Path(path_type=Path))
@click.option("--out", "out_dir", type=click.Path(path_type=Path, file_okay=False),
              required=True, help="Run folder for best.keras, metrics.json and the plots.")
@click.option("--arch", type=click.Choice(list(RECIPES)), default=SHIPPED.name,
              show_default=True, help=arch_help())
@click.option("--size", default=None, type=click.IntRange(64, 1024),
              help="Square input size in pixels (stored in the model's preprocessing) "
                   f"[default: {TOP.size} for {TOP.name}, else {CNN.size}].")
@click.option("--epochs", default=None, type=click.IntRange(min=1),
              help=f"[default: {CNN.epochs} for cnn and lite0, {FINETUNE.epochs} for "
                   f"{FINETUNE.name}, {TOP.epochs} for {TOP.name}; {PROBE.name} has none]")
@click.option("--batch-size", default=None, type=click.IntRange(min=1),
              help=f"[default: {PROBE.batch_size} for {PROBE.name} and {FINETUNE.name}, "
                   f"else {CNN.batch_size}]")
@click.option("--trainable-blocks", default=None, type=click.IntRange(0, 15),
              help="lite0-top: MBConv blocks trained, counted from the last [default: 1].")
@click.option("--members", default=1, show_default=True, type=click.IntRange(1, 16),
              help="lite0-top: tops trained with different seeds on the same maps, scored "
                   "as the mean of theirs (an ensemble sharing the frozen front).")
@click.option("--machine-balanced-by", "machine_column", default=None, metavar="COLUMN",
              help="lite0-ft, lite0-top: weight training images so that every machine (this "
                   "CSV column) has the same malignant share; machines lacking a class are "
                   "left out.")
@click.option("--lr", default=None, type=click.FloatRange(min=0, min_open=True),
              help="Peak learning rate of the cosine schedule "
                   f"[default: {_lr(CNN.lr)} from scratch and {TOP.name}, {_lr(FINETUNE.lr)} "
                   "fine-tuning lite0].")
@click.option("--pooling", type=click.Choice(["avg", "max", "avg+max"]), default="avg",
              show_default=True, help="lite0-probe without --taps: which pooled features "
                                      "the head reads.")
@click.option("--taps", default="block15_project_bn", show_default=True,
              help="lite0-probe: comma-separated backbone layers whose average- and "
                   "max-pooled outputs the head reads ('' for the head's own features), "
                   "e.g. block10_add,block14_add,block15_project_bn.")
@click.option("--random-init", is_flag=True,
              help="lite0 without its ImageNet weights (for comparison).")
@preprocessing_options
@click.option("--val-fraction", default=0.2, show_default=True,
              type=click.FloatRange(0, 1, min_open=True, max_open=True),
              help="Share of patients (per class stratum) held out for validation.")
@click.option("--seed", default=0, show_default=True, type=int,
              help="Seeds the patient split, the weights and the augmentation.")
@click.option("--limit", type=click.IntRange(min=1), default=None,
              help="Use only about this many images (whole patients), for a quick trial.")
@click.option("--patience", type=click.IntRange(min=1), default=None,
              help="Stop after this many epochs without a better validation AUC.")
@click.option("--sensitivity", "sensitivity_target", default=0.9, show_default=True,
              type=click.FloatRange(0, 1, min_open=True),
              help="Validation sensitivity the decision threshold must reach.")
@click.option("--no-augment", is_flag=True, help="Train without random flips, rotations, etc.")
@click.option("--intensity-augment/--no-intensity-augment", default=True, show_default=True,
              help="lite0-ft: random gamma, contrast and noise while training.")
@click.option("--bf16", is_flag=True, help="lite0-ft: mixed_bfloat16 (faster on AVX-512 BF16).")
@click.option("--cache", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="lite0-ft, lite0-top: keep the preprocessed arrays (and maps) here.")
@click.option("--exam-column", default=None,
              help="CSV column naming each image's exam (study), for choosing how breasts "
                   "combine into an exam score [default: the patient is the exam].")
@click.option("--patient-regex", default=None,
              help=r"Folder layouts: regex whose first group in a file name is the patient id, "
                   r"e.g. '^(\d+)_'.")
@click.option("--progress/--no-progress", default=True, show_default=True,
              help="A progress bar per epoch, or one line per epoch (for log files).")
def train(source: Path, out_dir: Path, arch: str, size: int | None, epochs: int | None,
          batch_size: int | None, trainable_blocks: int | None, members: int,
          machine_column: str | None,
          lr: float | None, pooling: str, taps: str,
          random_init: bool, crop: bool, orient: str, intensity: str,
          val_fraction: float, seed: int, limit: int | None, patience: int | None,
          sensitivity_target: float, no_augment: bool, intensity_augment: bool, bf16: bool,
          cache: Path | None, exam_column: str | None, patient_regex: str | None,
          progress: bool) -> None:
    """Train a model on SOURCE (by default the shipped recipe) and write it, its validation
    figures, operating points and view-combination rule to --out.

    SOURCE is a folder with benign/ and malignant/ (optionally under train/ valid/ test/), a
    folder holding labels.csv, or a CSV with filename,label[,patient_id] columns. Images are
    split by patient; the threshold is the highest one that keeps validation sensitivity at
    the --sensitivity target, and the other operating points (sensitivity 0.80, 0.90, 0.95,
    a 10% recall rate) are recorded beside it.

    Examples:

        screen train ../shared/data/mammo-3383/labels.csv --out runs/ship --cache runs/cache

        screen train ../shared/data/mammo-3383/labels.csv --out runs/ft --arch lite0-ft \\
            --epochs 8 --cache runs/cache
    """
    from trainer.dataset import DatasetError, discover

    try:  # layout mistakes surface here in a second, before Keras is even imported
        discover(source, patient_regex)
    except DatasetError as exc:
        raise click.ClickException(str(exc)) from exc
    from trainer.train_config import TrainConfig

    try:
        cfg = TrainConfig(
            source=source, out_dir=out_dir, size=size, epochs=epochs, batch_size=batch_size, lr=lr,
            arch=arch, weights=None if random_init else "pretrained", crop=crop, orient=orient,
            intensity=intensity,
            pooling=pooling, taps=tuple(t.strip() for t in taps.split(",") if t.strip()),
            val_fraction=val_fraction, seed=seed, limit=limit, patience=patience,
            sensitivity_target=sensitivity_target, augment=not no_augment,
            intensity_augment=intensity_augment, mixed_bfloat16=bf16, cache_dir=cache,
            exam_column=exam_column, patient_regex=patient_regex, verbose=1 if progress else 2,
            trainable_blocks=trainable_blocks, members=members, machine_column=machine_column,
        )
    except ValueError as exc:  # an option the chosen recipe does not take
        raise click.UsageError(str(exc)) from exc
    # Record the per-arch defaults as the values they resolved to, so that the recorded
    # command reproduces the run even if a default changes later.
    ctx = click.get_current_context()
    ctx.params["epochs"], ctx.params["batch_size"], ctx.params["lr"] = cfg.resolved()
    ctx.params["size"], ctx.params["trainable_blocks"] = cfg.size, cfg.trainable_blocks
    cfg.command = invocation(ctx)
    # Deferred: this pulls in Keras and its backend.
    from trainer.train import train as run_training

    try:
        result = run_training(cfg)
    except DatasetError as exc:  # layout, label and split problems: the user's to fix
        raise click.ClickException(str(exc)) from exc
    click.echo(f"best model: {result.model_path}")
    click.echo(f"next: screen export {result.model_path} --out models/model.onnx "
               f"--metrics {result.out_dir / 'metrics.json'}")


@click.command("panel")
@click.argument("source", type=click.Path(exists=True, path_type=Path))
@click.option("--features", "feature_files", multiple=True,
              type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="Judge a linear probe on these cached frozen features (screen "
                   "features). Several files: their columns side by side.")
@click.option("--finetune", "finetune_arch", type=click.Choice(list(PANEL_RECIPES)),
              default=None,
              help="Judge network training instead: lite0 fine-tuned from ImageNet, the "
                   "small CNN from scratch (the control), or lite0-top: an attention head "
                   "(and --trainable-blocks) on cached maps of the frozen front.")
@click.option("--trainable-blocks", default=0, show_default=True, type=click.IntRange(0, 15),
              help="--finetune lite0-top: MBConv blocks trained, counted from the last.")
@click.option("--members", default=1, show_default=True, type=click.IntRange(1, 16),
              help="--finetune lite0-top: tops per fit (seeds), scores averaged.")
@click.option("--size", default=256, show_default=True, type=click.IntRange(64, 1024),
              help="--finetune: input size.")
@click.option("--epochs", default=None, type=click.IntRange(min=1),
              help=f"--finetune: epochs per fit [lite0, cnn: {FINETUNE.epochs}; "
                   f"{TOP.name}: {TOP.epochs}].")
@click.option("--lr", default=None, type=click.FloatRange(min=0, min_open=True),
              help=f"--finetune: peak LR [lite0, cnn: {_lr(FINETUNE.lr)}; "
                   f"{TOP.name}: {_lr(TOP.lr)}].")
@click.option("--intensity", type=IntensityChoice(), default="percentile", show_default=True,
              help="--finetune: preprocessing.")
@click.option("--intensity-augment/--no-intensity-augment", default=True, show_default=True,
              help="--finetune: random gamma, contrast and noise while training.")
@click.option("--bf16", is_flag=True, help="--finetune: mixed_bfloat16 (faster on AVX-512 BF16).")
@click.option("--machine-balanced", is_flag=True,
              help="--finetune: weight each fit's training images so that every machine "
                   "(--machine-column) has the same malignant share.")
@click.option("--cache", type=click.Path(file_okay=False, path_type=Path),
              default=Path("runs/cache"), show_default=True,
              help="--finetune: folder for the preprocessed uint8 arrays.")
@click.option("--site-column", default=None,
              help="CSV column naming each image's site, for leave-one-site-out.")
@click.option("--machine-column", default=None,
              help="CSV column naming each image's machine, for the machine-balanced AUC.")
@click.option("--holdouts", default=10, show_default=True, type=click.IntRange(min=2),
              help="Random patient hold-outs.")
@click.option("--fraction", default=0.15, show_default=True,
              type=click.FloatRange(0, 1, min_open=True, max_open=True),
              help="Share of patients each hold-out keeps apart.")
@click.option("--train-fraction", default=1.0, show_default=True,
              type=click.FloatRange(0, 1, min_open=True),
              help="Train every fit on this share of its training patients (a learning "
                   "curve: the scored rows stay whole).")
@click.option("--seed", default=0, show_default=True, type=int,
              help="Seeds the hold-outs, the weights and the augmentation.")
@click.option("--flip-train/--no-flip-train", default=True, show_default=True,
              help="Probe: add mirrored images' features as training rows.")
@click.option("--tta", is_flag=True, help="Score the mean of plain and mirrored images.")
@click.option("--name", default=None, help="Name of the recipe in the output.")
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Write the panel as JSON here (and, for --finetune, every fit's test "
                   "scores beside it as .fits.jsonl).")
def panel(source: Path, feature_files: tuple[Path, ...], finetune_arch: str | None,
          trainable_blocks: int, members: int, machine_balanced: bool, size: int,
          epochs: int | None, lr: float | None, intensity: str, intensity_augment: bool, bf16: bool,
          cache: Path, site_column: str | None, machine_column: str | None, holdouts: int,
          fraction: float, train_fraction: float, seed: int, flip_train: bool, tta: bool,
          name: str | None, out: Path | None) -> None:
    """Judge a recipe on new women and new sites: leave-one-site-out, machine-balanced AUC,
    repeated patient hold-outs, breast beside image level (see trainer/panel.py). SOURCE is
    the labelled pool, as for `screen train`.

    Examples:

        screen panel ../shared/data/mammo-3383/labels.csv --features runs/f.npz \\
            --site-column rsna_site_id --machine-column rsna_machine_id --out runs/panel.json

        screen panel ../shared/data/mammo-3383/labels.csv --finetune lite0 --epochs 4 \\
            --site-column rsna_site_id --machine-column rsna_machine_id --out runs/ft.json
    """
    import json

    from trainer.dataset import DatasetError
    from trainer.panel import format_panel, run_panel
    from trainer.panel_recipes import network_panel, probe_panel

    if bool(feature_files) == bool(finetune_arch):
        raise click.UsageError("give either --features (a probe) or --finetune (a network)")
    if members != 1 and (finetune_arch is None
                         or "members" not in PANEL_RECIPES[finetune_arch][0].options):
        raise click.UsageError(f"--members is for --finetune {TOP.name}")
    if finetune_arch and machine_balanced and not machine_column:
        raise click.UsageError("--machine-balanced needs --machine-column")
    try:
        if feature_files:
            data, fit_score, recipe = probe_panel(source, feature_files, site_column,
                                                  machine_column, flip_train, tta)
        else:
            data, fit_score, recipe = network_panel(
                source, finetune_arch or "", size=size, intensity=intensity, cache=cache,
                site_column=site_column, machine_column=machine_column,
                machine_balanced=machine_balanced, tta=tta,
                log=out.with_suffix(".fits.jsonl") if out else None, epochs=epochs, lr=lr,
                trainable_blocks=trainable_blocks, members=members,
                intensity_augment=intensity_augment, bf16=bf16)
    except DatasetError as exc:
        raise click.ClickException(str(exc)) from exc
    label = name or (finetune_arch or "+".join(f.stem for f in feature_files))
    result = run_panel(data, fit_score, holdouts, fraction, seed,
                       progress=lambda line: click.echo(f"[{label}] {line}"),
                       train_fraction=train_fraction)
    result["recipe"] = {"name": label, **recipe}
    click.echo(format_panel(label, result))
    if out:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    train(prog_name="python -m trainer.commands")
