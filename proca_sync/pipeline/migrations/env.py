"""Alembic environment: runs on the connection :func:`~proca_sync.pipeline.state.migrate`
passes in (no alembic.ini, no URL in any file)."""

from __future__ import annotations

from alembic import context

from proca_sync.pipeline.state import metadata

connection = context.config.attributes["connection"]
context.configure(connection=connection, target_metadata=metadata)
with context.begin_transaction():
    context.run_migrations()
