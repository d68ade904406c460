"""The consumer's runner without a broker: an in-process intake delivers, settles and
records acks, so the rules of consumer/runner.py are checked on any machine.

``LocalIntake`` is the real :class:`~proca_sync.consumer.intake.Intake` (its
``AckBook``, ``flush``, ``reject`` and ``requeue`` run unchanged) with the connection
replaced: deliveries come from the test and the channel records the frames it is sent.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import logging
import os
import signal
import time
import urllib.request
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any, ClassVar

import aiormq.exceptions
import orjson
import pytest
from rich.console import Console

from proca_sync.config import ConsumerSettings, RetryMode
from proca_sync.consumer.breaker import Breaker, BreakerState
from proca_sync.consumer.intake import Intake
from proca_sync.consumer.parking import ParkingStore
from proca_sync.consumer.policy import ATTEMPTS_HEADER, Outcome
from proca_sync.consumer.runner import (
    SUMMARY_EVERY,
    BatchTally,
    Consumer,
    ExitStatus,
    lane_hash,
    serve,
)
from proca_sync.crm.base import ApplyResult
from proca_sync.crypto import Keystore
from proca_sync.errors import ConfigError, PermanentError, Reason, TransientError
from proca_sync.pipeline.topology import QueueState, fail_queue
from proca_sync.sync.model import body_digest
from proca_sync.sync.records import Mode, SyncRecord
from tests.support.builders import ORG, action, dumps, records

QUEUE = "cus.4242.deliver"  # a Proca org queue: retries go through the dead-letter circuit


async def eventually(check: Callable[[], bool], *, within: float, what: str) -> None:
    deadline = time.monotonic() + within
    while not check():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {within} s waiting for {what}")
        await asyncio.sleep(0.005)  # sleep-ok: poll interval inside a deadline


def failing(exc: BaseException) -> Callable[[Sequence[SyncRecord]], Sequence[ApplyResult]]:
    """A scripted ``apply`` that raises ``exc``."""

    def fail(records: Sequence[SyncRecord]) -> Sequence[ApplyResult]:
        raise exc

    return fail


# ---- the stand-ins: a channel that records frames, an intake without a connection -------


@dataclass
class Frame:
    kind: str  # ack | reject | nack
    tag: int
    multiple: bool = False
    applied_then: frozenset[str] = frozenset()
    """Record keys whose ``apply`` had returned when the frame was sent."""


class LocalChannel:
    """The part of an AMQP channel the intake settles deliveries on."""

    def __init__(self, backend: GatedBackend) -> None:
        self.backend = backend
        self.frames: list[Frame] = []
        self.is_closed = False
        self.broken = False

    async def basic_ack(self, tag: int, multiple: bool = False) -> None:
        self.frames.append(Frame("ack", tag, multiple, frozenset(self.backend.returned)))

    async def basic_reject(self, tag: int, requeue: bool = True) -> None:
        assert not requeue
        self.frames.append(Frame("reject", tag))

    async def basic_nack(self, tag: int, multiple: bool = False, requeue: bool = True) -> None:
        assert requeue
        if self.broken:
            raise RuntimeError("a bug in the channel")
        self.frames.append(Frame("nack", tag))

    def acked(self) -> set[int]:
        """Every tag an ack frame covers (a multiple ack covers all tags up to its own)."""
        tags: set[int] = set()
        for frame in self.frames:
            if frame.kind == "ack":
                tags |= set(range(1, frame.tag + 1)) if frame.multiple else {frame.tag}
        return tags


@dataclass
class LocalMessage:
    """What aiormq hands the consumer for one delivery (the attributes it reads)."""

    body: bytes
    delivery_tag: int
    channel: LocalChannel
    headers: dict[str, Any] = field(default_factory=dict)
    redelivered: bool = False
    exchange: str = ""
    routing_key: str = QUEUE
    content_type: str | None = None
    content_encoding: str | None = None

    @property
    def header(self) -> SimpleNamespace:
        """The content header: its properties carry the AMQP headers."""
        return SimpleNamespace(properties=SimpleNamespace(headers=self.headers))


class LocalIntake(Intake):
    """:class:`Intake` with the broker connection replaced by :class:`LocalChannel`."""

    channel_for: LocalChannel | None = None
    last: LocalIntake | None = None

    def __init__(
        self,
        settings: ConsumerSettings,
        on_message: Callable[[Any], Awaitable[None]],
    ) -> None:
        super().__init__(settings, on_message)
        LocalIntake.last = self
        assert LocalIntake.channel_for is not None
        self.local = LocalIntake.channel_for
        self.started = asyncio.Event()
        self.republished: list[tuple[bytes, dict[str, Any]]] = []
        self.queues: dict[str, int] = {}  # ready messages per queue name; -1: missing
        self._next_tag = 0

    async def open(self) -> None:
        return None

    async def start(self) -> None:
        self.started.set()

    async def stop(self) -> None:
        return None

    async def close(self) -> None:
        self._books.clear()

    @property
    def connected(self) -> bool:
        return True

    async def probe(self, name: str) -> QueueState | None:
        """The queue's state as the test set it in ``queues`` (``None``: disconnected)."""
        if name not in self.queues:
            return None
        messages = self.queues[name]
        return QueueState(name, exists=messages >= 0, messages=max(messages, 0))

    async def republish(self, delivery: Any, headers: Any) -> bool:
        self.republished.append((delivery.body, dict(headers)))
        return True

    def reconnect(self) -> None:
        """The connection was lost and restored: the old channel is closed, deliveries
        come on a new one with tags from 1 again (aio-pika calls ``on_reconnect``)."""
        self.local.is_closed = True
        fresh = LocalChannel(self.local.backend)
        self.local = fresh
        self._next_tag = 0
        self._reconnected()

    async def deliver(
        self, body: bytes, headers: dict[str, Any] | None = None, *, exchange: str = "",
        routing_key: str = QUEUE,
    ) -> int:
        """One delivery, as the broker would hand it to the consumer; its tag."""
        self._next_tag += 1
        await self._on_message(LocalMessage(body, self._next_tag, self.local, headers or {},
                                            exchange=exchange, routing_key=routing_key))
        return self._next_tag


class GatedBackend:
    """A CRM whose ``apply`` waits for the test to open its gate, then succeeds (or
    answers what the test scripted)."""

    name = "gated"

    def __init__(self) -> None:
        self.gate = asyncio.Event()
        self.calls: list[list[str]] = []
        self.returned: set[str] = set()
        self.script: list[Callable[[Sequence[SyncRecord]], Sequence[ApplyResult]]] = []
        self.ping_ok = True
        self.ping_retry_after: float | None = None
        self.ping_error: Exception | None = None
        self.pings = 0
        self.close_fails = False

    async def open(self) -> None:
        return None

    async def close(self) -> None:
        if self.close_fails:
            raise OSError("close failed")

    async def ping(self) -> None:
        self.pings += 1
        if not self.ping_ok:
            raise self.ping_error or TransientError("CRM still down",
                                                    retry_after=self.ping_retry_after)

    async def apply(self, records: Sequence[SyncRecord]) -> Sequence[ApplyResult]:
        self.calls.append([r.key for r in records])
        await self.gate.wait()
        results = self.script.pop(0)(records) if self.script else ["applied"] * len(records)
        self.returned.update(
            r.key for r, res in zip(records, results, strict=False) if res == "applied"
        )
        return results


@dataclass
class Rig:
    consumer: Consumer
    intake: LocalIntake
    channel: LocalChannel
    backend: GatedBackend
    parking: ParkingStore


