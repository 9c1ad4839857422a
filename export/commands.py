"""``export``: the click command over :func:`export.onnx_export.export_to_onnx`.

TensorFlow, tf2onnx and onnx are imported inside the command, so that importing this module
to register the command in the worker's CLI costs nothing and needs no [train] extra.
Run standalone with ``python -m export.commands KERAS_MODEL --out MODEL.onnx``.
"""

from __future__ import annotations

from pathlib import Path

import click


@click.command("export")
@click.argument("keras_model", type=click.Path(path_type=Path))
@click.option("--out", "out_path", type=click.Path(path_type=Path, dir_okay=False),
              required=True, help="ONNX file to write (replaced atomically).")
@click.option("--metrics", "metrics_path", type=click.Path(path_type=Path, dir_okay=False),
              default=None,
              help="The training run's metrics.json [default: next to KERAS_MODEL]: threshold, "
                   "preprocessing, validation figures and training record for the metadata.")
@click.option("--parity-images", default=8, show_default=True, type=click.IntRange(min=0),
              help="How many validation images Keras and ONNX Runtime must score alike.")
@click.option("--images", "images_source", type=click.Path(path_type=Path), default=None,
              help="Where the run's validation images are (the training SOURCE) "
                   "[default: the source recorded in metrics.json].")
@click.option("--tolerance", default=1e-4, show_default=True, type=click.FloatRange(min=0),
              help="Largest allowed |keras - onnx| score difference.")
@click.option("--opset", default=17, show_default=True, type=click.IntRange(13, 21),
              help="ONNX opset the model is written in.")
@click.option("--int8", is_flag=True,
              help="Also write an int8 model (ONNX Runtime static QDQ quantisation, see "
                   "export/quantise.py): from a .keras model, beside --out as NAME-int8.onnx; "
                   "from an exported .onnx model, to --out.")
@click.option("--calibration-images", default=64, show_default=True,
              type=click.IntRange(min=1), help="int8: images to calibrate on (seeded draw).")
@click.option("--evaluation-images", default=400, show_default=True,
              type=click.IntRange(min=2),
              help="int8: images on which float and int8 AUC are compared.")
@click.option("--max-auc-drop", default=0.005, show_default=True,
              type=click.FloatRange(min=0), help="int8: largest allowed AUC drop.")
@click.option("--max-rate-change", default=0.02, show_default=True,
              type=click.FloatRange(min=0),
              help="int8: largest allowed change of sensitivity, specificity or recall rate at "
                   "an operating point's threshold (AUC alone ignores a shift of every score).")
@click.option("--bias-correction/--no-bias-correction", default=True, show_default=True,
              help="int8: correct each convolution's bias on the calibration images, so that "
                   "quantisation does not shift every score (export/bias_correction.py).")
@click.option("--seed", default=0, show_default=True, help="int8: seed of the image draws.")
def export(keras_model: Path, out_path: Path, metrics_path: Path | None, parity_images: int,
           images_source: Path | None, tolerance: float, opset: int, int8: bool,
           calibration_images: int, evaluation_images: int, max_auc_drop: float,
           max_rate_change: float, bias_correction: bool, seed: int) -> None:
    """Convert a trained KERAS_MODEL (best.keras) to an ONNX model the worker can serve.

    The ONNX file carries the preprocessing settings, the decision threshold and its rule,
    the class names, a content-hash model version, the validation figures and the training
    record. The export fails unless Keras and ONNX Runtime agree within --tolerance on real
    validation images, and unless the worker's loader accepts the file.

    Example:

        screen export runs/ship/best.keras --out models/mine.onnx --metrics runs/ship/metrics.json
    """
    if not keras_model.is_file():
        raise click.ClickException(f"Keras model not found: {keras_model}")
    int8_options = dict(n_calibration=calibration_images, n_evaluation=evaluation_images,
                        seed=seed, max_auc_drop=max_auc_drop, max_rate_change=max_rate_change,
                        bias_correction=bias_correction)
    if keras_model.suffix == ".onnx":
        if not int8:
            raise click.ClickException(f"{keras_model} is already ONNX (did you mean --int8?)")
        _int8(keras_model, out_path, images_source, metrics_path, int8_options)
        return
    metrics_path = metrics_path or keras_model.parent / "metrics.json"
    if not metrics_path.is_file():
        raise click.ClickException(
            f"{metrics_path} not found: pass the training run's metrics.json with --metrics"
        )
    # Deferred: this pulls in TensorFlow and tf2onnx.
    from export.onnx_export import (
        ExportError,
        export_to_onnx,
        metadata_from_run,
        read_run_metrics,
        validation_image_paths,
    )
    from trainer.dataset import source_folder

    try:
        run = read_run_metrics(metrics_path)
        source = images_source or Path(run.get("training", {}).get("source", ""))
        paths = validation_image_paths(metrics_path.parent, source_folder(source),
                                       parity_images)
        report = export_to_onnx(keras_model, out_path, parity_images=paths, tolerance=tolerance,
                                opset=opset, **metadata_from_run(run))
    except ExportError as exc:
        raise click.ClickException(str(exc)) from exc
    click.echo(report.describe())
    if int8:
        _int8(out_path, out_path.with_name(f"{out_path.stem}-int8{out_path.suffix}"),
              images_source, metrics_path, int8_options)


def _int8(float_model: Path, out_path: Path, images_source: Path | None,
          metrics_path: Path | None, options: dict) -> None:
    from export.quantise import QuantiseError, quantise_from_run

    def progress(done: int, total: int) -> None:
        if done % 10 == 0 or done == total:  # about a second a convolution at 384 px
            click.echo(f"bias correction: {done}/{total} convolutions", err=True)

    try:
        report = quantise_from_run(float_model, out_path, images_source, metrics_path,
                                   progress=progress, **options)
    except QuantiseError as exc:
        raise click.ClickException(str(exc)) from exc
    click.echo(report.describe())


if __name__ == "__main__":
    export(prog_name="python -m export.commands")
