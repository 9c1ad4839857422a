"""Alembic migrations of the screening database (see worker/records/schema.py for how they run)."""