@pytest.fixture
async def rig(tmp_path: Path) -> AsyncIterator[Rig]:
    backend = GatedBackend()
    channel = LocalChannel(backend)
    LocalIntake.channel_for = channel
    settings = ConsumerSettings(
        queue=QUEUE, concurrency=2, batch_size=5, max_retries=2, status_interval=60,
        consumer_tag="test",
    )
    parking = ParkingStore(f"sqlite:///{tmp_path / 'parked.db'}")
    consumer = Consumer(
        settings, backend=backend, parking=parking,
        breaker=Breaker(threshold=1, base_delay=0.01, max_delay=0.05),
        intake_factory=LocalIntake,
    )
    intake = consumer.intake
    assert isinstance(intake, LocalIntake)
    task = asyncio.create_task(consumer.run())
    await asyncio.wait_for(intake.started.wait(), 10)
    try:
        yield Rig(consumer, intake, channel, backend, parking)
    finally:
        backend.gate.set()
        consumer.request_stop("test")
        await asyncio.wait_for(task, 20)
        parking.engine.dispose()


PERSON = {"email": "ada.lovelace@example.org", "first": "Adelaide", "last": "Quixotic",
          "postcode": "B-1040", "ref": "Zq7kPersonalRef0000000000000000000000000000"}


def person_action(action_id: int, *, ref: str | None = None, email: str | None = None) -> bytes:
    return dumps(action(
        action_id, ref=ref or PERSON["ref"], email=email or PERSON["email"],
        created=f"2024-03-01T10:00:{action_id % 60:02d}Z", first_name=PERSON["first"],
        record={"lastName": PERSON["last"], "postcode": PERSON["postcode"]},
    ))


# ---- ack only after apply returned ---------------------------------------------------------


async def test_acks_only_after_the_backend_apply_returned(rig: Rig) -> None:
    tags = [await rig.intake.deliver(person_action(n, ref=f"r{n}".ljust(43, "x"),
                                                   email=f"p{n}@example.org"))
            for n in range(1, 5)]
    await eventually(lambda: bool(rig.backend.calls), within=10, what="apply called")
    # apply is running (its gate closed); a message settled meanwhile gets its ack sent,
    # and that ack must cover none of the messages still being applied.
    poison = await rig.intake.deliver(b"not json {")
    await eventually(lambda: poison in rig.channel.acked(), within=10, what="the poison's ack")
    assert rig.channel.acked() == {poison}
    rig.backend.gate.set()
    await eventually(lambda: rig.channel.acked() >= set(tags), within=10, what="the acks")
    applied = {key for call in rig.backend.calls for key in call}
    assert len(applied) == len(tags)
    for frame in rig.channel.frames:
        assert frame.kind == "ack"
        covered = set(range(1, frame.tag + 1)) if frame.multiple else {frame.tag}
        # every message the frame acks was applied before it was sent (or is the poison)
        assert len(frame.applied_then) >= len(covered - {poison})
    assert rig.consumer.stats.settled_total == len(tags) + 1


async def test_a_permanent_refusal_is_parked_before_its_ack(rig: Rig) -> None:
    def refuse_first(records: Sequence[SyncRecord]) -> Sequence[ApplyResult]:
        return [PermanentError("refused", reason=Reason.CRM_REJECTED),
                *["applied"] * (len(records) - 1)]

    rig.backend.script.append(refuse_first)
    rig.backend.gate.set()
    body = person_action(7)
    headers = {"x-death": [{"queue": QUEUE, "reason": "rejected", "count": 1}]}
    tag = await rig.intake.deliver(body, headers)
    await eventually(lambda: tag in rig.channel.acked(), within=10, what="the ack")
    (entry,) = rig.parking.entries()
    assert (entry.reason, entry.queue, entry.exchange, entry.routing_key, entry.attempts) == (
        "crm_rejected", QUEUE, "", QUEUE, 1)
    assert entry.body == body and entry.headers == headers
    assert entry.detail == "PermanentError: crm_rejected: refused"
    assert rig.consumer.stats.settled_total == 1


async def test_a_failing_parking_store_sends_the_message_back_for_a_retry(
    rig: Rig, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="proca_sync")
    # Parking failed: the message is neither acked (it would be lost) nor parked; it goes
    # back through the dead-letter circuit. Messages of the same batch that were not to be
    # parked are settled as usual.
    with rig.parking.engine.begin() as connection:
        connection.exec_driver_sql("DROP TABLE parked_messages")
    rig.backend.script.append(
        lambda records: [PermanentError("refused", reason=Reason.CRM_REJECTED), "applied"])
    refused = await rig.intake.deliver(distinct(1))
    fine = await rig.intake.deliver(distinct(2))
    rig.backend.gate.set()
    await eventually(lambda: any(f.kind == "reject" and f.tag == refused
                                 for f in rig.channel.frames), within=10, what="the retry")
    await eventually(lambda: fine in rig.channel.acked(), within=10, what="the other's ack")
    assert [f.kind for f in rig.channel.frames if f.tag == refused] == ["reject"]
    assert rig.consumer.stats.labels["parking_failed"] == 1
    (retry,) = [getattr(r, "fields") for r in caplog.records
                if getattr(r, "fields", {}).get("outcome") == "retry"]
    assert (retry["label"], retry["error"]) == (
        "parking_failed", "PermanentError: crm_rejected: refused")


async def test_every_delivery_of_a_batch_whose_channel_closed_is_returned(rig: Rig) -> None:
    first = await rig.intake.deliver(distinct(1))
    second = await rig.intake.deliver(distinct(2))
    await eventually(lambda: bool(rig.backend.calls), within=10, what="apply called")
    assert [len(call) for call in rig.backend.calls] == [2]
    old = rig.channel
    rig.intake.reconnect()
    rig.backend.gate.set()
    await eventually(lambda: rig.consumer.stats.totals()["returned"] == 2, within=10,
                     what="both counted as returned")
    assert old.frames == [] and (first, second) == (1, 2)
    assert rig.consumer.stats.totals()["in_flight"] == 0


async def test_poison_is_parked_and_acked_without_reaching_the_crm(rig: Rig) -> None:
    rig.backend.gate.set()
    tag = await rig.intake.deliver(b"not json {")
    await eventually(lambda: tag in rig.channel.acked(), within=10, what="the ack")
    assert rig.backend.calls == []
    assert [e.reason for e in rig.parking.entries()] == ["invalid_json"]
    # its settlement task is forgotten once done (a long run keeps no finished tasks)
    await eventually(lambda: not rig.consumer._tasks, within=10, what="the task forgotten")


async def test_attempts_are_counted_on_this_queue_s_dead_letter_entry(rig: Rig) -> None:
    # x-death has an entry per queue and reason: the one of this queue with reason
    # "rejected" counts (1 here), not the largest (5, expired elsewhere).
    rig.backend.gate.set()
    headers = {"x-death": [{"queue": "cus.4242.other", "reason": "expired", "count": 5},
                           {"queue": QUEUE, "reason": "rejected", "count": 1}]}
    tag = await rig.intake.deliver(b"not json {", headers)
    await eventually(lambda: tag in rig.channel.acked(), within=10, what="the ack")
    (entry,) = rig.parking.entries()
    assert (entry.reason, entry.attempts) == ("invalid_json", 1)


async def test_a_parked_message_keeps_the_exchange_and_routing_key_it_came_by(rig: Rig) -> None:
    # What the parking store needs to put it back where it came from.
    rig.backend.gate.set()
    tags = [await rig.intake.deliver(b"not json {", exchange="org.4242.deliver",
                                     routing_key="x.y"),
            await rig.intake.deliver(b"not json [", routing_key="")]
    await eventually(lambda: rig.channel.acked() >= set(tags), within=10, what="the acks")
    assert sorted((e.exchange, e.routing_key) for e in rig.parking.entries()) == [
        ("", ""), ("org.4242.deliver", "x.y")]


