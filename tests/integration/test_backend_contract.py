"""The backend contract (``proca_sync.crm.base``), run against every CRM backend.

Each backend comes with a small *harness* that knows how to observe its state and how to
make its CRM fail for real: a locked SQLite file, a PostgreSQL table locked by another
session, an HTTP CRM answering 503 or stopped. Nothing of ours is mocked.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import socket
import sqlite3
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select

from proca_sync.crm.base import Backend, NullBackend
from proca_sync.crm.sql import SqlBackend, applied_messages
from proca_sync.crm.webhook import WebhookBackend
from proca_sync.engine import Engine
from proca_sync.errors import BackendRejectedError, PermanentError, TransientError
from proca_sync.sync.records import SyncRecord
from tests.support.crm_server import CrmServer

FIXTURES = Path(__file__).resolve().parents[3] / "shared" / "fixtures"

PG_HOST = os.environ.get("PROCA_TEST_PG_HOST", "127.0.0.1")
PG_PORT = int(os.environ.get("PROCA_TEST_PG_PORT", "5432"))
PG_DB = os.environ.get("PROCA_TEST_PG_DB", "test")
PG_DSN = f"host={PG_HOST} port={PG_PORT} dbname={PG_DB} user=postgres"


def fixture_records() -> list[SyncRecord]:
    """The records of every sample message, in file-name order."""
    engine = Engine(backend=NullBackend())
    records = []
    for path in sorted(FIXTURES.glob("*.json")):
        prepared = engine.prepare(path.read_bytes())
        assert isinstance(prepared, SyncRecord), path.name
        records.append(prepared)
    assert len(records) >= 5, f"sample messages missing in {FIXTURES}"
    return records


def free_port() -> int:
    """A loopback port nobody listens on (bound, then released)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


def require_postgres() -> None:
    """Skip when PostgreSQL is absent on a developer machine; fail when CI is set."""
    try:
        with socket.create_connection((PG_HOST, PG_PORT), timeout=1):
            return
    except OSError:
        message = f"PostgreSQL is not reachable on {PG_HOST}:{PG_PORT}"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)


# ---- harnesses: one per backend ---------------------------------------------------------


class Harness:
    """How the contract drives and observes one backend. Defaults: "not applicable"."""

    backend: Backend

    def applied_keys(self) -> set[str] | None:
        """Keys the CRM holds, or ``None`` when it keeps no state."""
        return None

    def state(self) -> Any:
        """A snapshot of everything the CRM holds (compared before / after)."""
        return None

    @contextlib.contextmanager
    def transient_failure(self) -> Iterator[None]:
        """Inside the block, the CRM is there but fails every write transiently."""
        pytest.skip(f"{self.backend.name} never fails transiently")
        yield

    @contextlib.asynccontextmanager
    async def outage(self) -> AsyncIterator[Backend]:
        """A backend whose CRM cannot be reached; ``self.backend`` works after the block."""
        pytest.skip(f"{self.backend.name} has no CRM to lose")
        yield self.backend

    def refuse(self, record: SyncRecord) -> None:
        """Make the CRM refuse ``record`` for good."""
        pytest.skip(f"{self.backend.name} refuses nothing")


class NullHarness(Harness):
    def __init__(self) -> None:
        self.backend = NullBackend()


class SqlHarness(Harness):
    def __init__(self, url: str) -> None:
        self.url = url
        self.backend = self.sql = SqlBackend(url)

    def applied_keys(self) -> set[str]:
        with self.sql.engine.connect() as conn:
            return set(conn.execute(select(applied_messages.c.key)).scalars())

    def state(self) -> Any:
        export = self.sql.export()
        stats = self.sql.stats()
        return export, stats, self.applied_keys()

    def refuse(self, record: SyncRecord) -> None:
        pytest.skip(
            "SQLite stores any value a record carries, and what a trigger can raise there "
            "is a constraint error, which counts as a (transient) write conflict"
        )


class SqliteHarness(SqlHarness):
    def __init__(self, tmp_path: Path) -> None:
        self.path = tmp_path / "crm.db"
        # A short busy timeout: a locked database fails fast (and transiently).
        super().__init__(f"sqlite:///{self.path}?timeout=0.2")

    @contextlib.contextmanager
    def transient_failure(self) -> Iterator[None]:
        # Another process's write transaction: "database is locked" for our writer.
        other = sqlite3.connect(self.path, isolation_level=None)
        try:
            other.execute("BEGIN EXCLUSIVE")
            yield
            other.execute("ROLLBACK")
        finally:
            other.close()

    @contextlib.asynccontextmanager
    async def outage(self) -> AsyncIterator[Backend]:
        down = SqlBackend(f"sqlite:///{self.path.parent / 'missing-dir' / 'crm.db'}")
        try:
            yield down
        finally:
            await down.close()


