"""Alembic migrations of the screening database (see worker/schema.py for how they run)."""
