"""Records: the state you can trust.

The database models and the store (SQLite or PostgreSQL through SQLAlchemy), the schema's
version and its Alembic migrations, heartbeats of running workers, stored heatmaps, the queue
of results for a PACS, how file paths are kept in the database, and the database URL's
checks. Every file's fate is written here before anything moves. Records imports no other wing.
"""
