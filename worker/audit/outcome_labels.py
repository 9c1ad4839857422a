"""The one vocabulary of `screen outcomes import`: each label and the aliases it accepts
(case-insensitive). Anything else makes the import fail (or, with --skip-invalid, is skipped).

Its own module, free of the database, so that the CLI can put it in its help without
importing SQLAlchemy (`screen --help` stays quick).
"""

from __future__ import annotations

OUTCOME_LABELS: dict[str, tuple[str, ...]] = {
    "malignant": ("cancer", "positive", "1"),
    "benign": ("negative", "0"),
}


def describe_vocabulary() -> str:
    """'malignant (or cancer, positive, 1); benign (or negative, 0)', for help and errors."""
    return "; ".join(
        f"{label} (or {', '.join(aliases)})" for label, aliases in OUTCOME_LABELS.items()
    )
