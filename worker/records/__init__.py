"""Records: the state you can trust.

The database models (every table, ``models``) and the store (SQLite or PostgreSQL through
SQLAlchemy), the schema's version and its Alembic migrations, heartbeats of running workers,
stored heatmaps, the queue of results for a PACS, the site at a glance (``overview``), how
file paths are kept in the database, and the database URL's checks; beside them the clock
(stored time and its ISO form) and durable files (``durable``: written whole under a
temporary name, never replacing another). Every file's fate is written here before anything
moves. Records imports no other wing.
"""
