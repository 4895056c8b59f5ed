"""Alembic migrations of the service database (see app.db.upgrade; no alembic.ini)."""
