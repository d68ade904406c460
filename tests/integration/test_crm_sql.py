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


@pytest.mark.postgres
def test_postgres_tables_are_analysed_as_the_crm_grows(pg_url: str) -> None:
    """Without statistics PostgreSQL plans a batch's key lookups as whole-table scans;
    the backend analyses its tables after its first ANALYSE_FIRST records (autovacuum is
    off on the test cluster, so nothing else does)."""
    from sqlalchemy import text

    from proca_sync.crm.sql import ANALYSE_FIRST
    from proca_sync.engine import Engine
    from tests.support.builders import action, dumps

    bodies = [
        dumps(action(100_000 + n, ref=f"r{n:06d}".ljust(43, "x"), email=f"p{n}@example.org",
                     created="2024-01-01T10:00:00Z"))
        for n in range(ANALYSE_FIRST + 50)
    ]  # fmt: skip
    engine = Engine(backend=SqlBackend(pg_url))
    records = [engine.prepare(body) for body in bodies]

    def analysed(backend: SqlBackend) -> float:
        with backend.engine.connect() as conn:
            return float(conn.execute(text(
                "SELECT reltuples FROM pg_class WHERE oid = 'applied_messages'::regclass"
            )).scalar_one())  # fmt: skip

    with SqlBackend(pg_url) as backend:
        backend.apply_sync(records[:100])  # type: ignore[arg-type]
        assert analysed(backend) < 0  # never analysed: -1
        for start in range(100, len(records), 100):
            backend.apply_sync(records[start : start + 100])  # type: ignore[arg-type]
        assert analysed(backend) >= ANALYSE_FIRST
