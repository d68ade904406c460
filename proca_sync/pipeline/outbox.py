"""Store-then-publish: the sender half of the transactional outbox.

Processing commits a status change together with the messages it implies into the
``outbox`` table (:mod:`proca_sync.pipeline.processing`). :class:`OutboxPublisher`
sends the committed rows that are not yet marked published, in id order, on a channel
with publisher confirms, and marks them only after the broker confirmed them. So:

* a crash before the commit loses nothing that was promised (nothing was answered yet);
* a crash after the commit and before the confirm leaves the row pending: it is sent at
  the next start;
* a crash after the confirm and before the mark sends the row again — the same body with
  the same ``message_id`` (``outbox-<row id>``); consumers dedupe on it or on ``actionId``.

Like the Proca server it publishes persistent and ``mandatory`` and ignores returns
(an unroutable message is lost, topology.md §5), and it (re)declares each org's topology
from its flags (the server does so at start and on org changes).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import aio_pika
import aiormq.abc
from aio_pika.abc import AbstractChannel, AbstractExchange
from sqlalchemy import Engine, exists, select, update

from proca_sync.pipeline.state import campaigns, orgs, outbox
from proca_sync.pipeline.topology import (
    DEFAULT_RETRY_DELAY_MS,
    OrgFlags,
    TopologyError,
    declare_topology,
    plan_topology,
)

__all__ = ["OutboxPublisher", "PublishStats", "message_id", "org_flags"]

log = logging.getLogger("proca_sync.pipeline.outbox")


def message_id(row_id: int) -> str:
    """The AMQP ``message_id`` of outbox row ``row_id``: the same on every re-send."""
    return f"outbox-{row_id}"


def org_flags(engine: Engine) -> dict[int, OrgFlags]:
    """Each org's topology flags from the state (topology.md §2)."""
    with engine.connect() as conn:
        confirming = exists().where(
            campaigns.c.org_id == orgs.c.id, campaigns.c.supporter_confirm.is_(True)
        )
        rows = conn.execute(select(orgs, confirming.label("any_confirm"))).mappings().all()
    return {
        int(row["id"]): OrgFlags(
            custom_supporter_confirm=bool(row["custom_supporter_confirm"]),
            custom_action_confirm=bool(row["custom_action_confirm"]),
            custom_action_deliver=bool(row["custom_action_deliver"]),
            custom_event_deliver=bool(row["custom_event_deliver"]),
            email_backend=bool(row["email_backend"]),
            supporter_confirm=bool(row["supporter_confirm"] or row["any_confirm"]),
        )
        for row in rows
    }


@dataclass
class PublishStats:
    published: int = 0
    unroutable: int = 0
    cycles: int = 0


