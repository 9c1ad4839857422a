"""Scoring: the ONNX model and the scorer that runs it.

The model file's checks (hash, inputs, outputs), the metadata it carries (preprocessing,
operating points, aggregation, model version) and the ONNX Runtime scorer (mirror pass,
batching, warm-up, site operating points resolved by name). It may import ``imaging`` and
``records``.
"""
