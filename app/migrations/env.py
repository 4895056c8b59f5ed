"""Alembic environment: always online, on the connection app.db.upgrade hands over (it holds
the migration lock and the transaction)."""

from alembic import context

context.configure(connection=context.config.attributes["connection"], target_metadata=None)
with context.begin_transaction():
    context.run_migrations()
