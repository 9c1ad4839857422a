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

Imports run one way, from the top of this list's dependants down: ``intake`` may use
``processing`` and everything below it; ``processing`` uses ``results``, ``scoring``,
``imaging`` and ``records``; ``audit`` uses ``results``, ``scoring``, ``imaging`` and
``records``; ``results`` uses ``scoring``, ``imaging`` and ``records``; ``scoring`` uses
``imaging`` and ``records``; ``imaging`` and ``records`` use no other wing.
``tests/test_structure.py`` holds the code to it.

On top sit the command line (:mod:`worker.cli`, a package of one module per job) and the
Python API it is a thin layer over (:mod:`worker.app`); no wing imports them. Beside every
wing, usable by all and importing none: :mod:`worker.config`, :mod:`worker.logs`,
:mod:`worker.faults`, :mod:`worker.threads`.
"""