async def test_transient_failure_is_retried_through_the_dead_letter_circuit(
    rig: Rig, caplog: pytest.LogCaptureFixture
) -> None:
    """Breaker threshold 1: the failure opens it; the prober's ping closes it again via
    one half-open probe message; nothing is acked before apply succeeded."""
    caplog.set_level(logging.INFO, logger="proca_sync")
    rig.backend.script.append(failing(TransientError("down")))
    rig.backend.ping_ok = False
    rig.backend.gate.set()
    tag = await rig.intake.deliver(person_action(8))
    await eventually(lambda: rig.consumer.breaker.state is BreakerState.OPEN, within=10,
                     what="the breaker to open")
    await eventually(lambda: rig.backend.pings >= 2, within=10, what="failed probes")
    assert rig.channel.frames == []  # held, not retried: the budget is kept
    assert rig.consumer.stats.breaker is BreakerState.OPEN  # /healthz and the metrics say so
    rig.backend.ping_ok = True
    await eventually(lambda: tag in rig.channel.acked(), within=10, what="the ack")
    assert rig.consumer.breaker.state is BreakerState.CLOSED
    assert len(rig.backend.calls) == 2
    assert [f.kind for f in rig.channel.frames] == ["ack"]
    # each change of state said once (not again after each failed probe)
    states = [(r.levelno, getattr(r, "fields")["state"]) for r in caplog.records
              if getattr(r, "fields", {}).get("event") == "breaker"]
    assert states == [(logging.WARNING, BreakerState.OPEN.value),
                      (logging.INFO, BreakerState.HALF_OPEN.value),
                      (logging.WARNING, BreakerState.CLOSED.value)]
    assert rig.consumer.stats.breaker is BreakerState.CLOSED


async def test_the_half_open_probe_is_one_message(rig: Rig) -> None:
    # If the probe fails although the CRM answered the ping, it may be that message's own
    # problem: it spends a retry, so it must be one message, not a batch of them.
    rig.backend.script.append(failing(TransientError("down")))
    rig.backend.ping_ok = False
    rig.backend.gate.set()
    tags = [await rig.intake.deliver(distinct(1))]
    await eventually(lambda: rig.consumer.breaker.state is BreakerState.OPEN, within=10,
                     what="the breaker to open")
    rig.backend.gate.clear()
    tags += [await rig.intake.deliver(distinct(n)) for n in (2, 3)]  # held meanwhile
    await eventually(lambda: rig.backend.pings >= 2, within=10, what="failed probes")
    rig.backend.ping_ok = True
    await eventually(lambda: len(rig.backend.calls) == 2, within=10, what="the probe")
    for _ in range(20):  # event-loop turns: the other worker must not probe as well
        await asyncio.sleep(0)  # sleep-ok: yields a turn, no fixed delay
    assert len(rig.backend.calls) == 2
    rig.backend.gate.set()
    await eventually(lambda: rig.channel.acked() >= set(tags), within=10, what="the acks")
    assert [len(call) for call in rig.backend.calls][:2] == [1, 1]
    assert sum(len(call) for call in rig.backend.calls[1:]) == 3


async def test_a_probe_that_fails_although_the_ping_answered_spends_a_retry(rig: Rig) -> None:
    rig.backend.script.extend([failing(TransientError("down")), failing(TransientError("no"))])
    rig.backend.ping_ok = False
    rig.backend.gate.set()
    tag = await rig.intake.deliver(person_action(84))
    await eventually(lambda: rig.consumer.breaker.state is BreakerState.OPEN, within=10,
                     what="the breaker to open")
    rig.backend.ping_ok = True
    await eventually(lambda: any(f.kind == "reject" and f.tag == tag for f in rig.channel.frames),
                     within=10, what="the probe message rejected for a retry")
    # the breaker opened again: a second probe must be let through for the next message
    again = await rig.intake.deliver(person_action(83, ref="n".ljust(43, "x"), email="n@x.org"))
    await eventually(lambda: again in rig.channel.acked(), within=10, what="the next ack")
    assert len(rig.backend.calls) == 3


async def test_a_stale_delivery_held_by_the_breaker_is_dropped_by_the_worker_taking_it(
    rig: Rig,
) -> None:
    # The connection is lost while a delivery is being applied; the batch fails and the
    # breaker holds it at its lane's head. The worker that takes it later must drop it
    # (the broker has redelivered it) and free the lane for the redelivery.
    old = rig.channel
    rig.backend.script.append(failing(TransientError("down")))
    await rig.intake.deliver(person_action(85))
    await eventually(lambda: bool(rig.backend.calls), within=10, what="apply called")
    rig.backend.ping_ok = False
    rig.intake.reconnect()
    rig.backend.gate.set()
    await eventually(lambda: rig.consumer.breaker.state is BreakerState.OPEN, within=10,
                     what="the breaker to open")
    rig.backend.ping_ok = True
    await eventually(lambda: rig.consumer.stats.totals()["returned"] == 1, within=10,
                     what="the stale delivery dropped")
    fresh = rig.intake.local
    again = await rig.intake.deliver(person_action(85))
    await eventually(lambda: again in fresh.acked(), within=10, what="the redelivery's ack")
    assert len(rig.backend.calls) == 2  # the stale delivery was not applied again
    assert old.frames == []


async def test_a_retry_after_from_a_failed_ping_delays_the_next_probe(rig: Rig) -> None:
    rig.backend.script.append(failing(TransientError("down")))
    rig.backend.ping_ok = False
    rig.backend.ping_retry_after = 0.4
    rig.backend.gate.set()
    tag = await rig.intake.deliver(person_action(86))
    await eventually(lambda: rig.backend.pings >= 1, within=10, what="a failed probe")
    breaker = rig.consumer.breaker
    await eventually(lambda: breaker.trips >= 1, within=10, what="the probe counted")
    assert breaker.probe_delay() >= 0.4  # not the 0.02 s of the second backoff step
    rig.backend.ping_ok = True
    await eventually(lambda: tag in rig.channel.acked(), within=10, what="the ack")


async def test_a_ping_failing_with_another_error_is_probed_again(rig: Rig) -> None:
    rig.backend.script.append(failing(TransientError("down")))
    rig.backend.ping_ok = False
    rig.backend.ping_error = ConnectionRefusedError("refused")  # not a TransientError
    rig.backend.gate.set()
    tag = await rig.intake.deliver(person_action(87))
    await eventually(lambda: rig.backend.pings >= 2, within=10, what="probes after the first")
    rig.backend.ping_ok = True
    await eventually(lambda: tag in rig.channel.acked(), within=10, what="the ack")


async def test_an_unexpected_batch_error_is_isolated_by_applying_singly(rig: Rig) -> None:
    def fine(records: Sequence[SyncRecord]) -> Sequence[ApplyResult]:
        return ["applied"] * len(records)

    rig.backend.script.extend([failing(RuntimeError("bug")), fine, failing(ValueError("this"))])
    first = await rig.intake.deliver(person_action(9, ref="a".ljust(43, "x"), email="a@x.org"))
    second = await rig.intake.deliver(person_action(10, ref="b".ljust(43, "x"), email="b@x.org"))
    rig.backend.gate.set()
    await eventually(lambda: first in rig.channel.acked(), within=10, what="the first ack")
    await eventually(lambda: any(f.kind == "reject" and f.tag == second
                                 for f in rig.channel.frames),
                     within=10, what="the second rejected for a retry")
    assert [len(c) for c in rig.backend.calls] == [2, 1, 1]
    assert second not in rig.channel.acked()
    assert rig.consumer.stats.labels == {"applied": 1, "ValueError": 1}
    assert rig.consumer.stats.totals()["returned"] == 0


async def test_retries_exhausted_are_parked(rig: Rig) -> None:
    rig.backend.script.append(failing(KeyError("a bug")))
    rig.backend.gate.set()
    # two earlier failed attempts recorded by the dead-letter circuit: max_retries reached
    headers = {"x-death": [{"queue": QUEUE, "reason": "rejected", "count": 2}]}
    tag = await rig.intake.deliver(person_action(11), headers)
    await eventually(lambda: tag in rig.channel.acked(), within=10, what="the ack")
    assert [e.reason for e in rig.parking.entries()] == ["retries_exhausted"]


