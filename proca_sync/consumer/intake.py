"""The broker side of the consumer: robust connection, QoS, subscription, settlement.

* :func:`connect` opens an ``aio_pika.connect_robust`` connection (TLS verified for
  ``amqps``; reconnect delays grow exponentially while the broker stays away).
* :class:`Intake` declares the queue **passively** (the Proca server owns it; a missing
  queue or a refused access is a :class:`IntakeError`, reported in one line), sets the
  prefetch, subscribes with a recognisable consumer tag and settles deliveries. It
  consumes on the robust channel's underlying aiormq channel: each delivery reaches the
  consumer as aiormq's own :class:`~aiormq.abc.DeliveredMessage`, without aio-pika's
  per-delivery message object and second task (a sixth of the per-message CPU of the
  consumer alone). After a reconnect aio-pika reopens the channel and re-applies the
  QoS; its ``reopen_callbacks`` hook then subscribes again on the new channel. A
  consumer cancelled by the broker (the queue was deleted) subscribes again once the
  queue is back (:meth:`Intake.probe` sees it).
* :class:`AckBook` batches acks: one ``basic.ack(multiple=True)`` covers the contiguous
  prefix of settled delivery tags, the rest is acked one by one. Tags belong to one
  channel: after a reconnect the broker numbers deliveries afresh on a new channel, and
  each delivery remembers the channel it came on, so an old tag is never acked on a new
  channel (messages of a closed channel were already returned to the queue).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
from collections.abc import Callable, Coroutine, Mapping
from dataclasses import dataclass, field
from typing import Any

import aio_pika
import aiormq
import aiormq.abc
import aiormq.exceptions
from aio_pika.abc import (
    AbstractRobustChannel,
    AbstractRobustConnection,
    AbstractRobustQueue,
)
from aio_pika.robust_connection import RobustConnection
from aiormq.abc import ChannelFrame, DeliveredMessage
from pamqp import commands as spec

from proca_sync.config import ConsumerSettings
from proca_sync.errors import ConfigError, TransientError
from proca_sync.pipeline.topology import QueueState
from proca_sync.sync.records import SyncRecord

__all__ = [
    "AckBook",
    "BackoffConnection",
    "BrokerUnavailableError",
    "Delivery",
    "Intake",
    "IntakeError",
    "connect",
    "queue_state",
]

log = logging.getLogger("proca_sync.consumer")

RECONNECT_BASE = 1.0
RECONNECT_MAX = 15.0


class IntakeError(ConfigError):
    """The queue cannot be consumed at all: missing, access refused, bad credentials."""


class BrokerUnavailableError(TransientError):
    """The broker could not be reached at start-up."""


class BackoffConnection(RobustConnection):
    """``connect_robust``'s connection with exponential reconnect delays.

    aio-pika sleeps ``reconnect_interval`` between attempts; reading it while
    disconnected doubles the next delay (capped), and a live connection resets it.
    """

    _base_interval: float = RECONNECT_BASE
    _failed_attempts: int = 0

    @property
    def reconnect_interval(self) -> float:
        if self.connected.is_set():
            self._failed_attempts = 0
            return self._base_interval
        growth = 2.0 ** min(self._failed_attempts, 16)
        delay: float = min(RECONNECT_MAX, self._base_interval * growth)
        self._failed_attempts += 1
        return delay

    @reconnect_interval.setter
    def reconnect_interval(self, value: float) -> None:
        self._base_interval = float(value)
        self._failed_attempts = 0


async def connect(
    settings: ConsumerSettings, *, robust: bool = True
) -> aio_pika.abc.AbstractConnection:
    """Connect to the broker of ``settings``.

    Raises :class:`IntakeError` when the credentials, vhost or TLS certificate are refused
    and :class:`BrokerUnavailableError` when nothing answers. Messages never contain the
    password.
    """
    url = settings.amqp_url()
    where = settings.redacted_url()
    kwargs: dict[str, Any] = {
        "ssl_context": settings.ssl_context(),
        # Operators see who is connected, and to which queue.
        "client_properties": {"connection_name": f"{settings.consumer_tag} {settings.queue}"},
        "timeout": 15,
    }
    try:
        connection: aio_pika.abc.AbstractConnection
        if robust:
            connection = await aio_pika.connect_robust(
                url,
                reconnect_interval=RECONNECT_BASE,
                connection_class=BackoffConnection,
                **kwargs,
            )
        else:
            connection = await aio_pika.connect(url, **kwargs)
        return connection
    except aiormq.exceptions.ProbableAuthenticationError:
        raise IntakeError(f"broker {where} refused the user name or password") from None
    except aiormq.exceptions.ConnectionNotAllowed:
        raise IntakeError(f"broker {where}: vhost missing or not allowed for this user") from None
    except aiormq.exceptions.AMQPConnectionError as exc:
        tls = _tls_failure(exc)
        if tls is not None:
            raise IntakeError(f"TLS with {where} failed: {tls}") from None
        # Nothing listening, or the connection dropped: an outage (exit 1), not a typo.
        raise BrokerUnavailableError(f"broker {where} unreachable: {exc}") from None
    except OSError as exc:
        if isinstance(exc, ssl.SSLError):
            raise IntakeError(f"TLS with {where} failed: {exc}") from None
        raise BrokerUnavailableError(f"broker {where} unreachable: {exc}") from None
    except TimeoutError:
        raise BrokerUnavailableError(f"broker {where} did not answer in time") from None


def _tls_failure(exc: BaseException) -> str | None:
    """The TLS error inside a wrapped connection error (aiormq wraps ``ssl.SSLError``)."""
    seen: set[int] = set()
    stack: list[object] = [exc]
    while stack:
        item = stack.pop()
        if id(item) in seen or not isinstance(item, BaseException):
            continue
        seen.add(id(item))
        if isinstance(item, ssl.SSLError):
            return str(item)
        stack.extend([item.__cause__, item.__context__, *item.args])
    text = str(exc)
    return text if "SSL" in text and "CERTIFICATE" in text.upper() else None


async def queue_state(
    channel: aiormq.abc.AbstractChannel, name: str
) -> QueueState:
    """Depth and consumers of ``name`` by a passive declare on a throw-away ``channel``.

    A missing queue closes ``channel`` (the broker answers 404) and gives
    ``exists=False``.
    """
    try:
        ok = await channel.queue_declare(name, passive=True)
    except aiormq.exceptions.ChannelNotFoundEntity:
        return QueueState(name, exists=False)
    return QueueState(
        name,
        exists=True,
        messages=int(ok.message_count or 0),
        consumers=int(ok.consumer_count or 0),
    )


# ---- ack bookkeeping ----------------------------------------------------------------------


class AckBook:
    """Which delivery tags of one channel are settled, and which acks to send.

    Tags on a channel are consecutive from 1. :meth:`frames` returns the acks to send
    now: ``(tag, True)`` for the highest acked tag of the contiguous settled prefix (one
    frame for many messages) and ``(tag, False)`` for acked tags after a gap, which stay
    unacked no longer than needed. A multiple ack never covers a tag that is still being
    handled, nor one that was already rejected individually (it is named only up to the
    last *acked* tag, and a broker's multiple ack skips settled tags).
    """

    def __init__(self) -> None:
        self._floor = 0  # every tag <= floor is settled at the broker
        self._to_ack: set[int] = set()
        self._settled: set[int] = set()  # > floor, settled at the broker one by one

    def ack(self, tag: int) -> None:
        """Mark ``tag`` done; it is acked by the next :meth:`frames`."""
        if tag > self._floor:
            self._to_ack.add(tag)

    def settled(self, tag: int) -> None:
        """``tag`` was rejected or nacked on its own (it is no longer unacked)."""
        if tag > self._floor:
            self._settled.add(tag)
            self._to_ack.discard(tag)

    @property
    def pending(self) -> int:
        return len(self._to_ack)

    def frames(self, *, singles: bool = True) -> list[tuple[int, bool]]:
        """The acks to send now. With ``singles=False`` acked tags after a gap are kept
        back: when the gap closes, the multiple ack of the prefix covers them in one
        frame (the caller sends them on their own a little later if it does not)."""
        frames: list[tuple[int, bool]] = []
        last_acked = 0
        tag = self._floor + 1
        while tag in self._to_ack or tag in self._settled:
            if tag in self._to_ack:
                self._to_ack.discard(tag)
                last_acked = tag
            else:
                self._settled.discard(tag)
            tag += 1
        self._floor = tag - 1
        if last_acked:
            frames.append((last_acked, True))
        if not singles:
            return frames
        for single in sorted(self._to_ack):
            frames.append((single, False))
            self._settled.add(single)
        self._to_ack.clear()
        return frames


async def send_acks(channel: aiormq.abc.AbstractChannel, acks: list[tuple[int, bool]]) -> None:
    """Send ``acks`` (tag, multiple) on ``channel`` as one write, drained once.

    ``basic_ack`` writes and drains each frame on its own: with several batches running,
    most acks sit behind another batch's gap and go out one frame each, so that was a
    socket write and a few event-loop turns per message. The frames are aiormq's own
    (``ChannelFrame`` of ``Basic.Ack`` methods, queued as ``basic_ack`` queues them), the
    drain future is the channel's (failed when the channel closes)."""
    if len(acks) == 1 or not isinstance(channel, aiormq.Channel):
        for tag, multiple in acks:
            await channel.basic_ack(tag, multiple=multiple)
        return
    if channel.is_closed:
        raise aiormq.exceptions.ChannelInvalidStateError(f"{channel!r} closed")
    drained = channel.create_future()
    await channel.write_queue.put(
        ChannelFrame.marshall(
            channel_number=channel.number,
            frames=[spec.Basic.Ack(delivery_tag=tag, multiple=multiple) for tag, multiple in acks],
            drain_future=drained,
        )
    )
    await drained


# ---- deliveries -----------------------------------------------------------------------------


@dataclass(eq=False, slots=True)
class Delivery:
    """One message we hold unsettled, and the channel (generation) it came on."""

    message: DeliveredMessage = field(repr=False)
    channel: aiormq.abc.AbstractChannel = field(repr=False)
    tag: int
    attempts: int
    received: float
    record: SyncRecord | None = field(default=None, repr=False)

    @property
    def stale(self) -> bool:
        """Its channel is gone: the broker has already put the message back."""
        return self.channel.is_closed

    @property
    def body(self) -> bytes:
        return self.message.body

    @property
    def headers(self) -> Mapping[str, Any]:
        return self.message.header.properties.headers or {}

    @property
    def redelivered(self) -> bool:
        return bool(self.message.redelivered)


class Intake:
    """Consumes one queue on a robust connection; settles deliveries."""

    def __init__(
        self,
        settings: ConsumerSettings,
        on_message: Callable[[DeliveredMessage], Coroutine[Any, Any, None]],
    ) -> None:
        self.settings = settings
        self._on_message = on_message
        self.connection: AbstractRobustConnection | None = None
        self.channel: AbstractRobustChannel | None = None
        self.queue: AbstractRobustQueue | None = None
        self._publisher: AbstractRobustChannel | None = None
        self._probe: aiormq.abc.AbstractChannel | None = None
        self._books: dict[aiormq.abc.AbstractChannel, AckBook] = {}
        self._consumer_tag: str | None = None
        self._consuming_on: aiormq.abc.AbstractChannel | None = None
        self._cancelled = False  # by the broker: subscribe again when the queue is back
        self.reconnects = 0
        self.on_reconnect: Callable[[], None] | None = None

    # ---- lifecycle ----------------------------------------------------------------------

    async def open(self) -> None:
        """Connect, set the prefetch and check the queue exists (passive declare).

        Raises :class:`IntakeError` (missing queue, access refused, credentials) or
        :class:`BrokerUnavailableError`.
        """
        connection = await connect(self.settings)
        assert isinstance(connection, RobustConnection)
        self.connection = connection
        connection.reconnect_callbacks.add(self._reconnected)
        connection.close_callbacks.add(self._connection_lost)
        name = self.settings.queue
        try:
            self.channel = await connection.channel()
            await self.channel.set_qos(prefetch_count=self.settings.effective_prefetch)
            self.queue = await self.channel.declare_queue(name, passive=True)
        except aiormq.exceptions.ChannelNotFoundEntity:
            await self.close()
            raise IntakeError(
                f"queue {name!r} does not exist on {self.settings.redacted_url()} "
                "(the Proca server creates it when the org enables custom delivery)"
            ) from None
        except aiormq.exceptions.ChannelAccessRefused:
            await self.close()
            raise IntakeError(
                f"access to queue {name!r} refused on {self.settings.redacted_url()}"
            ) from None

    async def start(self) -> None:
        """Subscribe (manual acks). Deliveries go to ``on_message`` in delivery order,
        each in a task of aiormq's channel (cancelled if the channel closes)."""
        assert self.channel is not None
        self._consumer_tag = self.settings.consumer_tag
        await self._subscribe()
        # aio-pika restores the channel (and its QoS) after a reconnect, then calls this.
        self.channel.reopen_callbacks.add(self._resubscribe)

    async def _subscribe(self) -> None:
        assert self.channel is not None
        assert self._consumer_tag is not None
        raw = await self.channel.get_underlay_channel()
        if self._consumer_cancelled not in raw.on_consumer_cancel_callbacks:
            raw.on_consumer_cancel_callbacks.add(self._consumer_cancelled)
        await raw.basic_consume(
            self.settings.queue, self._on_message, consumer_tag=self._consumer_tag
        )
        self._consuming_on = raw
        self._cancelled = False

    async def _resubscribe(self, *_args: Any) -> None:
        if self._consumer_tag is None:  # stopped meanwhile
            return
        try:
            await self._subscribe()
        except Exception as exc:
            # The queue is missing, the channel died again, the broker is slow to answer:
            # never fail aio-pika's channel restore over it (it would reconnect again and
            # again); the next reopen, or the monitor once it sees the queue, tries again.
            self._cancelled = True
            log.warning("subscribing again failed (%s)", type(exc).__name__,
                        extra={"fields": {"event": "resubscribe_failed"}})  # fmt: skip

    def _consumer_cancelled(self, frame: Any) -> None:
        if frame.consumer_tag == self._consumer_tag:
            self._cancelled = True

    async def stop(self) -> None:
        """Cancel the subscription: no new deliveries (those held stay held)."""
        tag, self._consumer_tag = self._consumer_tag, None
        raw = self._consuming_on
        if tag is None or raw is None or raw.is_closed:
            return
        with contextlib.suppress(Exception):
            await asyncio.wait_for(raw.basic_cancel(tag), timeout=5)

    async def close(self) -> None:
        """Close the connection; the broker returns every unacked message to the queue."""
        if self.connection is not None and not self.connection.is_closed:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self.connection.close(), timeout=5)
        self._books.clear()

    @property
    def connected(self) -> bool:
        connection = self.connection
        return (
            connection is not None
            and not connection.is_closed
            and isinstance(connection, RobustConnection)
            and connection.connected.is_set()
        )

    def _reconnected(self, *_args: Any) -> None:
        self.reconnects += 1
        # Books of closed channels can never be used again.
        for channel in [c for c in self._books if c.is_closed]:
            del self._books[channel]
        log.warning(
            "reconnected to the broker (#%d)", self.reconnects,
            extra={"fields": {"event": "reconnected", "reconnects": self.reconnects}},
        )
        if self.on_reconnect is not None:
            self.on_reconnect()

    def _connection_lost(self, _sender: Any, exc: BaseException | None = None) -> None:
        if self.connection is not None and getattr(self.connection, "close_called", False):
            return
        log.warning(
            "connection to the broker lost (%s); reconnecting",
            type(exc).__name__ if exc is not None else "closed",
            extra={"fields": {"event": "connection_lost"}},
        )

    # ---- settlement ---------------------------------------------------------------------

    def delivery(self, message: DeliveredMessage, attempts: int, received: float) -> Delivery:
        """Wrap a fresh delivery, remembering its channel."""
        channel = message.channel
        if channel not in self._books:
            self._books[channel] = AckBook()
        tag = message.delivery_tag
        assert tag is not None
        return Delivery(message, channel, tag, attempts, received)

    def ack(self, delivery: Delivery) -> None:
        """Mark ``delivery`` for acking at the next :meth:`flush`."""
        book = self._books.get(delivery.channel)
        if book is not None and not delivery.stale:
            book.ack(delivery.tag)

    @property
    def pending_acks(self) -> int:
        """Acks decided but not sent (held behind a gap by ``flush(singles=False)``)."""
        return sum(book.pending for channel, book in self._books.items() if not channel.is_closed)

    async def flush(self, *, singles: bool = True) -> None:
        """Send the pending acks of every open channel (batched where contiguous).

        ``singles=False`` sends only the multiple ack of each channel's settled prefix,
        unless the acks held behind a gap reach a quarter of the prefetch (held acks
        count against it: the broker would stop delivering).
        """
        hold_limit = max(1, self.settings.effective_prefetch // 4)
        for channel, book in list(self._books.items()):
            if channel.is_closed:
                self._books.pop(channel, None)
                continue
            acks = book.frames(singles=singles or book.pending >= hold_limit)
            if not acks:
                continue
            try:
                await send_acks(channel, acks)
            except (aiormq.exceptions.AMQPError, aiormq.exceptions.ChannelInvalidStateError):
                # The channel died meanwhile: the broker requeued these messages; their
                # redelivery is recognised as a duplicate by the CRM.
                self._books.pop(channel, None)

    async def reject(self, delivery: Delivery) -> bool:
        """Reject without requeue: the dead-letter circuit brings it back later."""
        return await self._settle_one(delivery, requeue=False)

    async def requeue(self, delivery: Delivery) -> bool:
        """Nack with requeue: back to the queue now (shutdown, failed local retry)."""
        return await self._settle_one(delivery, requeue=True)

    async def _settle_one(self, delivery: Delivery, *, requeue: bool) -> bool:
        book = self._books.get(delivery.channel)
        if book is None or delivery.stale:
            return False
        try:
            if requeue:
                await delivery.channel.basic_nack(delivery.tag, requeue=True)
            else:
                await delivery.channel.basic_reject(delivery.tag, requeue=False)
        except aiormq.exceptions.AMQPError:
            return False
        book.settled(delivery.tag)
        return True

    async def republish(self, delivery: Delivery, headers: Mapping[str, Any]) -> bool:
        """Publish a copy of ``delivery`` to the queue via the default exchange and wait for
        the broker's confirm. ``False`` if it was not confirmed (or unroutable)."""
        assert self.connection is not None
        if self._publisher is None or self._publisher.is_closed:
            self._publisher = await self.connection.channel(publisher_confirms=True)
        source = delivery.message.header.properties
        message = aio_pika.Message(
            delivery.body,
            headers=dict(headers),
            content_type=source.content_type,
            content_encoding=source.content_encoding,
            delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
        )
        try:
            result = await asyncio.wait_for(
                self._publisher.default_exchange.publish(
                    message, routing_key=self.settings.queue, mandatory=True
                ),
                timeout=30,
            )
        except (aiormq.exceptions.AMQPError, aio_pika.exceptions.DeliveryError, TimeoutError):
            return False
        return not isinstance(result, aiormq.abc.DeliveredMessage)

    # ---- observation --------------------------------------------------------------------

    async def probe(self, name: str) -> QueueState | None:
        """Depth of queue ``name`` now (passive declare), or ``None`` while disconnected."""
        connection = self.connection
        if connection is None or not self.connected or connection.transport is None:
            return None
        try:
            if self._probe is None or self._probe.is_closed:
                self._probe = await asyncio.wait_for(
                    connection.transport.connection.channel(), timeout=5
                )
            state = await asyncio.wait_for(queue_state(self._probe, name), timeout=5)
        except (aiormq.exceptions.AMQPError, TimeoutError, ConnectionError, RuntimeError):
            self._probe = None
            return None
        if self._cancelled and state.exists and name == self.settings.queue:
            await self._resubscribe()
        return state
