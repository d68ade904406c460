"""The queue consumer: deliveries in, CRM batches out, every message settled by the policy.

Flow of one delivery (consumer.md §7)::

    broker ──► Intake ──► Engine.prepare (pure) ──┬─ Ignored ─────────────► ack
                                                  ├─ PermanentError ──────► park, then ack
                                                  └─ SyncRecord ──► its lane's FIFO
    workers: heads of ready lanes ──► Engine.apply(batch) (one commit) ──► policy.decide
             ──► ack | retry (reject → dead-letter circuit, or local delayed requeue)
                 | park then ack | hold (breaker open: stays unacked at its lane's head)

At most ``concurrency`` batches run at once; a lane (one contact) is never in two
batches, and its messages are applied in delivery order. Acks are sent only after the
CRM (or the parking store) has committed. When the CRM keeps failing, the circuit
breaker stops the workers and a prober pings the CRM with growing delays; held messages
keep their retry budget. When the ping answers, one message is tried (half-open); its
success closes the breaker. Every exception raised while handling a message is classified
by :mod:`proca_sync.consumer.policy`; none ends the process.

Shutdown (:meth:`Consumer.request_stop`): cancel the subscription, hand the deliveries
not yet started back to the queue (nack, requeue), let running batches finish and settle
(bounded by ``shutdown_timeout``), flush acks, close. :func:`serve` adds signals (the
first stops gracefully, the second exits at once), the status display and ``/healthz``.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import os
import signal
import sys
import time
from collections.abc import Callable, Coroutine, Sequence
from enum import IntEnum
from typing import Any

from aiormq.abc import DeliveredMessage
from rich.console import Console
from rich.live import Live

from proca_sync.aio import loop_kind
from proca_sync.config import ConsumerSettings, RetryMode
from proca_sync.consumer.breaker import Breaker, BreakerState
from proca_sync.consumer.intake import Delivery, Intake
from proca_sync.consumer.lanes import Lanes
from proca_sync.consumer.parking import ParkingStore, ParkItem
from proca_sync.consumer.policy import ATTEMPTS_HEADER, Decision, Outcome, attempts_of, decide
from proca_sync.consumer.status import HealthServer, Stats
from proca_sync.crm.base import ApplyResult, Backend
from proca_sync.crypto import Keystore
from proca_sync.engine import Engine
from proca_sync.errors import TransientError
from proca_sync.pipeline.topology import fail_queue
from proca_sync.sync.model import Options, body_digest
from proca_sync.sync.records import Ignored, SyncRecord

__all__ = ["Consumer", "ExitStatus", "serve"]

log = logging.getLogger("proca_sync.consumer")

PING_TIMEOUT = 30.0
ACK_HOLD = 0.05
"""Seconds an ack may wait for the gap before it to close (then it is sent alone)."""
SUMMARY_EVERY = 1.0
"""Seconds between the INFO lines that sum up the batches settled (one line per batch at
a few thousand messages a second was a twentieth of the consumer's CPU)."""


class BatchTally:
    """What the batches settled since the last summary line did (counts only)."""

    __slots__ = ("acked", "batches", "by_label", "held", "messages", "ms_max", "parked",
                 "retried", "since")

    def __init__(self, now: float) -> None:
        self.since = now
        self.batches = self.messages = self.acked = self.retried = self.parked = 0
        self.held = 0
        self.ms_max = 0.0
        self.by_label: dict[str, int] = {}

    def add(self, counts: dict[tuple[Outcome, str], int], size: int, seconds: float) -> None:
        """A batch of ``size`` deliveries, ``counts`` of them settled per outcome and label
        (what :meth:`Consumer._settle` carried out); the rest were held."""
        self.batches += 1
        self.messages += size
        self.held += size - sum(counts.values())
        self.ms_max = max(self.ms_max, seconds * 1000)
        labels = self.by_label
        for (outcome, label), count in counts.items():
            labels[label] = labels.get(label, 0) + count
            if outcome is Outcome.ACK:
                self.acked += count
            elif outcome is Outcome.RETRY:
                self.retried += count
            else:
                self.parked += count

    def fields(self, now: float) -> dict[str, Any]:
        # The figures go in the fields only: a number in the text of a log line may look
        # like someone's postcode to whoever greps the logs for one.
        return {"event": "batches", "batches": self.batches, "messages": self.messages,
                "acked": self.acked, "retried": self.retried, "parked": self.parked,
                "held": self.held, "by_label": self.by_label,
                "ms_max": round(self.ms_max, 1), "seconds": round(now - self.since, 2)}


class ExitStatus(IntEnum):
    """Exit codes of ``proca-sync run``."""

    OK = 0
    """Requested shutdown (signal), drained queue (``--exit-when-idle``), ``--max-messages``."""
    FAILED = 1
    """Abnormal end: the broker unreachable at start, an internal error."""
    CONFIG = 2
    """Configuration: bad option, missing queue, access refused, unreadable key store."""
    FORCED = 130
    """A second signal: exited at once; unacked messages went back to the queue."""


def lane_hash(lane: str) -> str:
    """A short, stable, non-reversible name of a lane for logs (lanes hold e-mails)."""
    return hashlib.blake2b(lane.encode(), digest_size=6).hexdigest()


def batch_slots(backend: Backend, concurrency: int) -> int:
    """Batches applied at once: ``concurrency``, or fewer when the backend says it can
    apply no more at a time (``max_batches``, optional: the SQL CRM's is 1)."""
    limit = getattr(backend, "max_batches", None)
    if isinstance(limit, int) and limit >= 1:
        return min(concurrency, limit)
    return concurrency


class _Slot:
    """One of the backend's batch slots, held by a worker; released once."""

    __slots__ = ("_held", "_semaphore")

    def __init__(self, semaphore: asyncio.Semaphore) -> None:
        self._semaphore = semaphore
        self._held = True

    def release(self) -> None:
        if self._held:
            self._held = False
            self._semaphore.release()


IntakeFactory = Callable[
    [ConsumerSettings, Callable[[DeliveredMessage], Coroutine[Any, Any, None]]], Intake
]
"""Builds the broker side from the settings and the delivery callback (tests pass an
in-process stand-in)."""


class Consumer:
    """Consumes ``settings.queue`` into ``backend`` until asked to stop."""

    def __init__(
        self,
        settings: ConsumerSettings,
        *,
        backend: Backend,
        parking: ParkingStore,
        keystore: Keystore | None = None,
        options: Options | None = None,
        stats: Stats | None = None,
        breaker: Breaker | None = None,
        log_each: bool = True,
        on_idle: Callable[[bool], None] | None = None,
        intake_factory: IntakeFactory = Intake,
    ) -> None:
        self.settings = settings
        self.engine = Engine(
            backend=backend,
            keystore=keystore,
            options=options or Options(mode=settings.mode, skip_testing=settings.skip_testing),
        )
        self.parking = parking
        self.stats = stats or Stats()
        self.breaker = breaker or Breaker()
        self.retry_mode = settings.effective_retry_mode
        self.log_each = log_each
        self.on_idle = on_idle
        self.intake = intake_factory(settings, self._on_message)
        self.lanes: Lanes[Delivery] = Lanes()
        org = settings.proca_org
        self._fail_queue = fail_queue(org) if org is not None else None
        self._work = asyncio.Event()
        self._breaker_event = asyncio.Event()
        self._breaker_opened = asyncio.Event()
        self._stop = asyncio.Event()
        self._stopping = False
        self._tasks: set[asyncio.Task[object]] = set()
        self._flush_task: asyncio.Task[None] | None = None
        self._flush_wanted = False
        self._late_flush: asyncio.TimerHandle | None = None
        self._flush_singles = False
        self._stopped = False
        self._probe_batch = False
        self._tally = BatchTally(time.monotonic())
        self._slots = asyncio.Semaphore(batch_slots(backend, settings.concurrency))
        self.stop_reason = ""

    # ---- public ---------------------------------------------------------------------------

    def request_stop(self, reason: str = "requested") -> None:
        """Begin a graceful shutdown (idempotent; safe from a signal handler)."""
        if self._stop.is_set():
            return
        self.stop_reason = reason
        self._stopping = True  # workers take no new batch, new deliveries go back
        if self._flush_task is not None:  # running: held acks go out now, not 50 ms later
            self._flush_held()
        self._stop.set()
        self._work.set()
        self._breaker_event.set()
        self._breaker_opened.set()

    async def run(self) -> Stats:
        """Consume until :meth:`request_stop`; returns the totals.

        Raises :class:`~proca_sync.consumer.intake.IntakeError` (queue missing, access
        refused) or :class:`~proca_sync.errors.ConfigError` before consuming anything.
        """
        # The broker first: a wrong URL, queue or password creates no file.
        await self.intake.open()
        try:
            try:
                await self.engine.backend.open()  # a CRM that does not exist: ConfigError
            except TransientError as exc:
                # Not fatal: the first batches fail and the breaker waits for the CRM.
                log.warning("CRM not available at start: %s", exc,
                            extra={"fields": {"event": "crm_unavailable", "error": str(exc)}})
            await self.parking.open()
        except BaseException:
            await self._close_stores()
            with contextlib.suppress(Exception):
                await self.intake.close()
            raise
        self.intake.on_reconnect = self._on_reconnect
        self.stats.set_connected(True)
        log.info(
            "consuming %s on %s (concurrency %d, prefetch %d, retry %s, max retries %d)",
            self.settings.queue, self.settings.redacted_url(), self.settings.concurrency,
            self.settings.effective_prefetch, self.retry_mode.value, self.settings.max_retries,
            extra={"fields": {
                "event": "started", "queue": self.settings.queue,
                "concurrency": self.settings.concurrency,
                "prefetch": self.settings.effective_prefetch,
                "retry_mode": self.retry_mode.value, "max_retries": self.settings.max_retries,
                "loop": loop_kind(asyncio.get_running_loop()),
            }},
        )
        workers = [
            asyncio.create_task(self._worker(), name=f"worker-{i}")
            for i in range(self.settings.concurrency)
        ]
        helpers = [
            asyncio.create_task(self._monitor(), name="monitor"),
            asyncio.create_task(self._prober(), name="prober"),
        ]
        try:
            await self.intake.start()
            await self._stop.wait()
        finally:
            await self._shutdown(workers, helpers)
        return self.stats

    # ---- intake ---------------------------------------------------------------------------

    async def _on_message(self, message: DeliveredMessage) -> None:
        # No await at all: deliveries are queued in delivery order, and aiormq runs this
        # callback as a task of the channel that it cancels when the channel closes. Work
        # that must survive that (parking, then the ack or the count of a stale delivery)
        # runs in a task of ours, which shutdown waits for.
        attempts = attempts_of(message.header.properties.headers, self.settings.queue)
        delivery = self.intake.delivery(message, attempts, time.monotonic())
        self.stats.delivered()
        if self._stopping:
            self._spawn(self._give_back([delivery]))
            return
        result: Ignored | BaseException
        try:
            prepared = self.engine.prepare(message.body)
        except Exception as exc:  # PermanentError by contract; anything else is a bug
            result = exc
        else:
            if isinstance(prepared, SyncRecord):
                delivery.record = prepared
                self.lanes.push(prepared.lane, delivery)
                self._work.set()
                return
            result = prepared
        decision = decide(
            result, attempts=attempts, max_retries=self.settings.max_retries
        )
        self._spawn(self._settle([(delivery, decision)]))

    def _on_reconnect(self) -> None:
        self.stats.reconnected()
        self.stats.set_connected(True)
        stale = self.lanes.discard(lambda d: d.stale)
        if stale:
            self.stats.returned(len(stale))

    async def _give_back(self, deliveries: Sequence[Delivery]) -> None:
        for delivery in deliveries:
            await self.intake.requeue(delivery)
        if deliveries:
            self.stats.returned(len(deliveries))

    # ---- workers --------------------------------------------------------------------------

    async def _worker(self) -> None:
        while not self._stopping:
            probe = await self._gate()
            if self._stopping:
                break
            # A backend that applies one batch at a time (the SQL CRM's one writer thread)
            # gets its next batch when it is free: taken then, the batch holds everything
            # that arrived meanwhile (one commit), instead of workers each taking a few
            # messages early and queueing their small batches behind the writer.
            await self._slots.acquire()
            slot = _Slot(self._slots)
            try:
                if self._stopping:  # stopped while waiting for the slot: take nothing
                    break
                # A half-open probe is one message: if it fails although the CRM answered
                # the ping, it may be that message's own problem, so it spends a retry.
                taken = self.lanes.take(1 if probe else self.settings.batch_size)
                live: list[tuple[str, Delivery]] = []
                for lane, delivery in taken:
                    if delivery.stale:  # its channel is gone: the broker redelivers it
                        self.lanes.finish(lane)
                        self.stats.returned()
                    else:
                        live.append((lane, delivery))
                if not live:
                    slot.release()
                    if probe:
                        self._probe_batch = False
                    if not taken:
                        self._work.clear()
                        await self._work.wait()
                    continue
                await self._run_batch(live, probe=probe, slot=slot)
            finally:
                slot.release()

    async def _gate(self) -> bool:
        """Wait until the breaker lets a batch through; ``True`` for the half-open probe."""
        while not self._stopping:
            state = self.breaker.state
            if state is BreakerState.CLOSED:
                return False
            if state is BreakerState.HALF_OPEN and not self._probe_batch:
                self._probe_batch = True
                return True
            self._breaker_event.clear()
            await self._breaker_event.wait()
        return False

    async def _run_batch(
        self, taken: list[tuple[str, Delivery]], *, probe: bool, slot: _Slot | None = None
    ) -> None:
        records = [d.record for _, d in taken if d.record is not None]
        before = self.breaker.state
        started = time.monotonic()
        self.stats.batch_started()
        results: list[ApplyResult | BaseException]
        try:
            applied = await self.engine.apply(records)
            if len(applied) != len(records):
                raise RuntimeError(f"backend gave {len(applied)} results for {len(records)}")
            results = list(applied)
            self.breaker.record_success()
        except TransientError as exc:
            self.breaker.record_failure(exc.retry_after)
            results = [exc] * len(records)
        except Exception as exc:
            # Not a CRM availability problem: isolate the culprit by applying one by one.
            log.error("batch failed unexpectedly (%s); applying singly", type(exc).__name__,
                      exc_info=log.isEnabledFor(logging.DEBUG),
                      extra={"fields": {"event": "batch_error", "error": type(exc).__name__}})
            results = [await self._apply_single(r) for r in records] if len(records) > 1 else [exc]
        finally:
            if slot is not None:  # the backend is free: the next batch may start
                slot.release()
            if probe:
                self._probe_batch = False
            self.stats.batch_finished(time.monotonic() - started)
        self._breaker_changed(before)

        to_settle: list[tuple[Delivery, Decision]] = []
        done: list[str] = []
        for (lane, delivery), result in zip(taken, results, strict=True):
            decision = decide(
                result,
                attempts=delivery.attempts,
                max_retries=self.settings.max_retries,
                breaker_closed=self.breaker.closed or probe,
            )
            if decision.outcome is Outcome.HOLD:
                self.lanes.release(lane)
            else:
                to_settle.append((delivery, decision))
                done.append(lane)
        counts = await self._settle(to_settle)
        for lane in done:
            self.lanes.finish(lane)
        self._work.set()
        if self.log_each:
            self._log_batch(counts, len(taken), time.monotonic() - started)

    def _log_batch(
        self, counts: dict[tuple[Outcome, str], int], size: int, seconds: float
    ) -> None:
        """Count a settled batch into the next summary line (INFO, every SUMMARY_EVERY s)."""
        if not log.isEnabledFor(logging.INFO):
            return
        self._tally.add(counts, size, seconds)
        self._log_summary(force=False)

    def _log_summary(self, *, force: bool) -> None:
        """One INFO line for the batches settled since the last one, when it is due."""
        tally = self._tally
        now = time.monotonic()
        if tally.batches == 0 or (not force and now - tally.since < SUMMARY_EVERY):
            return
        self._tally = BatchTally(now)
        log.info("batches settled", extra={"fields": tally.fields(now)})

    async def _apply_single(self, record: SyncRecord) -> ApplyResult | BaseException:
        try:
            (result,) = await self.engine.apply([record])
        except Exception as exc:
            return exc
        return result

    # ---- settlement -----------------------------------------------------------------------

    async def _settle(
        self, pairs: Sequence[tuple[Delivery, Decision]]
    ) -> dict[tuple[Outcome, str], int]:
        """Carry out decisions: park (committed) before ack; reject or schedule retries.
        Returns how many were settled per outcome and label (local retries and deliveries
        given back are counted when they are settled, elsewhere)."""
        parks = [(d, dec) for d, dec in pairs if dec.outcome is Outcome.PARK and not d.stale]
        parked_ok = True
        if parks:
            try:
                await self.parking.park([self._park_item(d, dec) for d, dec in parks])
            except Exception as exc:
                parked_ok = False
                log.error("parking store failed (%s): messages go back for a retry",
                          type(exc).__name__,
                          extra={"fields": {"event": "parking_failed",
                                            "error": type(exc).__name__}})
        # Counted per outcome and label once for the whole batch (the metrics take a
        # lock per update); what was settled before an error is still counted.
        counts: dict[tuple[Outcome, str], int] = {}
        try:
            for delivery, decision in pairs:
                if delivery.stale:
                    self.stats.returned()
                    continue
                if decision.outcome is Outcome.PARK and not parked_ok:
                    decision = Decision(Outcome.RETRY, "parking_failed", detail=decision.detail)
                if decision.outcome is Outcome.RETRY:
                    if self.retry_mode is RetryMode.LOCAL:
                        self._spawn(self._local_retry(delivery, decision))
                        continue
                    if not await self.intake.reject(delivery):
                        self.stats.returned()
                        continue
                else:
                    self.intake.ack(delivery)
                key = (decision.outcome, decision.label)
                counts[key] = counts.get(key, 0) + 1
                self._log_settled(delivery, decision)
        finally:
            self._counted(counts)
        self._request_flush()
        return counts

    def _park_item(self, delivery: Delivery, decision: Decision) -> ParkItem:
        message = delivery.message
        return ParkItem(
            body=delivery.body,
            queue=self.settings.queue,
            exchange=message.exchange or "",
            routing_key=message.routing_key or "",
            headers=delivery.headers,
            reason=str(decision.reason or decision.label),
            detail=decision.detail,
            attempts=delivery.attempts,
        )

    async def _local_retry(self, delivery: Delivery, decision: Decision) -> None:
        """Wait, republish with attempts + 1 (confirmed), then ack the original."""
        await self._sleep_or_stop(self.settings.retry_delay)
        if delivery.stale:
            self.stats.returned()
            return
        headers = dict(delivery.headers)
        headers[ATTEMPTS_HEADER] = delivery.attempts + 1
        if await self.intake.republish(delivery, headers):
            self.intake.ack(delivery)
            self._count(delivery, decision)
            self._request_flush()
        else:
            log.error("local retry: republish not confirmed; message requeued",
                      extra={"fields": {"event": "republish_failed"}})
            await self._give_back([delivery])

    def _count(self, delivery: Delivery, decision: Decision) -> None:
        self._log_settled(delivery, decision)
        self._counted({(decision.outcome, decision.label): 1})

    def _log_settled(self, delivery: Delivery, decision: Decision) -> None:
        # Parked and retried messages are always logged, one line each; an ack only at
        # DEBUG (at INFO the summary line says what became of the batches' messages).
        if decision.outcome is not Outcome.ACK or (
            self.log_each and log.isEnabledFor(logging.DEBUG)
        ):
            self._log_outcome(delivery, decision)

    def _counted(self, counts: dict[tuple[Outcome, str], int]) -> None:
        for (outcome, label), count in counts.items():
            self.stats.settled(outcome, label, count)
        limit = self.settings.max_messages
        if counts and limit is not None and self.stats.settled_total >= limit:
            self.request_stop("max_messages")

    def _log_outcome(self, delivery: Delivery, decision: Decision) -> None:
        record = delivery.record
        fields: dict[str, Any] = {
            "event": "message",
            "outcome": decision.outcome.value,
            "label": decision.label,
            "attempts": delivery.attempts,
            "redelivered": delivery.redelivered,
            "ms": round((time.monotonic() - delivery.received) * 1000, 1),
        }
        if record is not None:
            fields["key"] = record.key
            fields["lane"] = lane_hash(record.lane)
            if record.action is not None:
                fields["action_id"] = record.action.action_id
        else:
            fields["digest"] = body_digest(delivery.body)
        if decision.reason is not None:
            fields["reason"] = decision.reason.value
        if decision.outcome is not Outcome.ACK and decision.detail:
            fields["error"] = decision.detail
        level = {Outcome.PARK: logging.WARNING, Outcome.RETRY: logging.INFO}.get(
            decision.outcome, logging.DEBUG
        )
        log.log(level, "%s %s", decision.outcome.value, decision.label, extra={"fields": fields})

    def _request_flush(self) -> None:
        """Send pending acks soon, coalescing the settlements of this loop iteration."""
        self._flush_wanted = True
        if self._flush_task is None or self._flush_task.done():
            self._flush_task = asyncio.create_task(self._flush())

    async def _flush(self) -> None:
        # The only sender of acks while running: two flushes interleaving their frames
        # could send a multiple ack over a tag that the other then acks alone.
        while self._flush_wanted:
            self._flush_wanted = False
            await asyncio.sleep(0)
            # Acks behind a gap (a message of another lane still running) usually get
            # covered by the next multiple ack; one frame per message otherwise costs
            # a write each. Those still held after ACK_HOLD go out on their own.
            singles, self._flush_singles = self._flush_singles, False
            await self.intake.flush(singles=singles)
        if self.intake.pending_acks and self._late_flush is None and not self._stopped:
            self._late_flush = asyncio.get_running_loop().call_later(
                ACK_HOLD, self._flush_held
            )

    def _flush_held(self) -> None:
        if self._late_flush is not None:
            self._late_flush.cancel()
            self._late_flush = None
        if not self._stopped:
            self._flush_singles = True
            self._request_flush()

    def _spawn(self, coro: Coroutine[Any, Any, object]) -> None:
        task: asyncio.Task[object] = asyncio.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._task_done)

    def _task_done(self, task: asyncio.Task[object]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and (exc := task.exception()) is not None:
            # A bug, not a message's fault: its delivery stays unacked and returns to the
            # queue when the channel closes; say so once.
            log.error("settlement task failed (%s)", type(exc).__name__,
                      exc_info=log.isEnabledFor(logging.DEBUG),
                      extra={"fields": {"event": "task_error", "error": type(exc).__name__}})

    # ---- breaker --------------------------------------------------------------------------

    def _breaker_changed(self, before: BreakerState) -> None:
        state = self.breaker.state
        if state is before:
            return
        self.stats.set_breaker(state)
        self._breaker_event.set()
        if state is BreakerState.OPEN:
            self._breaker_opened.set()
            log.warning("CRM failing: circuit breaker open, consumption paused",
                        extra={"fields": {"event": "breaker", "state": state.value}})
        elif state is BreakerState.CLOSED:
            self._work.set()
            log.warning("CRM back: circuit breaker closed, consumption resumed",
                        extra={"fields": {"event": "breaker", "state": state.value}})
        else:
            log.info("CRM answers: circuit breaker half-open, trying one batch",
                     extra={"fields": {"event": "breaker", "state": state.value}})

    async def _prober(self) -> None:
        while not self._stopping:
            if self.breaker.state is not BreakerState.OPEN:
                self._breaker_opened.clear()
                await self._breaker_opened.wait()
                continue
            if await self._sleep_or_stop(self.breaker.probe_delay()):
                return
            before = self.breaker.state
            try:
                await asyncio.wait_for(self.engine.backend.ping(), timeout=PING_TIMEOUT)
            except Exception as exc:
                retry_after = exc.retry_after if isinstance(exc, TransientError) else None
                self.breaker.probe_failed(retry_after)
                # One line per failed probe (they are seconds apart): an outage stays
                # visible in the log, not only in /healthz.
                log.warning(
                    "CRM still unavailable (%s); next probe in %.1f s",
                    type(exc).__name__, self.breaker.probe_delay(),
                    extra={"fields": {"event": "probe_failed", "error": type(exc).__name__,
                                      "next_probe_s": round(self.breaker.probe_delay(), 2)}},
                )
            else:
                self.breaker.probe_succeeded()
            self._breaker_changed(before)

    # ---- monitoring -----------------------------------------------------------------------

    async def _monitor(self) -> None:
        interval = 0.2 if self.settings.exit_when_idle else self.settings.status_interval
        idle_since: float | None = None
        missing = False
        while not self._stopping:
            state = await self.intake.probe(self.settings.queue)
            if state is not None and state.exists == missing:
                missing = not state.exists
                if missing:
                    log.error("queue %s no longer exists; waiting for it to come back",
                              self.settings.queue,
                              extra={"fields": {"event": "queue_missing"}})
            fail = await self.intake.probe(self._fail_queue) if self._fail_queue else None
            self.stats.set_connected(self.intake.connected)
            self.stats.set_depth(
                state.messages if state is not None else None,
                fail.messages if fail is not None and fail.exists else None,
            )
            if self.settings.exit_when_idle:
                drained = (
                    state is not None
                    and state.messages == 0
                    and (self._fail_queue is None or (fail is not None and fail.messages == 0))
                    and self.stats.in_flight == 0
                    and len(self.lanes) == 0
                )
                now = time.monotonic()
                if not drained:
                    idle_since = None
                elif idle_since is None:
                    idle_since = now
                idle = idle_since is not None and now - idle_since >= self.settings.idle_seconds
                if self.on_idle is not None:
                    # One of several workers: the queue is drained when all of them say
                    # so at once, and the supervisor stops them together.
                    self.on_idle(idle)
                elif idle:
                    self.request_stop("idle")
                    return
            self._log_summary(force=False)
            if await self._sleep_or_stop(interval):
                return

    async def _sleep_or_stop(self, seconds: float) -> bool:
        """Sleep ``seconds``; ``True`` when a stop was requested meanwhile."""
        try:
            await asyncio.wait_for(self._stop.wait(), timeout=seconds)
        except TimeoutError:
            return False
        return True

    # ---- shutdown -------------------------------------------------------------------------

    async def _close_stores(self) -> None:
        with contextlib.suppress(Exception):
            await self.engine.backend.close()
        with contextlib.suppress(Exception):
            await self.parking.close()

    async def _shutdown(
        self, workers: list[asyncio.Task[None]], helpers: list[asyncio.Task[None]]
    ) -> None:
        self._stopping = True
        self.request_stop(self.stop_reason or "requested")
        await self.intake.stop()
        await self._give_back(self.lanes.drain())
        pending = [*workers, *self._tasks]
        if pending:
            _, unfinished = await asyncio.wait(pending, timeout=self.settings.shutdown_timeout)
            if unfinished:
                log.warning(
                    "shutdown timeout: %d task(s) unfinished; their messages return to the queue",
                    len(unfinished), extra={"fields": {"event": "shutdown_timeout"}},
                )
                for task in unfinished:
                    task.cancel()
                await asyncio.gather(*unfinished, return_exceptions=True)
        # Batches that ended with "hold" put their messages back in the lanes.
        await self._give_back(self.lanes.drain())
        if self._tasks:  # settlements of deliveries that arrived while stopping
            await asyncio.wait(list(self._tasks), timeout=self.settings.shutdown_timeout)
        for task in helpers:
            task.cancel()
        await asyncio.gather(*helpers, return_exceptions=True)
        # The last acks, held ones included, through the one flush task (never beside
        # it: two senders could interleave frames).
        self._stopped = True
        if self._late_flush is not None:
            self._late_flush.cancel()
        self._flush_singles = True
        self._request_flush()
        while self._flush_task is not None and not self._flush_task.done():
            await asyncio.gather(self._flush_task, return_exceptions=True)
        await self.intake.close()
        self.stats.set_connected(False)
        await self._close_stores()
        self._log_summary(force=True)
        log.info("stopped (%s)", self.stop_reason,
                 extra={"fields": {"event": "stopped", "reason": self.stop_reason,
                                   **self.stats.totals()}})


async def serve(
    settings: ConsumerSettings,
    *,
    backend: Backend,
    parking: ParkingStore,
    keystore: Keystore | None = None,
    console: Console | None = None,
    collectors: Sequence[Any] = (),
    intake_factory: IntakeFactory = Intake,
    status_extra: Callable[[], str] | None = None,
) -> tuple[ExitStatus, Stats]:
    """Run a :class:`Consumer` as a service: signals, ``/healthz``, the status line.

    SIGTERM/SIGINT stop it gracefully (exit 0); a second signal exits at once (130).
    With a ``console`` (a terminal) a live status line is shown on it and only notable
    events are logged; without, each batch is one INFO line (one line per message at
    DEBUG); parked and retried messages are always logged one by one. Raises what
    :meth:`Consumer.run` raises before consuming.
    """
    consumer = Consumer(
        settings, backend=backend, parking=parking, keystore=keystore, log_each=console is None,
        intake_factory=intake_factory,
    )
    for collector in collectors:  # more metrics on /metrics (the destinations')
        consumer.stats.registry.register(collector)
    loop = asyncio.get_running_loop()
    signals = 0

    def on_signal(name: str) -> None:
        nonlocal signals
        signals += 1
        if signals == 1:
            log.warning("%s: stopping (in-flight messages finish; again to exit at once)", name,
                        extra={"fields": {"event": "signal", "signal": name}})
            consumer.request_stop(name)
            return
        log.warning("%s again: exiting now; unacked messages return to the queue", name,
                    extra={"fields": {"event": "forced_exit", "signal": name}})
        for handler in logging.getLogger("proca_sync").handlers:
            handler.flush()
        sys.stderr.flush()
        os._exit(int(ExitStatus.FORCED))

    installed = []
    for sig in (signal.SIGTERM, signal.SIGINT):
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(sig, on_signal, sig.name)
            installed.append(sig)
    health: HealthServer | None = None
    display: asyncio.Task[None] | None = None
    try:
        if settings.metrics_port is not None:
            health = HealthServer(
                consumer.stats, port=settings.metrics_port, host=settings.metrics_host
            )
            port = await health.start()
            log.info("metrics on http://%s:%d/metrics and /healthz", settings.metrics_host, port,
                     extra={"fields": {"event": "metrics", "port": port}})
        if console is not None:
            display = asyncio.create_task(_live_status(consumer.stats, console, status_extra))
        await consumer.run()
    finally:
        if display is not None:
            display.cancel()
            await asyncio.gather(display, return_exceptions=True)
        if health is not None:
            await health.close()
        for sig in installed:
            loop.remove_signal_handler(sig)
    return ExitStatus.OK, consumer.stats


async def _live_status(
    stats: Stats, console: Console, extra: Callable[[], str] | None = None
) -> None:
    def line() -> Any:
        text = stats.line()
        if extra is not None:
            text.append("  " + extra())
        return text

    with Live(line(), console=console, refresh_per_second=4, transient=True) as live:
        while True:
            await asyncio.sleep(0.25)
            live.update(line())