async def test_one_lane_is_applied_in_order_never_two_at_once(rig: Rig) -> None:
    tags = [await rig.intake.deliver(person_action(n)) for n in range(20, 24)]
    rig.backend.gate.set()
    await eventually(lambda: rig.channel.acked() >= set(tags), within=10, what="the acks")
    keys = [key for call in rig.backend.calls for key in call]
    assert [int(k.split(":")[1]) for k in keys] == [20, 21, 22, 23]
    assert all(len(call) == 1 for call in rig.backend.calls)


async def test_stop_hands_back_what_was_not_started(rig: Rig) -> None:
    first = await rig.intake.deliver(person_action(30))
    await eventually(lambda: bool(rig.backend.calls), within=10, what="apply called")
    second = await rig.intake.deliver(person_action(31))  # same lane: waits behind the first
    rig.consumer.request_stop("test")
    rig.backend.gate.set()
    await eventually(lambda: first in rig.channel.acked(), within=10, what="the first ack")
    await eventually(lambda: any(f.kind == "nack" and f.tag == second
                                 for f in rig.channel.frames),
                     within=10, what="the second handed back")
    assert rig.consumer.stats.totals()["returned"] == 1


# ---- no personal data in the log --------------------------------------------------------------


async def test_logs_carry_no_personal_data_nor_the_raw_lane(
    rig: Rig, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="proca_sync")

    def refuse(records: Sequence[SyncRecord]) -> Sequence[ApplyResult]:
        return [PermanentError("refused", reason=Reason.CRM_REJECTED)] * len(records)

    rig.backend.script.extend([lambda records: ["applied"] * len(records), refuse])
    rig.backend.gate.set()
    tags = []
    for n, body in enumerate([person_action(40), person_action(41), b"not json {"]):
        tags.append(await rig.intake.deliver(body))
        if n == 0:
            await eventually(lambda: bool(rig.backend.calls), within=10, what="apply called")
    await eventually(lambda: rig.channel.acked() >= set(tags), within=10, what="the acks")
    lane = "ref:" + PERSON["ref"]
    logged = [
        (r.getMessage(), repr(getattr(r, "fields", None)))
        for r in caplog.records if r.name.startswith("proca_sync")
    ]
    messages = [m for m, _ in logged if m.startswith(("ack", "park"))]
    assert len(messages) == 3, logged  # one line per outcome was written
    hashed = lane_hash(lane)
    assert sum(hashed in fields for _, fields in logged) == 2  # the lane, hashed
    text = "\n".join(m + " " + f for m, f in logged).lower()
    for secret in [*PERSON.values(), lane]:
        assert secret.lower() not in text


