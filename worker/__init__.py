"""The screening worker: files in, scores recorded, results out. It never imports TensorFlow,
``trainer`` or ``export``.

Read it in the order a file travels:

- :mod:`worker.intake`: where files arrive (the inbox watcher, the DICOM receiver, the lock).
- :mod:`worker.processing`: a batch's way through the worker: receipt and claims, decisions,
  placement on disk, reconciliation after a crash.
- :mod:`worker.imaging`: decoding (plain images, DICOM), identity and the one preprocessing path.
- :mod:`worker.scoring`: the ONNX model file, its metadata and the scorer.
- :mod:`worker.results`: breast and exam results, the outbox, results for a PACS.
- :mod:`worker.audit`: the audit against biopsy outcomes, site operating points, fitness.
- :mod:`worker.records`: the database (models, store, schema, migrations) and durable writes.

Imports run downward only. ``records`` and ``imaging`` import no other wing; ``scoring``
imports those two; ``results`` imports ``scoring`` and what it may; ``audit`` and
``processing`` each import ``results`` and everything below it (not each other); ``intake``
imports ``processing`` and everything below it. ``tests/test_structure.py`` holds the code to it.

On top sit the command line (:mod:`worker.cli`, a package of one module per job) and the
Python API it is a thin layer over (:mod:`worker.app`); no wing imports them. Beside every
wing, usable by all and importing none: :mod:`worker.config`, :mod:`worker.logs`,
:mod:`worker.faults`, :mod:`worker.threads`.
"""
