"""A PostgreSQL transaction that holds a change number of the CRM's change log uncommitted."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import psycopg

from proca_sync.crm.sql.changelog import CHANGES_LOCK


@contextmanager
def held_change(pg_url: str) -> Iterator[tuple[psycopg.Connection[tuple[int]], int]]:
    """In the schema of ``pg_url`` (a test URL with its ``search_path``), take the change
    log's lock and draw a change number without committing: the connection and the
    number. ``commit()`` on the connection releases both; closed on exit."""
    schema = pg_url.split("csearch_path%3D", 1)[1]
    slow: psycopg.Connection[tuple[int]] = psycopg.connect(
        "host=127.0.0.1 port=5432 dbname=test user=postgres",
        options=f"-csearch_path={schema}",
    )
    try:
        slow.execute("SELECT pg_advisory_xact_lock(%s)", (CHANGES_LOCK,))
        held = slow.execute(
            "INSERT INTO changes (kind, entity, at) VALUES ('contact', '999', 0) RETURNING seq"
        ).fetchone()
        assert held is not None
        yield slow, held[0]
    finally:
        slow.close()
