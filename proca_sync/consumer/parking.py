"""The parking store: messages that will not succeed as they are, kept for an operator.

A parked message keeps everything needed to inspect and replay it: the raw body bytes,
the AMQP headers, exchange, routing key, queue, the reason code and error text, the
attempts spent and when it was parked. The consumer acks a message only after
:meth:`ParkingStore.park` has committed it (park, *then* ack), so nothing is lost
between the queue and the store. Parking the same body from the same queue twice (a
crash between commit and ack) updates the one row instead of adding another.

SQLAlchemy Core on its own database — a SQLite file by default, PostgreSQL works too —
used from one worker thread. The body holds personal data: this module never logs it.
"""

from __future__ import annotations

import asyncio
import base64
import datetime as dt
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any

from sqlalchemy import (
    Column,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Table,
    Text,
    UniqueConstraint,
    delete,
    func,
    insert,
    select,
    update,
)
from sqlalchemy import exc as sa_exc
from sqlalchemy.types import JSON

from proca_sync.crm.sql import create_store_engine
from proca_sync.crm.sql.store import lock_schema, missing_database, write_engine
from proca_sync.engine import Engine
from proca_sync.errors import BackendUnavailableError, ConfigError, PermanentError
from proca_sync.sync.model import body_digest
from proca_sync.sync.records import Ignored

__all__ = ["ParkItem", "ParkedMessage", "ParkingStore", "RetryResult", "retry_parked"]

metadata = MetaData()

parked_messages = Table(
    "parked_messages",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("queue", String(255), nullable=False),
    Column("digest", String(64), nullable=False),
    Column("exchange", String(255), nullable=False),
    Column("routing_key", String(255), nullable=False),
    Column("headers", JSON, nullable=False),
    Column("body", LargeBinary, nullable=False),
    Column("reason", String(64), nullable=False),
    Column("detail", Text, nullable=False),
    Column("attempts", Integer, nullable=False),
    Column("parked_at", String(40), nullable=False),
    Column("times_parked", Integer, nullable=False, default=1),
    UniqueConstraint("queue", "digest", name="uq_parked_body"),
    # The console's list: newest first, filtered by reason and/or a parked_at range.
    Index("ix_parked_reason_at", "reason", "parked_at", "id"),
    Index("ix_parked_at", "parked_at", "id"),
)


def _now() -> str:
    return dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def json_headers(headers: Mapping[str, Any] | None) -> dict[str, Any]:
    """AMQP header values as JSON: bytes → text (base64 when not UTF-8), times → ISO."""

    def convert(value: Any) -> Any:
        if isinstance(value, Mapping):
            return {str(k): convert(v) for k, v in value.items()}
        if isinstance(value, list | tuple):
            return [convert(v) for v in value]
        if isinstance(value, bytes | bytearray | memoryview):
            raw = bytes(value)
            try:
                return raw.decode("utf-8")
            except UnicodeDecodeError:
                return {"base64": base64.b64encode(raw).decode("ascii")}
        if isinstance(value, dt.datetime):
            return value.isoformat()
        if isinstance(value, Decimal):
            return str(value)
        if value is None or isinstance(value, str | int | float | bool):
            return value
        return repr(value)

    return convert(dict(headers or {}))  # type: ignore[no-any-return]


@dataclass(frozen=True, slots=True)
class ParkItem:
    """What the consumer parks: one delivery and why."""

    body: bytes = field(repr=False)
    queue: str
    exchange: str
    routing_key: str
    headers: Mapping[str, Any] | None
    reason: str
    detail: str
    attempts: int


@dataclass(frozen=True, slots=True)
class ParkedMessage:
    """One row of the store."""

    id: int
    queue: str
    digest: str
    exchange: str
    routing_key: str
    headers: dict[str, Any] = field(repr=False)
    body: bytes = field(repr=False)
    reason: str
    detail: str
    attempts: int
    parked_at: str
    times_parked: int


