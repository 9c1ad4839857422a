"""Results: what the worker says about breasts and exams, and where it says it.

Aggregation (image scores into breasts and exams), the exam state machine (waiting, scored,
rescored), the outbox's result documents, the listings of ``screen results``, and the results
for a PACS (a structured report and Secondary Captures, queued in the database and sent by
C-STORE). It may import ``scoring``, ``imaging`` and ``records``.
"""