class OutboxPublisher:
    """Sends committed, unpublished outbox rows; one per database (see module docstring)."""

    def __init__(
        self,
        engine: Engine,
        amqp_url: str,
        *,
        batch: int = 500,
        chunk: int = 50,
        confirm_timeout: float = 30.0,
        poll_interval: float = 0.5,
        retry_delay_ms: int = DEFAULT_RETRY_DELAY_MS,
    ) -> None:
        self._engine = engine
        self._url = amqp_url
        self._batch = batch
        self._chunk = chunk
        self._confirm_timeout = confirm_timeout
        self._poll = poll_interval
        self._retry_delay_ms = retry_delay_ms
        self._wake = asyncio.Event()
        self._declared: dict[int, OrgFlags] = {}
        self._exchanges: dict[str, AbstractExchange] = {}
        self.stats = PublishStats()
        self.ready = asyncio.Event()

    def wake(self) -> None:
        """Tell the publisher new rows were committed (it also polls)."""
        self._wake.set()

    async def run(self, stop: asyncio.Event) -> None:
        """Publish until ``stop`` is set.

        An unreachable broker is not fatal: the intake keeps storing (that is the point of
        the outbox) and the publisher opens a new connection with a growing delay
        (≤ 10 s) after any broker error or a confirm that does not come within
        ``confirm_timeout``. Refused credentials and a topology the broker refuses are
        configuration errors: raised.
        """
        delay = 1.0
        while not stop.is_set():
            try:
                await self._session(stop)
                return
            except (aio_pika.exceptions.ProbableAuthenticationError, TopologyError):
                if not self.ready.is_set():
                    raise
                log.error("outbox publisher: the broker refused the configuration")
            except (
                aio_pika.exceptions.AMQPError,
                aio_pika.exceptions.ChannelInvalidStateError,
                ConnectionError,
                OSError,
            ) as exc:
                log.warning(
                    "broker unavailable (%s); the outbox keeps the messages, retrying in %.0f s",
                    type(exc).__name__,
                    delay,
                )
                self.ready.set()  # the intake works without the broker
            except asyncio.CancelledError:
                task = asyncio.current_task()
                if task is not None and task.cancelling():
                    raise  # we are being stopped
                # aiormq cancels the futures of a connection the broker closed.
                log.warning("broker connection lost; the outbox keeps the messages")
            except Exception as exc:
                # Never die silently: the outbox would stop being sent.
                log.error("outbox publisher error (%s); starting over", type(exc).__name__)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), delay)
            delay = min(delay * 2, 10.0)

    async def _session(self, stop: asyncio.Event) -> None:
        """One connection: declare, then publish until ``stop``; any broker error ends it."""
        # A plain connection: after any broker error the session ends and run() opens a
        # new one (a robust channel could leave publishes waiting for a reconnect that
        # never completes; here every wait is bounded).
        connection = await aio_pika.connect(
            self._url,
            timeout=10,
            client_properties={"connection_name": "proca-sync pipeline outbox"},
        )
        try:
            channel = await connection.channel(publisher_confirms=True)
            self._exchanges.clear()
            self._declared.clear()
            await self.declare_orgs(channel)
            self.ready.set()
            last_declare = asyncio.get_running_loop().time()
            while not stop.is_set():
                sent = await self.publish_pending(channel)
                now = asyncio.get_running_loop().time()
                if now - last_declare > 5:
                    last_declare = now
                    await self.declare_orgs(channel)
                if sent:
                    continue
                self._wake.clear()
                waiters = [
                    asyncio.ensure_future(stop.wait()),
                    asyncio.ensure_future(self._wake.wait()),
                ]
                try:
                    await asyncio.wait(
                        waiters, timeout=self._poll, return_when=asyncio.FIRST_COMPLETED
                    )
                finally:
                    for waiter in waiters:
                        waiter.cancel()
        finally:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(connection.close(), 5)

    async def declare_orgs(self, channel: AbstractChannel) -> None:
        """Declare the topology of every org whose flags changed since the last call."""
        for org, flags in org_flags(self._engine).items():
            if self._declared.get(org) == flags:
                continue
            await declare_topology(
                channel, plan_topology(org, flags, retry_delay_ms=self._retry_delay_ms)
            )
            self._declared[org] = flags
            log.info("declared topology of org %s", org)

    async def _exchange(self, channel: AbstractChannel, name: str) -> AbstractExchange:
        exchange = self._exchanges.get(name)
        if exchange is None:
            exchange = await channel.get_exchange(name, ensure=False)
            self._exchanges[name] = exchange
        return exchange

    def _pending(self) -> Sequence[Any]:
        with self._engine.connect() as conn:
            return conn.execute(
                select(outbox.c.id, outbox.c.exchange, outbox.c.routing_key, outbox.c.body)
                .where(outbox.c.published_at.is_(None))
                .order_by(outbox.c.id)
                .limit(self._batch)
            ).all()

    async def publish_pending(self, channel: AbstractChannel) -> int:
        """Publish one batch of pending rows; mark each chunk once the broker confirmed it.

        Chunks keep the window "confirmed but not marked" (re-sent after a crash) small.
        """
        rows = self._pending()
        if not rows:
            return 0

        async def send(row: Any) -> bool:
            exchange = await self._exchange(channel, row.exchange)
            message = aio_pika.Message(
                row.body,
                delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
                message_id=message_id(row.id),
            )
            result = await exchange.publish(message, row.routing_key, mandatory=True)
            return not isinstance(result, aiormq.abc.DeliveredMessage)

        for start in range(0, len(rows), self._chunk):
            chunk = rows[start : start + self._chunk]
            results = await asyncio.wait_for(
                asyncio.gather(*(send(row) for row in chunk)), self._confirm_timeout
            )
            with self._engine.begin() as conn:
                conn.execute(
                    update(outbox)
                    .where(outbox.c.id.in_([row.id for row in chunk]))
                    .values(published_at=datetime.now(UTC))
                )
            routed = sum(results)
            self.stats.published += len(chunk)
            self.stats.unroutable += len(chunk) - routed
            if routed != len(chunk):
                log.warning(
                    "%d outbox messages were unroutable (no queue bound)", len(chunk) - routed
                )
        self.stats.cycles += 1
        return len(rows)
