"""`python -m worker` runs the `screen` CLI (handy where GNU screen owns that name)."""

from worker.cli import main

main()
