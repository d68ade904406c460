"""The consumer in-process against the real broker, with CRM stand-ins defined here: a
CRM that records the order (and overlap) of what it receives, and CRMs that fail
transiently. They implement the Backend protocol; nothing of proca_sync is patched."""

from __future__ import annotations

import asyncio
import random
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import aio_pika
import pytest

from proca_sync.config import ConsumerSettings
from proca_sync.consumer.parking import ParkingStore
from proca_sync.consumer.policy import ATTEMPTS_HEADER
from proca_sync.consumer.runner import Consumer
from proca_sync.crm.base import ApplyResult
from proca_sync.errors import BackendUnavailableError, Reason
from proca_sync.sync.records import SyncRecord
from tests.integration.conftest import ConsumerOrg, eventually
from tests.support.builders import action, dumps

pytestmark = pytest.mark.rabbitmq


class RecordingCrm:
    """Applies after a random delay; records per lane the order of action ids, and checks
    that no lane is ever in two calls at once."""

    name = "recording"

    def __init__(self, *, seed: int = 0) -> None:
        self.rng = random.Random(seed)
        self.order: dict[str, list[int]] = {}
        self.active: set[str] = set()
        self.overlaps: list[str] = []
        self.calls_in_flight = 0
        self.max_calls_in_flight = 0

    async def open(self) -> None:
        return None

    async def close(self) -> None:
        return None

    async def ping(self) -> None:
        return None

    async def apply(self, records: Sequence[SyncRecord]) -> Sequence[ApplyResult]:
        lanes = [r.lane for r in records]
        assert len(set(lanes)) == len(lanes), "one batch holds two records of a lane"
        self.overlaps += [lane for lane in lanes if lane in self.active]
        self.active.update(lanes)
        self.calls_in_flight += 1
        self.max_calls_in_flight = max(self.max_calls_in_flight, self.calls_in_flight)
        try:
            await asyncio.sleep(self.rng.uniform(0, 0.01))
            for record in records:
                assert record.action is not None
                self.order.setdefault(record.lane, []).append(record.action.action_id)
        finally:
            self.active.difference_update(lanes)
            self.calls_in_flight -= 1
        return ["applied"] * len(records)


class FlakyCrm:
    """Fails transiently for the records ``fails(record)`` selects; records the rest."""

    name = "flaky"

    def __init__(self, fails: Any) -> None:
        self.fails = fails
        self.applied: list[str] = []
        self.failures = 0

    async def open(self) -> None:
        return None

    async def close(self) -> None:
        return None

    async def ping(self) -> None:
        return None

    async def apply(self, records: Sequence[SyncRecord]) -> Sequence[ApplyResult]:
        if any(self.fails(r) for r in records):
            self.failures += 1
            raise BackendUnavailableError("CRM answered 503")
        self.applied += [r.key for r in records]
        return ["applied"] * len(records)


def settings_for(org: ConsumerOrg, tmp_path: Path, **values: Any) -> ConsumerSettings:
    return ConsumerSettings(
        url=org.url, queue=org.queue, parked=f"sqlite:///{tmp_path / 'parked.db'}",
        exit_when_idle=True, **values,
    )


async def consume(settings: ConsumerSettings, backend: Any, *, within: float = 60) -> Consumer:
    consumer = Consumer(settings, backend=backend, parking=ParkingStore(settings.parked))
    await asyncio.wait_for(consumer.run(), timeout=within)
    return consumer


def contact_actions(contacts: int, per_contact: int, seed: int) -> tuple[list[bytes], dict[str, list[int]]]:
    """Each contact's actions in increasing id order, interleaved with the others'."""
    rng = random.Random(seed)
    pending = {
        c: [dumps(action(c * 1000 + k, ref=f"ref{c:04d}".ljust(43, "z"),
                         email=f"p{c}@example.org", created="2024-01-01T00:00:00Z"))
            for k in range(per_contact)]
        for c in range(contacts)
    }
    expected = {f"ref:{f'ref{c:04d}'.ljust(43, 'z')}": [c * 1000 + k for k in range(per_contact)]
                for c in range(contacts)}
    bodies = []
    while pending:
        c = rng.choice(sorted(pending))
        bodies.append(pending[c].pop(0))
        if not pending[c]:
            del pending[c]
    return bodies, expected


async def test_concurrency_16_keeps_each_contact_in_order(
    consumer_org: ConsumerOrg, tmp_path: Path
) -> None:
    bodies, expected = contact_actions(contacts=40, per_contact=12, seed=21)
    await consumer_org.publish(bodies)
    crm = RecordingCrm(seed=22)
    consumer = await consume(
        settings_for(consumer_org, tmp_path, concurrency=16, batch_size=4, prefetch=64), crm
    )
    assert crm.order == expected
    assert crm.overlaps == []
    assert crm.max_calls_in_flight > 1, "the test must really run batches in parallel"
    assert consumer.stats.totals()["acked"] == len(bodies)
    assert await consumer_org.depths() == [0, 0]


