"""Expose the gated-attention head's weights as a second ONNX output, ``attention``.

The shipped recipe (trainer/top.py) pools its last feature map with a softmax over the map's
positions (``AttentionPool``): one weight per position, summing to 1 per image. That softmax
is already in every exported graph; this module adds a few nodes after it, so that the model
also returns ``attention``: float32 ``(N, H, W)`` (12 x 12 for the 384 px model), in the
input image's own orientation, summing to 1 per image.

With the mirror pass in the graph (``compose(..., tta=True)``: the batch is the images, then
the same images mirrored left-right, and the score is the mean of the two halves), the
softmax sees ``2N`` maps. The attention output is then, like the score, the mean of the two
passes: the plain pass's map and the mirror pass's map flipped back left-right, so that both
weigh the same place of the picture. An ensemble (``--members``: tops whose scores are
averaged) has one softmax per member; their maps are averaged likewise. It follows that a
mirrored picture gets the mirrored map (a test checks it).

The score's nodes are not touched, so the score is bit-identical (checked on every apply);
the model's metadata (and so its model version, which hashes the graph before metadata and
names the scoring weights) is kept. ONNX Runtime runs only the nodes an output needs, so a
caller that asks for ``score`` alone pays nothing for the new nodes.

``screen export`` applies it to every new export; for an existing file:

    python -m export.attention MODEL.onnx [--out OUT.onnx]     # default: in place, atomically

It is idempotent (a model that has the output already is left as it is) and needs only the
``onnx`` package and ONNX Runtime, not TensorFlow.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click
import numpy as np

from export.onnx_file import save_atomically
from worker.scoring.model_metadata import ATTENTION_NAME, INPUT_NAME, OUTPUT_NAME

_PREFIX = "attention_out/"


class AttentionExportError(ValueError):
    """The graph has no attention softmax this module recognises; the message is one line."""


def _consumers(graph: Any) -> dict[str, list[Any]]:
    out: dict[str, list[Any]] = {}
    for node in graph.node:
        for name in node.input:
            out.setdefault(name, []).append(node)
    return out


def find_attention_softmaxes(graph: Any) -> list[Any]:
    """The softmaxes of attention-pooling heads, one per ensemble member: each a Softmax fed
    by a Reshape (the logits map flattened to positions) whose output, directly or through one
    Reshape, weighs values in a Mul; an auxiliary classifier's softmax does not match. Empty
    for a recipe without the head (the linear probe, the small CNN)."""
    producers = {o: n for n in graph.node for o in n.output}
    consumers = _consumers(graph)
    found = []
    for node in graph.node:
        if node.op_type != "Softmax":
            continue
        source = producers.get(node.input[0])
        if source is None or source.op_type != "Reshape":
            continue
        after = list(consumers.get(node.output[0], []))
        after += [c for n in after if n.op_type == "Reshape"
                  for c in consumers.get(n.output[0], [])]
        if any(n.op_type == "Mul" for n in after):
            found.append(node)
    return found


def _map_shape(model: Any, softmax: Any) -> tuple[int, int]:
    """(H, W) of the attention map: the logits map the softmax's Reshape flattens, with its
    one-channel axis dropped (NCHW or NHWC alike: with one channel both flatten row-major)."""
    import onnx

    graph = model.graph
    reshape = next(n for n in graph.node if softmax.input[0] in n.output)
    logits = reshape.input[0]
    inferred = onnx.shape_inference.infer_shapes(model)
    for value in inferred.graph.value_info:
        if value.name == logits:
            dims = [d.dim_value for d in value.type.tensor_type.shape.dim][1:]
            break
    else:
        raise AttentionExportError(f"no inferred shape for the attention logits {logits!r}")
    if 1 in dims:
        dims.remove(1)
    if len(dims) != 2 or min(dims) < 1:
        raise AttentionExportError(f"attention logits of shape {dims} are not one map")
    return dims[0], dims[1]


def has_mirror_pass(graph: Any) -> bool:
    """Whether the graph scores each image with its mirror image in one batch: the input
    concatenated along the batch axis with a copy of itself (trainer.layers.WithMirrorImages)."""
    for node in graph.node:
        if node.op_type != "Concat" or len(node.input) != 2 or node.input[0] != INPUT_NAME:
            continue
        axis = next((a.i for a in node.attribute if a.name == "axis"), None)
        if axis == 0:
            return True
    return False


def has_attention_output(model: Any) -> bool:
    return any(o.name == ATTENTION_NAME for o in model.graph.output)


def add_attention_output(model: Any, required: bool = True) -> bool:
    """Add the ``attention`` output to an ``onnx.ModelProto`` in place (see the module's
    docstring). Returns False when it is there already, or when the graph has no attention
    head and not ``required`` (else AttentionExportError)."""
    from onnx import TensorProto, helper, numpy_helper

    if has_attention_output(model):
        return False
    graph = model.graph
    softmaxes = find_attention_softmaxes(graph)
    if not softmaxes:
        if required:
            raise AttentionExportError("no attention head (Reshape -> Softmax -> Mul) found")
        return False
    shapes = {_map_shape(model, softmax) for softmax in softmaxes}
    if len(shapes) != 1:
        raise AttentionExportError(f"the heads' maps differ in shape: {sorted(shapes)}")
    ((rows, cols),) = shapes
    p = _PREFIX

    def const(name: str, values: list[int] | float) -> str:
        dtype = np.float32 if isinstance(values, float) else np.int64
        graph.initializer.append(numpy_helper.from_array(np.array(values, dtype), p + name))
        return p + name

    maps = p + "maps"  # (B, H, W): B = 2N with the mirror pass, else N
    shape = const("shape", [-1, rows, cols])
    members = [p + f"member{k}" for k in range(len(softmaxes))]
    nodes = [helper.make_node("Reshape", [softmax.output[0], shape], [member],
                              name=member + "_reshape")
             for softmax, member in zip(softmaxes, members, strict=True)]
    if len(members) == 1:
        nodes.append(helper.make_node("Identity", members, [maps], name=p + "maps"))
    else:  # an ensemble: the mean of its members' maps, as its score is of theirs
        nodes += [helper.make_node("Sum", members, [p + "members_sum"], name=p + "members_sum"),
                  helper.make_node("Mul", [p + "members_sum", const("per_member",
                                                                     1.0 / len(members))],
                                   [maps], name=p + "members_mean")]
    if has_mirror_pass(graph):
        big = np.iinfo(np.int64)
        nodes += [
            helper.make_node("Shape", [maps], [p + "shape_of_maps"], name=p + "shape_of_maps"),
            helper.make_node("Slice", [p + "shape_of_maps", const("zero", [0]),
                                       const("one", [1])], [p + "b"], name=p + "b"),
            helper.make_node("Div", [p + "b", const("two", [2])], [p + "n"], name=p + "n"),
            helper.make_node("Slice", [maps, p + "zero", p + "n", const("axis0", [0])],
                             [p + "plain"], name=p + "plain"),
            helper.make_node("Slice", [maps, p + "n", const("end", [int(big.max)]),
                                       p + "axis0"], [p + "mirrored"], name=p + "mirrored"),
            # The mirror pass's maps flipped back left-right (W axis, step -1).
            helper.make_node("Slice", [p + "mirrored", const("last", [-1]),
                                       const("before_first", [int(big.min)]),
                                       const("axis2", [2]), const("back", [-1])],
                             [p + "unflipped"], name=p + "unflip"),
            helper.make_node("Add", [p + "plain", p + "unflipped"], [p + "sum"], name=p + "sum"),
            helper.make_node("Mul", [p + "sum", const("half", 0.5)], [ATTENTION_NAME],
                             name=p + "mean"),
        ]
    else:
        nodes.append(helper.make_node("Identity", [maps], [ATTENTION_NAME], name=p + "out"))
    graph.node.extend(nodes)
    graph.output.append(helper.make_tensor_value_info(
        ATTENTION_NAME, TensorProto.FLOAT, ["N", rows, cols]))
    return True


def remove_attention_output(model: Any) -> bool:
    """Undo :func:`add_attention_output` in place (the output, its nodes and constants):
    the graph as exported before it. False when there was no such output."""
    if not has_attention_output(model):
        return False
    graph = model.graph
    keep = [o for o in graph.output if o.name != ATTENTION_NAME]
    del graph.output[:]
    graph.output.extend(keep)
    nodes = [n for n in graph.node if not n.name.startswith(_PREFIX)]
    del graph.node[:]
    graph.node.extend(nodes)
    inits = [t for t in graph.initializer if not t.name.startswith(_PREFIX)]
    del graph.initializer[:]
    graph.initializer.extend(inits)
    return True


def _session(data: bytes) -> Any:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    return ort.InferenceSession(data, options, providers=["CPUExecutionProvider"])


def check_scores_unchanged(before: bytes, after: bytes, images: np.ndarray) -> np.ndarray:
    """Run both models on ``images`` (N, S, S, 1): the scores must be bit-identical, the
    attention maps finite, non-negative and summing to 1. Returns the attention maps."""
    old, new = _session(before), _session(after)
    (want,) = old.run([OUTPUT_NAME], {INPUT_NAME: images})
    got, attention = new.run([OUTPUT_NAME, ATTENTION_NAME], {INPUT_NAME: images})
    if want.tobytes() != got.tobytes():
        raise AttentionExportError(
            f"the score changed (max |diff| {float(np.max(np.abs(want - got))):.3g})")
    sums = attention.reshape(len(images), -1).sum(axis=1)
    if not (np.all(np.isfinite(attention)) and attention.min() >= 0
            and np.allclose(sums, 1.0, atol=1e-4)):
        raise AttentionExportError(f"attention maps do not sum to 1 (sums {sums})")
    return attention


def probe_images(size: int, n: int = 3, seed: int = 0) -> np.ndarray:
    """Inputs for the check: a blank one and smooth random ones, shaped like the model's."""
    rng = np.random.default_rng(seed)
    import cv2

    out = [np.zeros((size, size), np.float32)]
    for _ in range(n - 1):
        small = rng.random((8, 8)).astype(np.float32)
        out.append(cv2.resize(small, (size, size), interpolation=cv2.INTER_CUBIC).clip(0, 1))
    return np.stack(out)[:, :, :, None]


