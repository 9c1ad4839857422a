"""Processing: one batch's way through the worker, exactly once even across crashes.

Read it in the order a batch travels: :mod:`~worker.processing.reading` (bytes, hash and
stat fingerprint, in the decode threads), :mod:`~worker.processing.receipt` (a file's row is
in the database before anything else happens to it) with :mod:`~worker.processing.claims`
(several workers on one inbox), :mod:`~worker.processing.scores` (decoding and scoring through
:mod:`worker.imaging` and :mod:`worker.scoring`, in the scoring thread),
:mod:`~worker.processing.decision` (the typed decision: scored, duplicate or quarantined, with
its reason and planned destination, committed per batch), :mod:`~worker.processing.placement`
(the file moved, the move recorded, and reconciliation of whatever a crash left half done);
:mod:`~worker.processing.pipeline` composes them. It may import ``results``, ``scoring``,
``imaging`` and ``records``; only ``intake`` and the app import it.
"""
