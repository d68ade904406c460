"""The parking store's indexes: made with a new store, added to one made before them."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from proca_sync.consumer.parking import ParkingStore

INDEXES = {"ix_parked_reason_at", "ix_parked_at"}


def indexes(path: Path) -> set[str]:
    with sqlite3.connect(path) as con:
        rows = con.execute("SELECT name FROM sqlite_master WHERE type = 'index'").fetchall()
    return {str(name) for (name,) in rows}


def test_a_new_store_has_the_list_indexes(tmp_path: Path) -> None:
    store = ParkingStore(f"sqlite:///{tmp_path / 'parked.db'}")
    store.open_sync()
    store.engine.dispose()
    assert indexes(tmp_path / "parked.db") >= INDEXES


def test_an_older_store_gets_them_when_opened(tmp_path: Path) -> None:
    path = tmp_path / "parked.db"
    with sqlite3.connect(path) as con:  # the table as stores made before the indexes have it
        con.execute(
            "CREATE TABLE parked_messages (id INTEGER PRIMARY KEY, queue VARCHAR(255) NOT NULL,"
            " digest VARCHAR(64) NOT NULL, exchange VARCHAR(255) NOT NULL, routing_key"
            " VARCHAR(255) NOT NULL, headers JSON NOT NULL, body BLOB NOT NULL, reason"
            " VARCHAR(64) NOT NULL, detail TEXT NOT NULL, attempts INTEGER NOT NULL, parked_at"
            " VARCHAR(40) NOT NULL, times_parked INTEGER NOT NULL,"
            " CONSTRAINT uq_parked_body UNIQUE (queue, digest))"
        )
    assert not indexes(path) & INDEXES
    for _ in range(2):  # and a second open finds them present
        store = ParkingStore(f"sqlite:///{path}")
        store.open_sync()
        store.engine.dispose()
    assert indexes(path) >= INDEXES
    with sqlite3.connect(path) as con:
        plan = con.execute(
            "EXPLAIN QUERY PLAN SELECT id FROM parked_messages WHERE reason = 'x'"
            " ORDER BY parked_at DESC, id DESC LIMIT 50"
        ).fetchall()
    assert "ix_parked_reason_at" in str(plan) and "TEMP B-TREE" not in str(plan)


@pytest.mark.postgres
def test_postgres_store_gets_them_once(pg_url: str) -> None:
    import psycopg

    store = ParkingStore(pg_url)
    store.open_sync()
    with store.engine.begin() as conn:  # a store made before the indexes
        for name in INDEXES:
            conn.exec_driver_sql(f"DROP INDEX {name}")
    store.engine.dispose()
    for _ in range(2):
        store = ParkingStore(pg_url)
        store.open_sync()
        store.engine.dispose()
    schema = pg_url.rsplit("%3D", 1)[1]
    with psycopg.connect(pg_url.split("?", 1)[0]) as conn:
        rows = conn.execute(
            "SELECT indexname FROM pg_indexes WHERE schemaname = %s", (schema,)
        ).fetchall()
    assert {str(name) for (name,) in rows} >= INDEXES
