"""Several writers into one SQL CRM at once reach the state one writer reaches.

Each writer is a :class:`SqlBackend` of its own (its own engine, connection and writer
thread), as in separate ``proca-sync run`` processes; they apply interleaved slices of
one stream, every message twice over (two writers get it), in small batches so that
their transactions overlap on the same contacts. The result must equal one writer's
replay of the stream: nothing lost, nothing applied twice (the export and the
idempotency table are compared), and no clash surfaced as an error.
"""

from __future__ import annotations

import asyncio
import random
from pathlib import Path
from typing import Any

import pytest

from proca_sync.crm.sql import SqlBackend
from proca_sync.crypto import Keystore
from proca_sync.engine import Engine
from proca_sync.sync.records import SyncRecord
from reliability.traffic import build_stream
from tests.support import scenario

WRITERS = 4
BATCH = 8


def _stream(tmp_path: Path) -> tuple[list[bytes], Keystore]:
    stream = build_stream(4242, tmp_path, actions=500, seed=12)
    # The modelling scenario adds merges of contacts known by several refs and e-mails.
    keystore = Keystore([*stream.keystore, *scenario.keystore()])
    return stream.bodies + scenario.bodies(), keystore


def _records(bodies: list[bytes], keystore: Keystore) -> list[SyncRecord]:
    from proca_sync.crm.base import NullBackend

    engine = Engine(backend=NullBackend(), keystore=keystore)
    records = []
    for body in bodies:
        prepared = engine.prepare(body)
        if isinstance(prepared, SyncRecord):
            records.append(prepared)
    return records


async def _write(url: str, batches: list[list[SyncRecord]]) -> tuple[int, int]:
    backend = SqlBackend(url)
    await backend.open()
    applied = 0
    try:
        for batch in batches:
            results = await backend.apply(batch)
            assert all(r in ("applied", "duplicate") for r in results), results
            applied += sum(1 for r in results if r == "applied")
    finally:
        await backend.close()
    return applied, backend.conflicts


def _concurrently(url: str, records: list[SyncRecord], seed: int) -> tuple[int, int]:
    rng = random.Random(seed)
    # Every record goes to two writers (a redelivery racing the first delivery), in a
    # shuffled order each, cut into small batches of distinct keys.
    shares: list[list[SyncRecord]] = [[] for _ in range(WRITERS)]
    for record in records:
        for writer in rng.sample(range(WRITERS), 2):
            shares[writer].append(record)
    plans = []
    for share in shares:
        rng.shuffle(share)
        batches: list[list[SyncRecord]] = []
        for record in share:
            if not batches or len(batches[-1]) >= BATCH or any(
                r.key == record.key or r.lane == record.lane for r in batches[-1]
            ):
                batches.append([])
            batches[-1].append(record)
        plans.append(batches)

    async def all_writers() -> list[tuple[int, int]]:
        return list(await asyncio.gather(*(_write(url, plan) for plan in plans)))

    totals = asyncio.run(all_writers())
    return sum(a for a, _ in totals), sum(c for _, c in totals)


def _export(url: str) -> tuple[dict[str, Any], dict[str, Any]]:
    with SqlBackend(url) as reader:
        return reader.export(), reader.stats()


def test_concurrent_writers_reach_the_state_of_one(crm_url: str, tmp_path: Path) -> None:
    bodies, keystore = _stream(tmp_path)
    records = _records(bodies, keystore)
    unique = len({r.key for r in records})

    reference = f"sqlite:///{tmp_path / 'reference.db'}"
    one_applied, _ = asyncio.run(_write(reference, [records[i : i + 50]
                                                    for i in range(0, len(records), 50)]))
    expected, expected_stats = _export(reference)

    applied, conflicts = _concurrently(crm_url, records, seed=3)
    actual, stats = _export(crm_url)
    assert applied == one_applied == unique, "each message applied exactly once in all"
    assert stats["applied_messages"] == expected_stats["applied_messages"]
    assert stats["contacts"] == expected_stats["contacts"]
    assert stats["actions"] == expected_stats["actions"]
    assert actual == expected
    # Visible in the test log: how often writers clashed and were retried inside.
    print(f"{crm_url.split(':')[0]}: {conflicts} clash(es) retried inside the backend")


