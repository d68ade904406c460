"""Alembic migrations of the pipeline state (run by :func:`proca_sync.pipeline.state.migrate`)."""
