"""Scoring: the ONNX model and the scorer that runs it.

The model file's checks (hash, inputs, outputs), the metadata it carries (preprocessing,
operating points, aggregation, model version), the levels a score is given for (image,
breast, exam), the site operating points recorded by ``screen calibrate`` as the scorer reads
them from the database, and the ONNX Runtime scorer (mirror pass, batching, warm-up, site
operating points resolved by name). It may import ``imaging`` and ``records``.
"""