@pytest.mark.postgres
def test_a_deadlock_is_retried_inside_the_backend(pg_url: str) -> None:
    """Two transactions that lock two contacts in opposite orders: PostgreSQL fails one
    (40P01); the backend classifies it as a conflict, and the error tree as transient."""
    import psycopg
    from sqlalchemy import exc as sa_exc

    from proca_sync.crm.sql.store import _translate, conflict
    from proca_sync.errors import TransientError

    with SqlBackend(pg_url):
        pass  # creates the schema
    dsn = pg_url.replace("postgresql://", "postgresql://", 1)
    one = psycopg.connect(dsn)
    two = psycopg.connect(dsn)
    try:
        for conn, first in ((one, 1), (two, 2)):
            conn.execute("SELECT pg_advisory_xact_lock(%s)", (first,))
        failure: BaseException | None = None

        def cross(conn: psycopg.Connection[Any], other: int) -> None:
            nonlocal failure
            try:
                conn.execute("SELECT pg_advisory_xact_lock(%s)", (other,))
            except psycopg.Error as exc:
                failure = exc
                conn.rollback()

        import threading

        waiter = threading.Thread(target=cross, args=(one, 2))
        waiter.start()
        cross(two, 1)
        waiter.join(timeout=30)
        assert failure is not None, "PostgreSQL must break the deadlock"
        assert conflict(failure)
        wrapped = sa_exc.OperationalError("SELECT", {}, failure)  # type: ignore[arg-type]
        translated = _translate(wrapped)
        assert isinstance(translated, TransientError)
        assert "concurrent write conflict" in str(translated)
    finally:
        one.close()
        two.close()


@pytest.mark.postgres
def test_a_batch_holds_row_locks_on_every_contact_it_reaches(pg_url: str) -> None:
    """lock_batch locks, before the merge reads, each contact a record reaches by its
    refs or e-mails (or its action id: a redelivered action whose contact was merged
    away) — and no other: another transaction cannot lock or change those rows until
    the batch commits, and still can the rest."""
    import psycopg

    from proca_sync.crm.base import NullBackend
    from proca_sync.crm.sql.writer import _Statements, lock_batch
    from tests.support.builders import action, dumps

    created = "2024-05-01T10:00:00Z"
    known = [action(100 + n, ref=f"ref{n:04d}".ljust(43, "x"), email=f"p{n}@example.org",
                    created=created) for n in range(4)]
    engine = Engine(backend=NullBackend())
    stored = [engine.prepare(dumps(m)) for m in known]
    with SqlBackend(pg_url) as backend:
        backend.apply_sync([r for r in stored if isinstance(r, SyncRecord)])
    # A batch reaching contact 0 by its ref, contact 1 by its e-mail only (a new ref) and
    # contact 2 by its action redelivered; contact 3 is not named.
    batch = [
        action(200, ref="ref0000".ljust(43, "x"), email=None, created=created),
        action(201, ref="new1".ljust(43, "x"), email="p1@example.org", created=created),
        known[2],
    ]
    records = [r for r in (engine.prepare(dumps(m)) for m in batch) if isinstance(r, SyncRecord)]
    with psycopg.connect(pg_url) as holder, psycopg.connect(pg_url) as other:
        with holder.cursor() as cursor:
            assert lock_batch(cursor, _Statements("postgresql"), records) == 3
        ids = [row[0] for row in other.execute("SELECT id FROM contacts ORDER BY id")]
        assert len(ids) == 4
        locked = []
        for contact_id in ids:
            try:
                other.execute("SELECT id FROM contacts WHERE id = %s FOR UPDATE NOWAIT",
                              (contact_id,))
            except psycopg.errors.LockNotAvailable:
                locked.append(contact_id)
            other.rollback()
        holder.rollback()
    assert locked == ids[:3]
