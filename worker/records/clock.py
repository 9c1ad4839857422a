"""Time as the records keep it: naive UTC in the database, ISO 8601 with a `Z` when shown."""

from __future__ import annotations

import datetime as dt
from typing import overload


def utcnow() -> dt.datetime:
    """Naive UTC: SQLite has no time zones, so every stored time is UTC by convention."""
    return dt.datetime.now(dt.UTC).replace(tzinfo=None)


@overload
def iso(value: dt.datetime) -> str: ...
@overload
def iso(value: None) -> None: ...
@overload
def iso(value: dt.datetime | None) -> str | None: ...
def iso(value: dt.datetime | None) -> str | None:
    """A stored (naive UTC) time as listings and documents show it: ISO 8601 ending in `Z`."""
    return None if value is None else value.isoformat() + "Z"
