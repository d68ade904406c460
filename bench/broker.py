"""The broker side of a case: a fresh queue, pre-filled, and checks that it drained.

Messages are published like the Proca server does (persistent, **no content type**, no
headers): @proca/queue 5.3 drops ``application/json`` bodies, and Proca sends none.
Publishing is plain (no publisher confirms: awaiting each confirm, or a task per message,
costs more Python time than the publish itself) and :func:`prefill` then waits until the
queue reports all N messages. Nothing here is timed.
"""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass

import aiormq
from pamqp.commands import Basic

__all__ = ["Broker", "QueueState"]


@dataclass(frozen=True)
class QueueState:
    ready: int
    consumers: int


class Broker:
    """One AMQP connection used to declare, fill, inspect and delete bench queues.

    The machine may be shared with test suites that close every connection or restart
    the broker app: :meth:`ensure` reconnects (waiting for the broker to come back) and
    counts reconnections in ``generation``, so a run that lost the broker can be spotted
    and repeated. Queues that could not be deleted then are deleted after reconnecting.
    """

    def __init__(self, url: str) -> None:
        self.url = url
        self.generation = 0
        self._connection: aiormq.abc.AbstractConnection | None = None
        self._channel: aiormq.abc.AbstractChannel | None = None
        self._orphans: set[str] = set()

    async def __aenter__(self) -> Broker:
        await self._connect()
        return self

    async def __aexit__(self, *_exc: object) -> None:
        if self._connection is not None and not self._connection.is_closed:
            with contextlib.suppress(Exception):
                await self._connection.close()
        self._connection = self._channel = None

    async def _connect(self) -> None:
        self._connection = await aiormq.connect(self.url)
        self._channel = await self._connection.channel(publisher_confirms=False)

    @property
    def lost(self) -> bool:
        """The connection or channel is gone (closed by the broker or another job)."""
        return (
            self._connection is None
            or self._connection.is_closed
            or self._channel is None
            or self._channel.is_closed
        )

    async def ensure(self, within: float = 180.0) -> None:
        """Reconnect if the connection was lost, waiting up to ``within`` seconds."""
        if not self.lost:
            return
        loop = asyncio.get_running_loop()
        deadline = loop.time() + within
        while True:
            try:
                await self._connect()
                break
            except (aiormq.exceptions.AMQPError, ConnectionError, OSError):
                if loop.time() > deadline:
                    raise
                await asyncio.sleep(1.0)
        self.generation += 1
        for name in list(self._orphans):
            await self.delete(name)

    @property
    def channel(self) -> aiormq.abc.AbstractChannel:
        if self._channel is None or self._channel.is_closed:
            raise RuntimeError("broker channel is not open")
        return self._channel

    async def server_version(self) -> str:
        assert self._connection is not None
        props = self._connection.server_properties or {}
        version = props.get("version", b"?")
        return version.decode() if isinstance(version, bytes) else str(version)

    async def fresh_queue(self, label: str) -> str:
        """Declare a new durable classic queue ``bench.<label>.<random>``."""
        name = f"bench.{label}.{uuid.uuid4().hex[:8]}"
        await self.channel.queue_declare(name, durable=True, auto_delete=False)
        return name

    async def prefill(self, queue: str, bodies: Iterable[bytes], within: float = 120.0) -> int:
        """Publish every body to ``queue`` (persistent, no content type); wait until queued."""
        properties = Basic.Properties(delivery_mode=2)
        publish = self.channel.basic_publish
        count = 0
        for body in bodies:
            await publish(body, exchange="", routing_key=queue, properties=properties)
            count += 1
        loop = asyncio.get_running_loop()
        deadline = loop.time() + within
        while (ready := (await self.state(queue)).ready) != count:
            if ready > count or loop.time() > deadline:
                raise RuntimeError(f"queue {queue} holds {ready} messages, published {count}")
            await asyncio.sleep(0.02)
        return count

    async def state(self, queue: str) -> QueueState:
        """Ready messages and consumers (passive declare; unacked messages not counted)."""
        ok = await self.channel.queue_declare(queue, passive=True)
        return QueueState(ready=ok.message_count or 0, consumers=ok.consumer_count or 0)

    async def delete(self, queue: str) -> None:
        if self.lost:
            self._orphans.add(queue)
            return
        try:
            await self.channel.queue_delete(queue)
        except (aiormq.exceptions.AMQPError, ConnectionError, RuntimeError):
            self._orphans.add(queue)
        else:
            self._orphans.discard(queue)

    @contextlib.asynccontextmanager
    async def queue(self, label: str) -> AsyncIterator[str]:
        """A fresh queue for the block, deleted afterwards."""
        name = await self.fresh_queue(label)
        try:
            yield name
        finally:
            await self.delete(name)