def add_attention_to_file(src: str | Path, out: str | Path | None = None) -> bool:
    """Add the output to an ONNX file (to ``out``, default in place; written atomically),
    after checking on probe images that its score is bit-identical. False: it had it."""
    src = Path(src)
    dest = Path(out) if out is not None else src
    import onnx

    try:
        model = onnx.load(str(src))
    except Exception as exc:  # onnx raises DecodeError, OSError...
        raise AttentionExportError(f"not an ONNX model ({str(exc).splitlines()[0]})") from exc
    changed = add_attention_checked(model)
    if not changed and dest == src:
        return False
    save_atomically(model, dest)
    return changed


def add_attention_checked(model: Any, required: bool = True) -> bool:
    """:func:`add_attention_output`, then the ONNX checker and :func:`check_scores_unchanged`
    on probe images (what ``screen export`` and :func:`add_attention_to_file` run)."""
    import onnx

    before = model.SerializeToString()
    changed = add_attention_output(model, required)
    if changed:
        onnx.checker.check_model(model)
        size = model.graph.input[0].type.tensor_type.shape.dim[1].dim_value
        check_scores_unchanged(before, model.SerializeToString(), probe_images(size))
    return changed


@click.command("add-attention")
@click.argument("model", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Where to write the model [default: replace MODEL, atomically].")
def main(model: Path, out: Path | None) -> None:
    """Add the attention output to an exported MODEL (see export/attention.py), checking
    that its score stays bit-identical. The metadata and model version are kept; the file's
    SHA-256 changes (update a pinned `[model] sha256`)."""
    from worker.scoring.model_file import file_sha256

    try:
        changed = add_attention_to_file(model, out)
    except AttentionExportError as exc:
        raise click.ClickException(f"{model}: {exc}") from exc
    dest = out or model
    note = ("added the attention output; score bit-identical on the probe images" if changed
            else "has the attention output already")
    click.echo(f"{dest}: {note}; sha256 {file_sha256(dest)}")


if __name__ == "__main__":
    main(prog_name="python -m export.attention")