class ParkingStore:
    """Durable store of parked messages. Thread-confined: every call runs on one thread."""

    def __init__(self, url: str) -> None:
        # synchronous=FULL: a parked message is acked right after this commit.
        self.engine, self.dialect = create_store_engine(
            url, what="parking store", synchronous="FULL"
        )
        # Several consumer processes may share the store: SQLite writes take the lock
        # up front, PostgreSQL creates the table under a lock.
        self._writes = write_engine(self.engine)
        self.url = str(self.engine.url)
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="parking")
        self._ready = False

    # ---- lifecycle --------------------------------------------------------------------

    def open_sync(self) -> None:
        """Create the table on first use. Raises :class:`ConfigError` if unusable."""
        if self._ready:
            return
        try:
            with self._writes.begin() as conn:
                lock_schema(conn)
                metadata.create_all(conn, checkfirst=True)
                # create_all adds indexes only with a new table: a store made before
                # they existed gets them here (once; checkfirst skips present ones).
                for index in parked_messages.indexes:
                    index.create(conn, checkfirst=True)
        except sa_exc.SQLAlchemyError as exc:
            missing = missing_database(exc, what="parking store")
            if missing is not None:
                raise missing from None
            raise ConfigError(f"parking store unusable ({type(exc).__name__})") from None
        self._ready = True

    async def open(self) -> None:
        await self._run(self.open_sync)

    async def close(self) -> None:
        await self._run(self.engine.dispose)
        self._executor.shutdown(wait=True)

    async def _run(self, fn: Any, *args: Any) -> Any:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, fn, *args)

    # ---- writing ----------------------------------------------------------------------

    async def park(self, items: Sequence[ParkItem]) -> None:
        """Store ``items`` in one transaction; returns once committed.

        Raises :class:`BackendUnavailableError` when the store cannot be written (the
        caller must then not ack).
        """
        if items:
            await self._run(self.park_sync, items)

    def park_sync(self, items: Sequence[ParkItem]) -> None:
        self.open_sync()
        now = _now()
        try:
            with self._writes.begin() as conn:
                for item in items:
                    digest = body_digest(item.body)
                    values = {
                        "exchange": item.exchange,
                        "routing_key": item.routing_key,
                        "headers": json_headers(item.headers),
                        "reason": item.reason,
                        "detail": item.detail,
                        "attempts": item.attempts,
                        "parked_at": now,
                    }
                    changed = conn.execute(
                        update(parked_messages)
                        .where(
                            parked_messages.c.queue == item.queue,
                            parked_messages.c.digest == digest,
                        )
                        .values(times_parked=parked_messages.c.times_parked + 1, **values)
                    ).rowcount
                    if not changed:
                        conn.execute(
                            insert(parked_messages).values(
                                queue=item.queue, digest=digest, body=item.body,
                                times_parked=1, **values,
                            )
                        )
        except sa_exc.SQLAlchemyError as exc:
            raise BackendUnavailableError(
                f"parking store unavailable ({type(exc).__name__})"
            ) from None

    def update_reason(self, parked_id: int, reason: str, detail: str) -> None:
        with self.engine.begin() as conn:
            conn.execute(
                update(parked_messages)
                .where(parked_messages.c.id == parked_id)
                .values(reason=reason, detail=detail, parked_at=_now())
            )

    def delete(self, parked_id: int) -> bool:
        self.open_sync()
        with self.engine.begin() as conn:
            removed = conn.execute(
                delete(parked_messages).where(parked_messages.c.id == parked_id)
            ).rowcount
        return bool(removed)

    # ---- reading ----------------------------------------------------------------------

    def entries(self, *, limit: int = 100, reason: str | None = None) -> list[ParkedMessage]:
        """Parked messages, oldest first."""
        self.open_sync()
        query = select(parked_messages).order_by(parked_messages.c.id).limit(limit)
        if reason is not None:
            query = query.where(parked_messages.c.reason == reason)
        with self.engine.connect() as conn:
            return [_row(row) for row in conn.execute(query)]

    def ids(self) -> list[int]:
        self.open_sync()
        with self.engine.connect() as conn:
            return [int(i) for i in conn.execute(
                select(parked_messages.c.id).order_by(parked_messages.c.id)
            ).scalars()]

    def get(self, parked_id: int) -> ParkedMessage | None:
        self.open_sync()
        with self.engine.connect() as conn:
            row = conn.execute(
                select(parked_messages).where(parked_messages.c.id == parked_id)
            ).first()
        return None if row is None else _row(row)

    def count(self) -> int:
        self.open_sync()
        with self.engine.connect() as conn:
            total = conn.execute(select(func.count()).select_from(parked_messages)).scalar()
        return int(total or 0)

    def counts_by_reason(self) -> dict[str, int]:
        self.open_sync()
        with self.engine.connect() as conn:
            rows = conn.execute(
                select(parked_messages.c.reason, func.count()).group_by(parked_messages.c.reason)
            )
            return {str(reason): int(n) for reason, n in rows}


def _row(row: Any) -> ParkedMessage:
    return ParkedMessage(
        id=row.id,
        queue=row.queue,
        digest=row.digest,
        exchange=row.exchange,
        routing_key=row.routing_key,
        headers=dict(row.headers or {}),
        body=bytes(row.body),
        reason=row.reason,
        detail=row.detail,
        attempts=row.attempts,
        parked_at=row.parked_at,
        times_parked=row.times_parked,
    )


# ---- retry ----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class RetryResult:
    """What ``parked retry`` did with one message: ``synced``, ``duplicate``, ``ignored``
    (all three removed from the store) or ``rejected`` (kept, reason updated)."""

    id: int
    outcome: str
    reason: str = ""


async def retry_parked(
    store: ParkingStore,
    engine: Engine,
    ids: Sequence[int],
    *,
    on_result: Callable[[RetryResult], None] | None = None,
) -> list[RetryResult]:
    """Feed parked bodies back through ``engine`` into its CRM, one at a time
    (``on_result`` is called after each, e.g. to advance a progress bar).

    A message the CRM now holds (or that is now ignored) is removed from the store; one
    that is still refused keeps its row with the new reason. Raises
    :class:`~proca_sync.errors.TransientError` when the CRM is unavailable (the rest
    stays parked, untouched).
    """
    results: list[RetryResult] = []
    for parked_id in ids:
        parked = store.get(parked_id)
        if parked is None:
            continue
        outcome: str
        reason = detail = ""
        try:
            prepared = engine.prepare(parked.body)
        except PermanentError as exc:
            outcome, reason, detail = "rejected", str(exc.reason), str(exc)
        else:
            if isinstance(prepared, Ignored):
                outcome = "ignored"
            else:
                (result,) = await engine.apply([prepared])
                if isinstance(result, PermanentError):
                    outcome, reason, detail = "rejected", str(result.reason), str(result)
                else:
                    outcome = "synced" if result == "applied" else "duplicate"
        if outcome == "rejected":
            store.update_reason(parked_id, reason, detail)
        else:
            store.delete(parked_id)
        results.append(RetryResult(parked_id, outcome, reason))
        if on_result is not None:
            on_result(results[-1])
    return results
