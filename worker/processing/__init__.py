"""Processing: one batch's way through the worker, exactly once even across crashes.

Receipt and claims (a file's row is in the database before anything else happens to it),
decoding and scoring through :mod:`worker.imaging` and :mod:`worker.scoring`, the decision
(scored, duplicate or quarantined, with its reason), placement of the file on disk, and
reconciliation of whatever a crash left half done. It may import ``results``, ``scoring``,
``imaging`` and ``records``; only ``intake`` and the app import it.
"""