async def test_without_log_each_acks_are_not_logged_one_by_one_even_at_debug(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # With a status display (log_each off), only notable outcomes are logged: a parked
    # message is, an ack is not, whatever the level.
    caplog.set_level(logging.DEBUG, logger="proca_sync")
    backend = GatedBackend()
    backend.gate.set()
    channel = LocalChannel(backend)
    LocalIntake.channel_for = channel
    settings = ConsumerSettings(queue=QUEUE, consumer_tag="test", status_interval=60)
    parking = ParkingStore(f"sqlite:///{tmp_path / 'parked.db'}")
    consumer = Consumer(settings, backend=backend, parking=parking, log_each=False,
                        intake_factory=LocalIntake)
    intake = consumer.intake
    assert isinstance(intake, LocalIntake)
    task = asyncio.create_task(consumer.run())
    try:
        await asyncio.wait_for(intake.started.wait(), 10)
        tags = [await intake.deliver(distinct(1)), await intake.deliver(b"not json {")]
        await eventually(lambda: channel.acked() >= set(tags), within=10, what="the acks")
    finally:
        consumer.request_stop("test")
        await asyncio.wait_for(task, 20)
        parking.engine.dispose()
    outcomes = [getattr(r, "fields")["outcome"] for r in caplog.records
                if getattr(r, "fields", {}).get("event") == "message"]
    assert outcomes == ["park"]


async def test_a_parked_message_is_logged_with_these_fields(
    rig: Rig, caplog: pytest.LogCaptureFixture
) -> None:
    # The structured fields log pipelines read, value by value (none of them personal).
    caplog.set_level(logging.INFO, logger="proca_sync")
    rig.backend.script.append(
        lambda records: [PermanentError("refused", reason=Reason.CRM_REJECTED)] * len(records))
    rig.backend.gate.set()
    headers = {"x-death": [{"queue": QUEUE, "reason": "rejected", "count": 1}]}
    body = person_action(12)
    started = time.monotonic()
    tags = [await rig.intake.deliver(body, headers), await rig.intake.deliver(b"not json {")]
    await eventually(lambda: rig.channel.acked() >= set(tags), within=10, what="the acks")
    elapsed_ms = (time.monotonic() - started) * 1000
    lines = [dict(getattr(r, "fields")) for r in caplog.records
             if getattr(r, "fields", {}).get("event") == "message"]
    assert [r.levelno for r in caplog.records if getattr(r, "fields", {}).get("event")
            == "message"] == [logging.WARNING, logging.WARNING]
    for line in lines:
        ms = line.pop("ms")  # from the delivery to its settlement, parking included
        assert isinstance(ms, float) and 0 < ms <= elapsed_ms + 0.1
    (record,) = records([body])
    assert record.action is not None
    assert sorted(lines, key=lambda line: line["label"]) == [
        {"event": "message", "outcome": "park", "label": "crm_rejected", "attempts": 1,
         "redelivered": False, "key": record.key, "lane": lane_hash(record.lane),
         "action_id": record.action.action_id, "reason": "crm_rejected",
         "error": "PermanentError: crm_rejected: refused"},
        {"event": "message", "outcome": "park", "label": "invalid_json", "attempts": 0,
         "redelivered": False, "digest": body_digest(b"not json {"), "reason": "invalid_json",
         "error": "DecodeError: invalid_json: body is not valid JSON"},
    ]


async def test_batches_are_summed_up_in_one_info_line_a_second(
    rig: Rig, caplog: pytest.LogCaptureFixture
) -> None:
    # One INFO line per batch costs a twentieth of the consumer's CPU at a few thousand
    # messages a second: batches are counted into one line per SUMMARY_EVERY instead,
    # and what is left is written at the stop (so the lines add up to every batch).
    caplog.set_level(logging.INFO, logger="proca_sync")
    rig.backend.gate.set()
    started = time.monotonic()
    tags = [await rig.intake.deliver(person_action(n, ref=f"s{n}".ljust(43, "x"),
                                                   email=f"s{n}@example.org"))
            for n in range(1, 31)]
    await eventually(lambda: rig.channel.acked() >= set(tags), within=10, what="the acks")
    rig.consumer.request_stop("test")
    await eventually(lambda: any(getattr(r, "fields", {}).get("event") == "stopped"
                                 for r in caplog.records), within=10, what="the stop")
    elapsed = time.monotonic() - started
    lines = [getattr(r, "fields") for r in caplog.records
             if getattr(r, "fields", {}).get("event") == "batches"]
    assert len(rig.backend.calls) >= 6  # batch size 5: at least six batches ran
    assert sum(line["batches"] for line in lines) == len(rig.backend.calls)
    assert sum(line["messages"] for line in lines) == sum(line["acked"] for line in lines) == 30
    assert sum(sum(line["by_label"].values()) for line in lines) == 30
    assert 1 <= len(lines) <= elapsed / SUMMARY_EVERY + 1
    assert all(line["retried"] == line["parked"] == line["held"] == 0 for line in lines)
    # the batch-duration metric: one observation per batch, each within the run
    registry = rig.consumer.stats.registry
    assert registry.get_sample_value("proca_sync_batch_seconds_count") == len(rig.backend.calls)
    assert 0 < (registry.get_sample_value("proca_sync_batch_seconds_sum") or 0) < elapsed
    assert all(0 < line["ms_max"] < elapsed * 1000 for line in lines)
    # the breaker never changed: nothing says it did
    assert not [r for r in caplog.records if getattr(r, "fields", {}).get("event") == "breaker"]


def test_a_batch_tally_counts_each_outcome_the_held_and_the_slowest_batch() -> None:
    # The summary line's figures, value by value: what each batch settled per outcome and
    # label, what it held (its size less what was settled), the slowest batch in ms.
    tally = BatchTally(100.0)
    assert tally.fields(100.0) == {
        "event": "batches", "batches": 0, "messages": 0, "acked": 0, "retried": 0,
        "parked": 0, "held": 0, "by_label": {}, "ms_max": 0.0, "seconds": 0.0}
    tally.add({(Outcome.ACK, "applied"): 3, (Outcome.RETRY, "transient"): 1}, 5, 0.06789)
    tally.add({(Outcome.PARK, "crm_rejected"): 2, (Outcome.RETRY, "transient"): 1,
               (Outcome.ACK, "applied"): 1, (Outcome.PARK, "invalid_json"): 1}, 8, 0.02)
    assert tally.fields(101.23456) == {
        "event": "batches", "batches": 2, "messages": 13, "acked": 4, "retried": 2,
        "parked": 3, "held": 4,
        "by_label": {"applied": 4, "transient": 2, "crm_rejected": 2, "invalid_json": 1},
        "ms_max": 67.9, "seconds": 1.23}


async def test_a_lone_batch_is_summed_up_at_the_stop_and_each_line_counts_from_the_last(
    rig: Rig, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="proca_sync")
    rig.backend.gate.set()

    def lines() -> list[dict[str, Any]]:
        return [getattr(r, "fields") for r in caplog.records
                if getattr(r, "fields", {}).get("event") == "batches"]

    for n in (1, 2):
        tag = await rig.intake.deliver(distinct(n))
        await eventually(lambda: tag in rig.channel.acked(), within=10, what="the ack")
        if n == 1:
            assert lines() == []  # not due yet
            await asyncio.sleep(SUMMARY_EVERY)  # sleep-ok: the next batch makes a line due
    await eventually(lambda: len(lines()) == 1, within=10, what="the first summary line")
    assert (lines()[0]["batches"], lines()[0]["messages"]) == (2, 2)
    tag = await rig.intake.deliver(distinct(3))
    await eventually(lambda: tag in rig.channel.acked(), within=10, what="the third ack")
    assert len(lines()) == 1  # the next line counts from the first one: not due
    rig.consumer.request_stop("test")
    await eventually(lambda: any(getattr(r, "fields", {}).get("event") == "stopped"
                                 for r in caplog.records), within=10, what="the stop")
    assert [(line["batches"], line["messages"]) for line in lines()] == [(2, 2), (1, 1)]


class RejectFailsChannel(LocalChannel):
    """A channel on which rejecting the first delivery fails (the broker refused it)."""

    async def basic_reject(self, tag: int, requeue: bool = True) -> None:
        if tag == 1:
            raise aiormq.exceptions.ChannelPreconditionFailed("refused")
        await super().basic_reject(tag, requeue)


async def test_a_reject_that_fails_leaves_the_rest_of_the_batch_to_be_settled(
    tmp_path: Path,
) -> None:
    backend = GatedBackend()
    backend.script.append(failing(TransientError("once")))
    channel = RejectFailsChannel(backend)
    LocalIntake.channel_for = channel
    settings = ConsumerSettings(queue=QUEUE, consumer_tag="test", status_interval=60)
    parking = ParkingStore(f"sqlite:///{tmp_path / 'parked.db'}")
    consumer = Consumer(settings, backend=backend, parking=parking, intake_factory=LocalIntake)
    intake = consumer.intake
    assert isinstance(intake, LocalIntake)
    task = asyncio.create_task(consumer.run())
    try:
        await asyncio.wait_for(intake.started.wait(), 10)
        first, second = [await intake.deliver(distinct(n)) for n in (1, 2)]
        backend.gate.set()
        await eventually(lambda: any(f.kind == "reject" and f.tag == second
                                     for f in channel.frames), within=10, what="the reject")
        assert [len(call) for call in backend.calls] == [2]
        assert consumer.stats.totals()["returned"] == 1  # the first: the broker has it
        assert consumer.stats.labels == {"TransientError": 1}
        assert first == 1
    finally:
        consumer.request_stop("test")
        await asyncio.wait_for(task, 20)
        parking.engine.dispose()


# ---- local retries (no dead-letter circuit) -----------------------------------------------


async def test_local_retry_republishes_with_one_more_attempt_then_acks(tmp_path: Path) -> None:
    backend = GatedBackend()
    backend.script.append(failing(KeyError("a bug")))
    backend.gate.set()
    async with running(tmp_path, backend, LOCAL_RETRIES) as (
        consumer, intake, channel, parking, _task
    ):
        body = person_action(50)
        tag = await intake.deliver(body, {ATTEMPTS_HEADER: 1})
        await eventually(lambda: tag in channel.acked(), within=10, what="the ack")
        assert intake.republished == [(body, {ATTEMPTS_HEADER: 2})]
        assert consumer.stats.labels == {"KeyError": 1}  # counted once, when settled
        assert parking.entries() == []


# ---- the engine as the settings and the key store make it ------------------------------------


async def test_the_consumer_decrypts_with_its_key_store_and_filters_by_mode_and_testing(
    tmp_path: Path,
) -> None:
    # --mode and --skip-testing reach the engine from the consumer's settings, and the key
    # store decrypts the personal data: only the opted-in, real, encrypted action is applied.
    backend = GatedBackend()
    backend.gate.set()
    channel = LocalChannel(backend)
    LocalIntake.channel_for = channel
    settings = ConsumerSettings(queue=QUEUE, mode=Mode.OPT_IN, skip_testing=True,
                                consumer_tag="test", status_interval=60)
    parking = ParkingStore(f"sqlite:///{tmp_path / 'parked.db'}")
    consumer = Consumer(settings, backend=backend, parking=parking,
                        keystore=Keystore([ORG]), intake_factory=LocalIntake)
    intake = consumer.intake
    assert isinstance(intake, LocalIntake)

    def sealed(action_id: int, **kwargs: Any) -> bytes:
        return dumps(action(action_id, ref=f"k{action_id}".ljust(43, "x"),
                            email=f"k{action_id}@example.org",
                            created="2024-03-01T10:00:00Z", record={"postcode": "B-1040"},
                            encrypt_for=ORG, **kwargs))

    task = asyncio.create_task(consumer.run())
    try:
        await asyncio.wait_for(intake.started.wait(), 10)
        tags = [await intake.deliver(sealed(1)),
                await intake.deliver(sealed(2, testing=True)),
                await intake.deliver(sealed(3, opt_in=False))]
        await eventually(lambda: channel.acked() >= set(tags), within=10, what="the acks")
        assert parking.entries() == []  # decrypted: nothing refused
        assert [key.split(":")[1] for call in backend.calls for key in call] == ["1"]
        assert consumer.stats.labels == {
            "applied": 1, "ignored:testing_skipped": 1, "ignored:filtered_by_mode": 1}
    finally:
        consumer.request_stop("test")
        await asyncio.wait_for(task, 20)
        parking.engine.dispose()
    assert consumer.stats.settled_total == 3


class UnconfirmedIntake(LocalIntake):
    """The broker does not confirm republished messages."""

    async def republish(self, delivery: Any, headers: Any) -> bool:
        return False


async def test_a_local_retry_not_confirmed_goes_back_to_the_queue(tmp_path: Path) -> None:
    backend = GatedBackend()
    backend.script.append(failing(TransientError("once")))
    backend.gate.set()
    async with running(tmp_path, backend, LOCAL_RETRIES, UnconfirmedIntake) as (
        consumer, intake, channel, _parking, _task
    ):
        tag = await intake.deliver(distinct(1))
        await eventually(lambda: any(f.kind == "nack" and f.tag == tag for f in channel.frames),
                         within=10, what="the delivery handed back")
        assert tag not in channel.acked()
        assert consumer.stats.totals()["returned"] == 1


async def test_local_retries_of_a_whole_batch_are_each_republished(tmp_path: Path) -> None:
    backend = GatedBackend()
    backend.script.append(failing(TransientError("once")))
    async with running(tmp_path, backend, LOCAL_RETRIES) as (
        _consumer, intake, channel, _parking, _task
    ):
        bodies = [distinct(1), distinct(2)]
        tags = [await intake.deliver(body) for body in bodies]
        backend.gate.set()
        await eventually(lambda: channel.acked() >= set(tags), within=10, what="the acks")
        assert [len(call) for call in backend.calls] == [2]
        assert sorted(intake.republished) == sorted((b, {ATTEMPTS_HEADER: 1}) for b in bodies)


# ---- the monitor: depths, a missing queue, --exit-when-idle -----------------------------------


async def test_exit_when_idle_stops_once_drained_and_settled(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="proca_sync")
    backend = GatedBackend()
    channel = LocalChannel(backend)
    LocalIntake.channel_for = channel
    settings = ConsumerSettings(queue=QUEUE, exit_when_idle=True, idle_seconds=0.3,
                                consumer_tag="test")
    parking = ParkingStore(f"sqlite:///{tmp_path / 'parked.db'}")
    consumer = Consumer(settings, backend=backend, parking=parking, intake_factory=LocalIntake)
    intake = consumer.intake
    assert isinstance(intake, LocalIntake)
    intake.queues = {QUEUE: 3, fail_queue(4242): 0}
    task = asyncio.create_task(consumer.run())
    try:
        await asyncio.wait_for(intake.started.wait(), 10)
        tag = await intake.deliver(person_action(60))
        await eventually(lambda: consumer.stats.depth == 3, within=10, what="the depth")
        intake.queues[QUEUE] = -1  # the queue vanished: said once, then waited for
        await eventually(lambda: any(getattr(r, "fields", {}).get("event") == "queue_missing"
                                     for r in caplog.records), within=10, what="queue_missing")
        intake.queues[QUEUE] = 0
        # Queues empty, but the delivery is still being applied: longer than idle_seconds
        # plus a monitor interval passes, and the consumer must not call that idle.
        await asyncio.sleep(0.8)  # sleep-ok: the absence of a stop takes time to show
        assert consumer.stop_reason == "" and not task.done()
        intake.queues[fail_queue(4242)] = 2  # retries on their way back: not idle either
        backend.gate.set()
        await eventually(lambda: tag in channel.acked(), within=10, what="the ack")
        await eventually(lambda: consumer.stats.fail_depth == 2, within=10,
                         what="the fail queue depth")
        await asyncio.sleep(0.8)  # sleep-ok: as above
        assert consumer.stop_reason == "" and not task.done()
        intake.queues[fail_queue(4242)] = 0
        stats = await asyncio.wait_for(task, 20)
    finally:
        consumer.request_stop("test")
        if not task.done():
            await asyncio.wait_for(task, 20)
        parking.engine.dispose()
    assert consumer.stop_reason == "idle"
    assert tag in channel.acked()
    assert stats.totals()["in_flight"] == 0
    missing = [r for r in caplog.records if getattr(r, "fields", {}).get("event") == "queue_missing"]
    assert len(missing) == 1


async def test_with_an_idle_callback_a_worker_says_it_is_idle_and_waits_to_be_stopped(
    tmp_path: Path,
) -> None:
    # One of several workers (the supervisor's): drained, it reports idle and goes on until
    # the supervisor stops them all together, instead of stopping on its own.
    backend = GatedBackend()
    LocalIntake.channel_for = LocalChannel(backend)
    # exit_when_idle looks every 0.2 s, whatever the status interval
    settings = ConsumerSettings(queue=QUEUE, exit_when_idle=True, idle_seconds=0.05,
                                consumer_tag="test", status_interval=60)
    parking = ParkingStore(f"sqlite:///{tmp_path / 'parked.db'}")
    said: list[bool] = []
    consumer = Consumer(settings, backend=backend, parking=parking, on_idle=said.append,
                        intake_factory=LocalIntake)
    intake = consumer.intake
    assert isinstance(intake, LocalIntake)
    intake.queues = {QUEUE: 0, fail_queue(4242): 0}
    task = asyncio.create_task(consumer.run())
    try:
        await eventually(lambda: True in said, within=10, what="idle reported")
        assert not task.done() and consumer.stop_reason == ""
    finally:
        consumer.request_stop("supervisor")
        await asyncio.wait_for(task, 20)
        parking.engine.dispose()
    assert said[0] is False  # not idle before idle_seconds of a drained queue
    assert consumer.stop_reason == "supervisor"


async def test_a_queue_missing_at_the_first_look_is_said_at_once(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="proca_sync")
    backend = GatedBackend()
    LocalIntake.channel_for = LocalChannel(backend)
    settings = ConsumerSettings(queue=QUEUE, consumer_tag="test", status_interval=60)
    parking = ParkingStore(f"sqlite:///{tmp_path / 'parked.db'}")
    consumer = Consumer(settings, backend=backend, parking=parking, intake_factory=LocalIntake)
    intake = consumer.intake
    assert isinstance(intake, LocalIntake)
    intake.queues = {QUEUE: -1}  # deleted between the start and the monitor's first look
    task = asyncio.create_task(consumer.run())
    try:
        await eventually(lambda: any(getattr(r, "fields", {}).get("event") == "queue_missing"
                                     for r in caplog.records), within=10, what="queue_missing")
    finally:
        consumer.request_stop("test")
        await asyncio.wait_for(task, 20)
        parking.engine.dispose()


class ProbeRecordingIntake(LocalIntake):
    """Records the names of the queues the monitor looks at."""

    probed: ClassVar[list[str]] = []

    async def probe(self, name: str) -> QueueState | None:
        ProbeRecordingIntake.probed.append(name)
        return await super().probe(name)


async def test_a_queue_outside_an_org_has_no_fail_queue_to_look_at(tmp_path: Path) -> None:
    backend = GatedBackend()
    LocalIntake.channel_for = LocalChannel(backend)
    ProbeRecordingIntake.probed = []
    settings = ConsumerSettings(queue="plain", exit_when_idle=True, idle_seconds=0.05,
                                consumer_tag="test")
    parking = ParkingStore(f"sqlite:///{tmp_path / 'parked.db'}")
    consumer = Consumer(settings, backend=backend, parking=parking,
                        intake_factory=ProbeRecordingIntake)
    intake = consumer.intake
    assert isinstance(intake, LocalIntake)
    intake.queues = {"plain": 0}
    task = asyncio.create_task(consumer.run())
    try:
        await asyncio.wait_for(task, 20)  # drained: stops on its own
    finally:
        consumer.request_stop("test")
        parking.engine.dispose()
    assert consumer.stop_reason == "idle"
    assert set(ProbeRecordingIntake.probed) == {"plain"}


async def test_max_messages_stops_after_that_many_settled(tmp_path: Path) -> None:
    backend = GatedBackend()
    backend.gate.set()
    channel = LocalChannel(backend)
    LocalIntake.channel_for = channel
    settings = ConsumerSettings(queue="plain", max_messages=2, consumer_tag="test")
    parking = ParkingStore(f"sqlite:///{tmp_path / 'parked.db'}")
    consumer = Consumer(settings, backend=backend, parking=parking, intake_factory=LocalIntake)
    intake = consumer.intake
    assert isinstance(intake, LocalIntake)
    task = asyncio.create_task(consumer.run())
    try:
        await asyncio.wait_for(intake.started.wait(), 10)
        await intake.deliver(person_action(70))
        await eventually(lambda: consumer.stats.settled_total == 1, within=10, what="one settled")
        assert not task.done()
        await intake.deliver(b"not json {")
        await asyncio.wait_for(task, 20)
    finally:
        consumer.request_stop("test")
        await asyncio.wait_for(task, 20)
        parking.engine.dispose()
    assert consumer.stop_reason == "max_messages"
    assert channel.acked() == {1, 2}


class OneAtATimeBackend(GatedBackend):
    """A CRM that applies one batch at a time (as the SQL CRM's one writer thread)."""

    max_batches = 1


@contextlib.asynccontextmanager
async def running(
    tmp_path: Path,
    backend: GatedBackend,
    settings: ConsumerSettings,
    intake_factory: type[LocalIntake] = LocalIntake,
    channel: LocalChannel | None = None,
) -> AsyncIterator[tuple[Consumer, LocalIntake, LocalChannel, ParkingStore, asyncio.Task[Any]]]:
    """A consumer of ``settings`` on ``backend``, running on a local intake (on ``channel``,
    a :class:`LocalChannel` by default); stopped after."""
    channel = channel or LocalChannel(backend)
    LocalIntake.channel_for = channel
    parking = ParkingStore(f"sqlite:///{tmp_path / 'parked.db'}")
    consumer = Consumer(settings, backend=backend, parking=parking,
                        intake_factory=intake_factory)  # fmt: skip
    intake = consumer.intake
    assert isinstance(intake, LocalIntake)
    task = asyncio.create_task(consumer.run())
    try:
        await asyncio.wait_for(intake.started.wait(), 10)
        yield consumer, intake, channel, parking, task
    finally:
        backend.gate.set()
        consumer.request_stop("test")
        await asyncio.wait_for(task, 20)
        parking.engine.dispose()


@contextlib.asynccontextmanager
async def four_workers(
    tmp_path: Path, backend: GatedBackend
) -> AsyncIterator[tuple[Consumer, LocalIntake, LocalChannel, asyncio.Task[Any]]]:
    """A running consumer with four workers and batches of up to 50 on ``backend``."""
    settings = ConsumerSettings(queue=QUEUE, concurrency=4, batch_size=50, consumer_tag="test")
    async with running(tmp_path, backend, settings) as (consumer, intake, channel, _, task):
        yield consumer, intake, channel, task


LOCAL_RETRIES = ConsumerSettings(queue="plain", retry_mode=RetryMode.LOCAL, retry_delay=0.01,
                                 max_retries=3, consumer_tag="test", status_interval=60)


def distinct(n: int) -> bytes:
    """An action of the n-th of many distinct supporters."""
    return person_action(n, ref=f"o{n}".ljust(43, "x"), email=f"o{n}@example.org")


@pytest.mark.parametrize("max_batches", [1, None], ids=["one-at-a-time", "no-limit"])
async def test_a_one_at_a_time_backend_gets_its_next_batch_when_it_is_free(
    tmp_path: Path, max_batches: int | None
) -> None:
    # With four workers, a backend that applies one batch at a time used to get four
    # small batches queued behind each other; it now gets one, and the next is formed
    # when it is free, holding everything that arrived meanwhile (one commit for all).
    backend = OneAtATimeBackend() if max_batches == 1 else GatedBackend()
    async with four_workers(tmp_path, backend) as (_, intake, channel, _task):
        first = await intake.deliver(distinct(1))
        await eventually(lambda: len(backend.calls) == 1, within=10, what="the first batch")
        tags = [first] + [await intake.deliver(distinct(n)) for n in range(2, 22)]
        # Event-loop turns, not time: every idle worker runs and none may start a batch
        # (something that must not happen has no state to wait for).
        for _ in range(20):
            await asyncio.sleep(0)  # sleep-ok: yields a turn, no fixed delay
        if max_batches is None:
            # The control: without a limit, idle workers take what arrived at once.
            assert len(backend.calls) > 1
        else:
            assert len(backend.calls) == 1
        backend.gate.set()
        await eventually(lambda: channel.acked() >= set(tags), within=10, what="the acks")
        if max_batches == 1:
            assert [len(call) for call in backend.calls] == [1, 20]


class SlowRejectChannel(LocalChannel):
    """A channel whose reject frames wait for the test (a slow broker)."""

    def __init__(self, backend: GatedBackend) -> None:
        super().__init__(backend)
        self.reject_gate = asyncio.Event()

    async def basic_reject(self, tag: int, requeue: bool = True) -> None:
        await self.reject_gate.wait()
        await super().basic_reject(tag, requeue)


async def test_a_one_at_a_time_backend_is_free_again_once_apply_returned(tmp_path: Path) -> None:
    # The batch slot is released when apply returns, not after the settlement: a slow
    # reject (or parking) of one batch does not hold back the next batch.
    backend = OneAtATimeBackend()
    backend.script.append(failing(TransientError("once")))
    backend.gate.set()
    channel = SlowRejectChannel(backend)
    settings = ConsumerSettings(queue=QUEUE, concurrency=2, consumer_tag="test")
    async with running(tmp_path, backend, settings, channel=channel) as (
        _consumer, intake, _channel, _parking, _task
    ):
        try:
            first = await intake.deliver(distinct(1))
            await eventually(lambda: len(backend.calls) == 1, within=10, what="the first batch")
            second = await intake.deliver(distinct(2))
            await eventually(lambda: second in channel.acked(), within=10,
                             what="the second batch applied while the first's reject waits")
            assert not any(f.kind == "reject" for f in channel.frames)
            channel.reject_gate.set()
            await eventually(lambda: any(f.kind == "reject" and f.tag == first
                                         for f in channel.frames), within=10, what="the reject")
        finally:
            channel.reject_gate.set()  # the stop must not wait on it


async def test_a_stop_wakes_workers_waiting_for_a_one_at_a_time_backend(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # Three of four workers wait for the one batch slot while a batch runs. A stop then:
    # the running batch finishes and settles; the waiting workers must leave, not take
    # the slot and wait for work that never comes (the stop took the whole shutdown
    # timeout once).
    backend = OneAtATimeBackend()
    async with four_workers(tmp_path, backend) as (consumer, intake, channel, task):
        first = await intake.deliver(distinct(1))
        await eventually(lambda: len(backend.calls) == 1, within=10, what="the first batch")
        for n in range(2, 6):  # wakes the idle workers: they queue for the slot
            await intake.deliver(distinct(n))
        for _ in range(20):  # event-loop turns: the woken workers queue for the slot
            await asyncio.sleep(0)  # sleep-ok: yields a turn, no fixed delay
        started = time.monotonic()
        consumer.request_stop("test")
        backend.gate.set()
        await asyncio.wait_for(task, 20)
        assert time.monotonic() - started < 5
    assert first in channel.acked()  # the running batch settled
    assert len(backend.calls) == 1  # nothing new was started after the stop
    assert not [r for r in caplog.records if getattr(r, "fields", {}).get("event") == "shutdown_timeout"]


# ---- a reconnect: stale deliveries are never acked on the new channel ----------------------


async def test_reconnect_drops_stale_deliveries_and_acks_on_the_new_channel(rig: Rig) -> None:
    old = rig.channel
    first = await rig.intake.deliver(person_action(80))
    await eventually(lambda: bool(rig.backend.calls), within=10, what="apply called")
    await rig.intake.deliver(person_action(81))  # same lane: waits behind the first
    await rig.intake.deliver(person_action(82))
    assert len(rig.consumer.lanes) == 3
    rig.intake.reconnect()
    # the two waiting deliveries are gone with their channel (the broker redelivers them)
    assert len(rig.consumer.lanes) == 1
    assert rig.consumer.stats.totals()["returned"] == 2
    assert rig.consumer.stats.totals()["reconnects"] == 1
    assert rig.consumer.stats.connected is True  # the gauge says so at once
    fresh = rig.intake.local
    again = await rig.intake.deliver(person_action(81))
    rig.backend.gate.set()
    await eventually(lambda: again in fresh.acked(), within=10, what="the ack on the new channel")
    await eventually(lambda: rig.consumer.stats.totals()["returned"] == 3, within=10,
                     what="the stale first delivery counted as returned")
    assert old.frames == []  # nothing was acked on the closed channel
    assert first == again == 1 and fresh.acked() == {1}


# ---- serve: signals, /healthz, the status line ------------------------------------------------


async def test_serve_reports_health_shows_status_and_stops_on_sigterm(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="proca_sync")
    backend = GatedBackend()
    backend.gate.set()
    LocalIntake.channel_for = LocalChannel(backend)
    LocalIntake.last = None
    settings = ConsumerSettings(queue=QUEUE, metrics_port=0, consumer_tag="test")
    parking = ParkingStore(f"sqlite:///{tmp_path / 'parked.db'}")
    screen = io.StringIO()
    console = Console(file=screen, force_terminal=True, width=150)
    task = asyncio.create_task(serve(settings, backend=backend, parking=parking,
                                     console=console, intake_factory=LocalIntake))
    try:
        await eventually(lambda: LocalIntake.last is not None and LocalIntake.last.started.is_set(),
                         within=10, what="the intake started")
        intake = LocalIntake.last
        assert intake is not None
        tag = await intake.deliver(person_action(90))
        await eventually(lambda: tag in intake.local.acked(), within=10, what="the ack")
        (metrics,) = [r for r in caplog.records if getattr(r, "fields", {}).get("event") == "metrics"]
        port = metrics.fields["port"]  # type: ignore[attr-defined]

        def healthz() -> dict[str, Any]:
            url = f"http://127.0.0.1:{port}/healthz"
            with urllib.request.urlopen(url, timeout=5) as answer:
                assert answer.status == 200
                return dict(orjson.loads(answer.read()))

        health = await asyncio.to_thread(healthz)
        assert health["breaker"] == "closed"
        await eventually(lambda: "acked 1" in screen.getvalue(), within=10,
                         what="the live status line")
        os.kill(os.getpid(), signal.SIGTERM)
        status, stats = await asyncio.wait_for(task, 20)
    finally:
        if not task.done():
            task.cancel()
        parking.engine.dispose()
    assert status is ExitStatus.OK
    assert stats.settled_total == 1
    events = [getattr(r, "fields", {}).get("event") for r in caplog.records]
    assert "signal" in events and events[-1] == "stopped"
    # with a console, outcomes are not logged one by one, nor batches summed up (the
    # status line shows the counts)
    assert "message" not in events and "batches" not in events
    # the handlers are gone: the loop no longer catches SIGTERM
    assert not asyncio.get_running_loop().remove_signal_handler(signal.SIGTERM)


async def test_the_consumer_names_its_tasks(rig: Rig) -> None:
    # For asyncio's debug output and task dumps: which task is which.
    names = {task.get_name() for task in asyncio.all_tasks()}
    assert {"worker-0", "worker-1", "monitor", "prober"} <= names


class UnclosableIntake(LocalIntake):
    """A broker side that fails to close as well."""

    async def close(self) -> None:
        raise OSError("the connection was already gone")


class MissingCrm(GatedBackend):
    async def open(self) -> None:
        raise ConfigError("no such CRM database")


async def test_a_crm_that_cannot_open_is_the_error_even_when_the_broker_fails_to_close(
    tmp_path: Path,
) -> None:
    backend = MissingCrm()
    LocalIntake.channel_for = LocalChannel(backend)
    settings = ConsumerSettings(queue=QUEUE, consumer_tag="test")
    parking = ParkingStore(f"sqlite:///{tmp_path / 'parked.db'}")
    consumer = Consumer(settings, backend=backend, parking=parking,
                        intake_factory=UnclosableIntake)
    try:
        with pytest.raises(ConfigError, match="no such CRM database"):
            await consumer.run()
    finally:
        parking.engine.dispose()


# ---- shutdown when things go wrong ---------------------------------------------------------


async def test_shutdown_timeout_gives_up_on_a_hanging_crm_without_acking(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="proca_sync")
    backend = GatedBackend()  # its gate never opens: apply hangs
    backend.close_fails = True  # and closing it fails too
    channel = LocalChannel(backend)
    LocalIntake.channel_for = channel
    settings = ConsumerSettings(queue=QUEUE, shutdown_timeout=0.3, consumer_tag="test")
    parking = ParkingStore(f"sqlite:///{tmp_path / 'parked.db'}")
    consumer = Consumer(settings, backend=backend, parking=parking, intake_factory=LocalIntake)
    intake = consumer.intake
    assert isinstance(intake, LocalIntake)
    task = asyncio.create_task(consumer.run())
    try:
        await asyncio.wait_for(intake.started.wait(), 10)
        await intake.deliver(person_action(95))
        await eventually(lambda: bool(backend.calls), within=10, what="apply called")
        consumer.request_stop("test")
        await asyncio.wait_for(task, 10)
    finally:
        parking.engine.dispose()
    assert channel.frames == []  # never acked: the broker gets it back with the channel
    events = [getattr(r, "fields", {}).get("event") for r in caplog.records]
    assert "shutdown_timeout" in events and events[-1] == "stopped"
    assert consumer.stop_reason == "test"


async def test_a_failing_settlement_task_is_logged_once_and_the_run_goes_on(
    rig: Rig, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.ERROR, logger="proca_sync")
    rig.channel.broken = True
    rig.consumer.request_stop("test")
    await rig.intake.deliver(person_action(96))  # arrives while stopping: handed back
    await eventually(lambda: any(getattr(r, "fields", {}).get("event") == "task_error"
                                 for r in caplog.records), within=10, what="task_error")
    errors = [r for r in caplog.records if getattr(r, "fields", {}).get("event") == "task_error"]
    assert len(errors) == 1 and errors[0].fields["error"] == "RuntimeError"  # type: ignore[attr-defined]


def test_lane_hash_names_each_lane_apart_and_stably() -> None:
    names = {lane_hash(f"ref:{n}") for n in range(1000)}
    assert len(names) == 1000  # no collisions among these: a lane is recognisable in logs
    assert lane_hash("ref:a") == lane_hash("ref:a")
    assert len(lane_hash("email:x@example.org")) == 12  # 6 bytes, hex
    assert "x@example.org" not in lane_hash("email:x@example.org")


async def test_a_retry_after_from_the_crm_opens_the_breaker_at_once(tmp_path: Path) -> None:
    """One failed batch normally does not open the breaker (threshold 3); a Retry-After
    does, and the first probe waits at least that long."""
    backend = GatedBackend()
    backend.script.append(failing(TransientError("slow down", retry_after=0.4)))
    backend.gate.set()
    LocalIntake.channel_for = LocalChannel(backend)
    settings = ConsumerSettings(queue=QUEUE, consumer_tag="test", status_interval=60)
    parking = ParkingStore(f"sqlite:///{tmp_path / 'parked.db'}")
    breaker = Breaker(threshold=3, base_delay=0.01, max_delay=0.05)
    consumer = Consumer(settings, backend=backend, parking=parking, breaker=breaker,
                        intake_factory=LocalIntake)
    intake = consumer.intake
    assert isinstance(intake, LocalIntake)
    task = asyncio.create_task(consumer.run())
    try:
        await asyncio.wait_for(intake.started.wait(), 10)
        tag = await intake.deliver(person_action(97))
        await eventually(lambda: breaker.state is BreakerState.OPEN, within=10,
                         what="the breaker to open")
        assert breaker.probe_delay() >= 0.4
        await eventually(lambda: tag in intake.local.acked(), within=10, what="the ack")
    finally:
        consumer.request_stop("test")
        await asyncio.wait_for(task, 20)
        parking.engine.dispose()
