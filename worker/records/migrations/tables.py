"""What the revisions that add a table share.

A database made before Alembic is brought to the baseline by the pre-Alembic step
(`bring_up_to_date` in worker/records/schema.py, then `Store._upgrade`), which first creates
every missing table from the models, those of later revisions included; it is then stamped at
the baseline and upgraded. A revision that adds a table therefore finds it there already on
such a database, and makes it (and its indexes) only where it is missing.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op


def create_table_if_missing(name: str, *columns: sa.Column, indexes: dict[str, list[str]]
                            | None = None) -> None:
    """`op.create_table(name, *columns)`, then each index (name: its columns), unless the
    table exists."""
    if sa.inspect(op.get_bind()).has_table(name):
        return
    op.create_table(name, *columns)
    for index, index_columns in (indexes or {}).items():
        op.create_index(index, name, index_columns)