class PostgresHarness(SqlHarness):
    def __init__(self, schema: str) -> None:
        self.schema = schema
        # lock_timeout: a locked table fails fast (and transiently) instead of waiting.
        super().__init__(
            f"postgresql://postgres@{PG_HOST}:{PG_PORT}/{PG_DB}"
            f"?options=-csearch_path%3D{schema}%20-clock_timeout%3D300"
        )

    @contextlib.contextmanager
    def transient_failure(self) -> Iterator[None]:
        import psycopg

        with psycopg.connect(PG_DSN) as other:
            other.execute(f'LOCK TABLE "{self.schema}".applied_messages IN ACCESS EXCLUSIVE MODE')
            yield
            other.rollback()

    def refuse(self, record: SyncRecord) -> None:
        # The database itself refuses the record's row with a data exception (SQLSTATE
        # class 22), as it does a NUL character or an over-long value.
        import psycopg

        with psycopg.connect(PG_DSN, autocommit=True) as conn:
            conn.execute(
                f'CREATE FUNCTION "{self.schema}".refuse() RETURNS trigger AS $$ BEGIN '
                f"IF NEW.key = {psycopg.sql.quote(record.key)} THEN "
                "RAISE EXCEPTION 'refused by the test' USING ERRCODE = '22023'; END IF; "
                "RETURN NEW; END $$ LANGUAGE plpgsql"
            )
            conn.execute(
                f'CREATE TRIGGER refuse BEFORE INSERT ON "{self.schema}".applied_messages '
                f'FOR EACH ROW EXECUTE FUNCTION "{self.schema}".refuse()'
            )

    @contextlib.asynccontextmanager
    async def outage(self) -> AsyncIterator[Backend]:
        down = SqlBackend(f"postgresql://postgres@127.0.0.1:{free_port()}/{PG_DB}")
        try:
            yield down
        finally:
            await down.close()


class WebhookHarness(Harness):
    def __init__(self, crm: CrmServer) -> None:
        self.crm = crm
        self.backend = WebhookBackend(crm.url, timeout=5.0)

    def applied_keys(self) -> set[str]:
        return set(self.crm.applied_keys())

    def state(self) -> Any:
        return self.crm.stored()

    @contextlib.contextmanager
    def transient_failure(self) -> Iterator[None]:
        self.crm.fail_with(503)
        try:
            yield
        finally:
            self.crm.heal()

    @contextlib.asynccontextmanager
    async def outage(self) -> AsyncIterator[Backend]:
        with self.crm.down():
            yield self.backend

    def refuse(self, record: SyncRecord) -> None:
        self.crm.validation_error_for(lambda payload: payload.get("key") == record.key)


@pytest.fixture
def pg_schema() -> Iterator[str]:
    """A fresh PostgreSQL schema, dropped after the test."""
    require_postgres()
    import psycopg

    schema = "t_" + secrets.token_hex(6)
    with psycopg.connect(PG_DSN, autocommit=True) as conn:
        conn.execute(f'CREATE SCHEMA "{schema}"')
    try:
        yield schema
    finally:
        with psycopg.connect(PG_DSN, autocommit=True) as conn:
            conn.execute(f'DROP SCHEMA "{schema}" CASCADE')


@pytest.fixture(
    params=[
        "null",
        "sqlite",
        pytest.param("postgres", marks=pytest.mark.postgres),
        "webhook",
    ]
)
async def harness(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Harness]:
    kind = request.param
    with contextlib.ExitStack() as stack:
        h: Harness
        if kind == "null":
            h = NullHarness()
        elif kind == "sqlite":
            h = SqliteHarness(tmp_path)
        elif kind == "postgres":
            h = PostgresHarness(request.getfixturevalue("pg_schema"))
        else:
            h = WebhookHarness(stack.enter_context(CrmServer()))
        await h.backend.open()
        try:
            yield h
        finally:
            await h.backend.close()


@pytest.fixture
def records() -> list[SyncRecord]:
    return fixture_records()


# ---- the contract -------------------------------------------------------------------------


class TestBackendContract:
    async def test_is_a_backend(self, harness: Harness) -> None:
        assert isinstance(harness.backend, Backend)
        assert harness.backend.name

    async def test_apply_returns_one_result_per_record_in_order(
        self, harness: Harness, records: list[SyncRecord]
    ) -> None:
        assert list(await harness.backend.apply([])) == []
        results = await harness.backend.apply(records)
        assert list(results) == ["applied"] * len(records)
        keys = harness.applied_keys()
        if keys is not None:
            assert keys == {record.key for record in records}

    async def test_applying_twice_changes_nothing(
        self, harness: Harness, records: list[SyncRecord]
    ) -> None:
        await harness.backend.apply(records)
        before = harness.state()
        again = await harness.backend.apply(records)
        assert len(again) == len(records)
        assert all(result in {"applied", "duplicate"} for result in again)
        assert harness.state() == before
        # One by one, too (a redelivered single message).
        for record in records:
            [result] = await harness.backend.apply([record])
            assert result in {"applied", "duplicate"}
        assert harness.state() == before

    async def test_transient_failure_raises_then_a_later_apply_succeeds(
        self, harness: Harness, records: list[SyncRecord]
    ) -> None:
        with harness.transient_failure(), pytest.raises(TransientError):
            await harness.backend.apply(records)
        results = await harness.backend.apply(records)
        assert len(results) == len(records)
        assert all(result in {"applied", "duplicate"} for result in results)
        assert harness.applied_keys() == {record.key for record in records}

    async def test_permanent_refusal_lands_in_its_slot_and_the_others_apply(
        self, harness: Harness, records: list[SyncRecord]
    ) -> None:
        refused = records[1]
        harness.refuse(refused)
        results = await harness.backend.apply(records)
        assert len(results) == len(records)
        assert isinstance(results[1], PermanentError)
        assert isinstance(results[1], BackendRejectedError)
        assert [r for i, r in enumerate(results) if i != 1] == ["applied"] * (len(records) - 1)
        assert harness.applied_keys() == {r.key for r in records} - {refused.key}

    async def test_ping_works_when_up_and_raises_transient_when_down(
        self, harness: Harness
    ) -> None:
        await harness.backend.ping()
        async with harness.outage() as down:
            with pytest.raises(TransientError):
                await down.ping()
        await harness.backend.ping()
