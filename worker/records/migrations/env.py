"""Alembic's entry point: run on the connection worker/records/schema.py hands over, inside its
transaction (and, on PostgreSQL, its schema lock)."""

from alembic import context

from worker.records.models import Base

connection = context.config.attributes["connection"]
# render_as_batch: SQLite alters a table by copying it, which batch mode does.
context.configure(connection=connection, target_metadata=Base.metadata, render_as_batch=True)
with context.begin_transaction():
    context.run_migrations()