async def test_dlx_retries_then_parks_with_the_last_error(
    consumer_org: ConsumerOrg, tmp_path: Path
) -> None:
    """One record always fails transiently: it goes round the real fail/retry circuit
    (x-death counts), then is parked as retries_exhausted; the others are applied."""
    bodies, _ = contact_actions(contacts=5, per_contact=2, seed=23)
    await consumer_org.publish(bodies)
    crm = FlakyCrm(lambda r: r.action is not None and r.action.action_id == 3001)
    settings = settings_for(consumer_org, tmp_path, max_retries=2, batch_size=1)
    consumer = await consume(settings, crm)
    assert len(crm.applied) == len(bodies) - 1
    store = ParkingStore(settings.parked)
    (parked,) = store.entries()
    assert parked.reason == Reason.RETRIES_EXHAUSTED
    assert parked.attempts == 2
    assert "CRM answered 503" in parked.detail and "after 3 attempt(s)" in parked.detail
    deaths = parked.headers["x-death"]
    assert any(d["queue"] == consumer_org.queue and d["reason"] == "rejected"
               and d["count"] == 2 for d in deaths)
    assert consumer.stats.totals()["retried"] == 2
    assert await consumer_org.depths() == [0, 0]


async def test_local_retry_mode_never_loses_a_message_on_a_queue_without_dlx(
    consumer_org: ConsumerOrg, tmp_path: Path
) -> None:
    """A plain queue (no dead-letter exchange): a reject would drop the message, so the
    consumer republishes it (confirmed) with an attempts header before acking."""
    queue = f"proca-sync-test-{consumer_org.org}"
    connection = await aio_pika.connect(consumer_org.url)
    channel = await connection.channel()
    await channel.declare_queue(queue, durable=True)
    try:
        bodies, _ = contact_actions(contacts=4, per_contact=2, seed=24)
        await consumer_org.publish(bodies, queue=queue)
        attempts: dict[int, int] = {}

        def fails(record: SyncRecord) -> bool:
            # Each of these fails twice, then succeeds.
            assert record.action is not None
            action_id = record.action.action_id
            if action_id % 1000 != 0:
                return False
            attempts[action_id] = attempts.get(action_id, 0) + 1
            return attempts[action_id] <= 2

        crm = FlakyCrm(fails)
        settings = ConsumerSettings(
            url=consumer_org.url, queue=queue, parked=f"sqlite:///{tmp_path / 'parked.db'}",
            exit_when_idle=True, retry_delay=0.1, batch_size=1,
        )
        assert settings.effective_retry_mode.value == "local"
        consumer = await consume(settings, crm)
        assert sorted(crm.applied) == sorted(set(crm.applied))
        assert len(crm.applied) == len(bodies)
        assert all(n == 3 for n in attempts.values())
        assert ParkingStore(settings.parked).count() == 0
        # Some failures are retried through the queue, some held by the breaker.
        assert 0 < consumer.stats.totals()["retried"] <= 2 * len(attempts)

        # With a budget of 1, an always-failing message is parked, not dropped.
        poison = dumps(action(777, ref="q" * 43, email="q@example.org",
                              created="2024-01-01T00:00:00Z"))
        await consumer_org.publish([poison], queue=queue)
        crm = FlakyCrm(lambda r: r.action is not None and r.action.action_id == 777)
        settings = settings.model_copy(update={"max_retries": 1})
        await consume(settings, crm)
        (parked,) = ParkingStore(settings.parked).entries()
        assert parked.reason == Reason.RETRIES_EXHAUSTED
        assert parked.headers[ATTEMPTS_HEADER] == 1
        declared = await channel.declare_queue(queue, passive=True)
        assert declared.declaration_result.message_count == 0
    finally:
        await channel.queue_delete(queue, if_unused=False, if_empty=False)
        await connection.close()


@pytest.mark.slow
async def test_breaker_open_holds_without_spending_retries(
    consumer_org: ConsumerOrg, tmp_path: Path
) -> None:
    """The CRM is down (apply and ping fail) until the test says so: the breaker opens,
    messages are held unacked, none is retried past the first failing batches."""
    bodies, _ = contact_actions(contacts=10, per_contact=3, seed=25)
    await consumer_org.publish(bodies)
    state = {"down": True}

    class DownCrm(FlakyCrm):
        async def ping(self) -> None:
            if state["down"]:
                raise BackendUnavailableError("CRM down")

    crm = DownCrm(lambda _r: state["down"])
    settings = settings_for(consumer_org, tmp_path, max_retries=3, concurrency=1, batch_size=5)
    consumer = Consumer(settings, backend=crm, parking=ParkingStore(settings.parked))
    run = asyncio.create_task(consumer.run())
    try:
        await eventually(lambda: consumer.breaker.state.value == "open", within=20,
                         what="the breaker to open")
        await eventually(lambda: consumer.breaker.trips >= 3, within=20,
                         what="three failed probes")
        retried = consumer.stats.totals()["retried"]
        assert retried <= 2 * settings.batch_size  # only the batches before it opened
        assert consumer.stats.in_flight > 0
        state["down"] = False
        await asyncio.wait_for(run, timeout=60)
    finally:
        if not run.done():
            consumer.request_stop()
            await run
    assert sorted(crm.applied) == sorted({r for r in crm.applied})
    assert len(crm.applied) == len(bodies)
    assert ParkingStore(settings.parked).count() == 0


async def test_max_messages_stops_and_returns_the_rest(
    consumer_org: ConsumerOrg, tmp_path: Path
) -> None:
    bodies, _ = contact_actions(contacts=20, per_contact=1, seed=26)
    await consumer_org.publish(bodies)
    crm = FlakyCrm(lambda _r: False)
    settings = ConsumerSettings(
        url=consumer_org.url, queue=consumer_org.queue, max_messages=5, batch_size=1,
        concurrency=1, parked=f"sqlite:///{tmp_path / 'parked.db'}",
    )
    consumer = await consume(settings, crm)
    assert consumer.stop_reason == "max_messages"
    assert len(crm.applied) == consumer.stats.totals()["acked"] == 5
    assert await consumer_org.depths(consumer_org.queue) == [len(bodies) - 5]
