"""What heatmaps cost the worker: `python bench/bench_heatmaps.py [--files N] [--rounds R]`.

`screen process` over the same N dev-pool files (bench_worker's measurement: first file
received to last moved), alternately with the model without and with its attention output
(export/attention.py; both made from --model in a temp folder, the same graph otherwise), R
rounds. Prints each run's files/s and CPU seconds per file (user + system of the worker
process, start-up included: less sensitive than files/s to other jobs on a shared machine),
the with/without ratio of each round and their median, and the spread of each model's own
runs, which is how noisy the machine was. Asserts nothing.
"""

from __future__ import annotations

import argparse
import random
import resource
import statistics
import tempfile
from pathlib import Path

# The same pool, files, worker settings and measurement as bench_worker.py's `screen process`.
from bench_worker import DATA, MODEL, SCHEMA, screen_process


def variants(model: Path, folder: Path) -> dict[str, Path]:
    """The model without and with the attention output."""
    import onnx

    from export.attention import add_attention_checked, remove_attention_output

    proto = onnx.load(str(model))
    remove_attention_output(proto)
    out = {"without": folder / "without.onnx", "with": folder / "with.onnx"}
    onnx.save(proto, str(out["without"]))
    add_attention_checked(proto)
    onnx.save(proto, str(out["with"]))
    return out


def _children_cpu() -> float:
    """CPU seconds of this process's finished children (the worker, through its wrapper)."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--files", type=int, default=300)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--model", type=Path, default=MODEL)
    args = parser.parse_args()
    images = sorted((DATA / "images").rglob("*.jpg"))
    random.Random(0).shuffle(images)
    images = images[: args.files]
    bs = SCHEMA["worker"]["batch_size"][1]
    per_call = SCHEMA["model"]["images_per_call"][1]
    streams = SCHEMA["model"]["streams"][1]
    runs: dict[str, list[float]] = {"without": [], "with": []}
    cpu: dict[str, list[float]] = {"without": [], "with": []}
    with tempfile.TemporaryDirectory() as tmp:
        models = variants(args.model, Path(tmp))
        for r in range(args.rounds):
            # Alternate which goes first, so that a drift of the machine's load is shared.
            order = ("without", "with") if r % 2 == 0 else ("with", "without")
            for name in order:
                before = _children_cpu()
                result = screen_process(images, args.files, models[name], bs, per_call,
                                        streams)
                runs[name].append(result["files_per_s"])
                cpu[name].append((_children_cpu() - before) / result["files"])
                print(f"round {r + 1}, {name:7s} attention: {runs[name][-1]:.2f} files/s, "
                      f"{1000 * cpu[name][-1]:.0f} ms CPU/file", flush=True)
    for what, values, better in (("files/s", runs, "higher"), ("CPU/file", cpu, "lower")):
        ratios = [w / wo for w, wo in zip(values["with"], values["without"], strict=True)]
        print(f"\n{what}, with / without ({better} is better), per round: "
              f"{', '.join(f'{x:.3f}' for x in ratios)}; median {statistics.median(ratios):.3f}")
        for name, v in values.items():
            spread = (max(v) - min(v)) / statistics.mean(v)
            print(f"  {name:7s}: mean {statistics.mean(v):.4g}, runs spread "
                  f"{100 * spread:.1f}% of the mean")


if __name__ == "__main__":
    main()
