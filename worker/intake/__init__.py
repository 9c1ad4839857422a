"""Intake: where files arrive.

The inbox watcher (watchdog events plus a periodic scan), settling (a file is taken once its
size and time stop changing), the inbox lock that keeps two workers off one folder, the
DICOM receiver (``screen receive``), which writes what a PACS sends into the inbox durably,
the folders' set-up, and the signals that ask a running worker or receiver to stop.
It hands batches to :mod:`worker.processing` and may import that and every wing below it;
nothing imports intake but the app and the CLI.
"""
