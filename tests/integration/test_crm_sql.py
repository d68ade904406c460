"""SQL CRM behaviours that are not about merging: health probe, schema version."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from proca_sync.crm.sql import SCHEMA_VERSION, SqlBackend, meta_table
from proca_sync.errors import ConfigError, TransientError


def test_ping_reports_a_write_locked_sqlite_file(tmp_path: Path) -> None:
    path = tmp_path / "crm.db"
    with SqlBackend(f"sqlite:///{path}?timeout=0.2") as backend:
        backend._ping_sync()
        lock = sqlite3.connect(path, isolation_level=None)
        try:
            lock.execute("BEGIN EXCLUSIVE")
            with pytest.raises(TransientError):
                backend._ping_sync()
            lock.execute("ROLLBACK")
        finally:
            lock.close()
        backend._ping_sync()


def test_a_newer_schema_is_refused(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'crm.db'}"
    with SqlBackend(url) as backend, backend.engine.begin() as conn:
        conn.execute(
            meta_table.update()
            .where(meta_table.c.key == "schema_version")
            .values(value=str(SCHEMA_VERSION + 1))
        )
    backend = SqlBackend(url)
    try:
        with pytest.raises(ConfigError, match="newer"):
            backend.open_sync()
    finally:
        backend.close_sync()
