"""`python -m worker.cli` runs the `screen` CLI, as `python -m worker` does."""

from worker.cli import main

main()
