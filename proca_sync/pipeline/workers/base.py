"""What the delivery workers share: one queue in, one handler, the consumer's policy out.

A worker reads one ``wrk.N.*`` queue with the consumer's :class:`Intake` (robust
connection, passive declare, prefetch, batched acks), hands batches of raw bodies to its
:class:`Handler` (e-mail, webhook, SQS) and settles every delivery through the consumer's
outcome policy (:func:`~proca_sync.consumer.policy.decide`) and parking store::

    broker ──► Intake ──► pending FIFO ──► runner task: up to ``batch_size`` bodies
               (waiting ``batch_wait`` s for more) ──► Handler.handle(batch)
               ──► Done(label) → ack | PermanentError → park, then ack
                   | TransientError / other → retry (dead-letter circuit) or park when
                     the retry budget is spent (``retries_exhausted``)

Acks go out only after the handler returned (the e-mail ledger, the webhook or SQS
answered) or the parking store committed. Shutdown (:meth:`WorkerRunner.request_stop`):
cancel the subscription, give back what was not started (nack, requeue), let the running
batch finish, flush acks, close. :func:`serve_worker` adds signals (first graceful,
second exits at once), the ``/metrics`` + ``/healthz`` server and the idle exit.

Log lines carry ids, labels and reason codes only — never message content.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import sys
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from aiormq.abc import DeliveredMessage

from proca_sync.config import ConsumerSettings
from proca_sync.consumer.intake import Delivery, Intake
from proca_sync.consumer.parking import ParkingStore, ParkItem
from proca_sync.consumer.policy import Decision, Outcome, attempts_of, decide
from proca_sync.consumer.runner import ExitStatus
from proca_sync.consumer.status import HealthServer, Stats
from proca_sync.pipeline.topology import fail_queue
from proca_sync.sync.model import body_digest

__all__ = ["Done", "Handler", "Result", "WorkerRunner", "serve_worker"]

log = logging.getLogger("proca_sync.worker")


@dataclass(frozen=True, slots=True)
class Done:
    """A delivery that needs nothing more: acked and counted under ``label``
    (``sent``, ``duplicate``, ``ambiguous``, ``skipped:<why>``…)."""

    label: str
    action_id: int | None = None


Result = Done | BaseException
"""One handler result per body: :class:`Done`, or the error the policy classifies."""


class Handler(Protocol):
    """One kind of delivery (e-mail, webhook, SQS)."""

    name: str
    batch_size: int
    """Bodies handed over at once (SQS: 10)."""
    batch_wait: float
    """Seconds to wait for a batch to fill once its first body is there."""

    async def open(self) -> None:
        """Connect and check the configuration; raises ConfigError."""

    async def close(self) -> None: ...

    async def handle(self, bodies: Sequence[bytes]) -> Sequence[Result]:
        """One result per body, in order. Never raises for a single body's problem."""
        ...


class WorkerRunner:
    """Runs one :class:`Handler` on ``settings.queue`` until asked to stop."""

    def __init__(
        self,
        settings: ConsumerSettings,
        handler: Handler,
        *,
        parking: ParkingStore,
        stats: Stats | None = None,
    ) -> None:
        self.settings = settings
        self.handler = handler
        self.parking = parking
        self.stats = stats or Stats()
        self.intake = Intake(settings, self._on_message)
        org = settings.proca_org
        self._fail_queue = fail_queue(org) if org is not None else None
        self._pending: deque[Delivery] = deque()
        self._work = asyncio.Event()
        self._stop = asyncio.Event()
        self._stopping = False
        self._tasks: set[asyncio.Task[None]] = set()
        self._flush_lock = asyncio.Lock()
        self.stop_reason = ""

    # ---- public -------------------------------------------------------------------------

    def request_stop(self, reason: str = "requested") -> None:
        """Begin a graceful shutdown (idempotent; safe from a signal handler)."""
        if self._stop.is_set():
            return
        self.stop_reason = reason
        self._stopping = True
        self._stop.set()
        self._work.set()

    async def run(self) -> Stats:
        """Consume until :meth:`request_stop`. Raises ConfigError / IntakeError before
        consuming anything when the handler or the queue cannot be used."""
        await self.parking.open()
        try:
            await self.handler.open()
            await self.intake.open()
        except BaseException:
            await self._close_stores()
            raise
        self.intake.on_reconnect = self._on_reconnect
        self.stats.set_connected(True)
        log.info(
            "worker %s consuming %s (concurrency %d, batch %d, max retries %d)",
            self.handler.name, self.settings.queue, self.settings.concurrency,
            self.handler.batch_size, self.settings.max_retries,
            extra={"fields": {"event": "started", "worker": self.handler.name,
                              "queue": self.settings.queue,
                              "concurrency": self.settings.concurrency}},
        )
        workers = [
            asyncio.create_task(self._worker(), name=f"worker-{i}")
            for i in range(self.settings.concurrency)
        ]
        monitor = asyncio.create_task(self._monitor(), name="monitor")
        try:
            await self.intake.start()
            await self._stop.wait()
        finally:
            await self._shutdown(workers, monitor)
        return self.stats

    # ---- intake -------------------------------------------------------------------------

    async def _on_message(self, message: DeliveredMessage) -> None:
        # No await: deliveries keep their order (see consumer/runner.py).
        attempts = attempts_of(message.header.properties.headers, self.settings.queue)
        delivery = self.intake.delivery(message, attempts, time.monotonic())
        self.stats.delivered()
        if self._stopping:
            self._spawn(self._give_back([delivery]))
            return
        self._pending.append(delivery)
        self._work.set()

    def _on_reconnect(self) -> None:
        self.stats.reconnected()
        self.stats.set_connected(True)
        live = [d for d in self._pending if not d.stale]
        gone = len(self._pending) - len(live)
        self._pending = deque(live)
        if gone:
            self.stats.returned(gone)

    async def _give_back(self, deliveries: Sequence[Delivery]) -> None:
        for delivery in deliveries:
            await self.intake.requeue(delivery)
        if deliveries:
            self.stats.returned(len(deliveries))

    # ---- work ---------------------------------------------------------------------------

    async def _take(self) -> list[Delivery]:
        """The next batch: waits for a first delivery, then up to ``batch_wait`` for more."""
        while not self._pending:
            if self._stopping:
                return []
            self._work.clear()
            await self._work.wait()
        size = max(1, self.handler.batch_size)
        if len(self._pending) < size and self.handler.batch_wait > 0:
            deadline = time.monotonic() + self.handler.batch_wait
            while len(self._pending) < size and not self._stopping:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self._work.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._work.wait(), timeout=left)
        batch: list[Delivery] = []
        while self._pending and len(batch) < size:
            delivery = self._pending.popleft()
            if delivery.stale:
                self.stats.returned()
            else:
                batch.append(delivery)
        return batch

    async def _worker(self) -> None:
        while not self._stopping:
            batch = await self._take()
            if not batch:
                continue
            started = time.monotonic()
            self.stats.batch_started()
            try:
                results = list(await self.handler.handle([d.body for d in batch]))
                if len(results) != len(batch):
                    raise RuntimeError(f"{len(results)} results for {len(batch)} bodies")
            except Exception as exc:  # a bug of the handler: every body gets the error
                log.error("worker batch failed (%s)", type(exc).__name__,
                          exc_info=log.isEnabledFor(logging.DEBUG),
                          extra={"fields": {"event": "batch_error",
                                            "error": type(exc).__name__}})
                results = [exc] * len(batch)
            finally:
                self.stats.batch_finished(time.monotonic() - started)
            await self._settle(list(zip(batch, results, strict=True)))

    def _decision(self, delivery: Delivery, result: Result) -> Decision:
        if isinstance(result, Done):
            return Decision(Outcome.ACK, result.label)
        return decide(result, attempts=delivery.attempts, max_retries=self.settings.max_retries)

    async def _settle(self, pairs: Sequence[tuple[Delivery, Result]]) -> None:
        """Park (committed) before ack; reject retries into the dead-letter circuit."""
        decided = [(d, self._decision(d, r), r) for d, r in pairs]
        parks = [(d, dec) for d, dec, _ in decided if dec.outcome is Outcome.PARK and not d.stale]
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
        for delivery, decision, result in decided:
            if delivery.stale:
                self.stats.returned()
                continue
            if decision.outcome is Outcome.PARK and not parked_ok:
                decision = Decision(Outcome.RETRY, "parking_failed", detail=decision.detail)
            if decision.outcome is Outcome.RETRY:
                if not await self.intake.reject(delivery):
                    self.stats.returned()
                    continue
            else:
                self.intake.ack(delivery)
            self.stats.settled(decision.outcome, decision.label)
            self._log(delivery, decision, result)
            limit = self.settings.max_messages
            if limit is not None and self.stats.settled_total >= limit:
                self.request_stop("max_messages")
        async with self._flush_lock:  # one sender of ack frames at a time
            await self.intake.flush()

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

    def _log(self, delivery: Delivery, decision: Decision, result: Result) -> None:
        fields: dict[str, Any] = {
            "event": "message",
            "worker": self.handler.name,
            "outcome": decision.outcome.value,
            "label": decision.label,
            "attempts": delivery.attempts,
            "digest": body_digest(delivery.body),
            "ms": round((time.monotonic() - delivery.received) * 1000, 1),
        }
        if isinstance(result, Done) and result.action_id is not None:
            fields["action_id"] = result.action_id
        if decision.reason is not None:
            fields["reason"] = decision.reason.value
        if decision.outcome is not Outcome.ACK and decision.detail:
            fields["error"] = decision.detail
        level = logging.WARNING if decision.outcome is Outcome.PARK else logging.INFO
        log.log(level, "%s %s", decision.outcome.value, decision.label, extra={"fields": fields})

    def _spawn(self, coro: Any) -> None:
        task: asyncio.Task[None] = asyncio.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # ---- monitoring ---------------------------------------------------------------------

    async def _monitor(self) -> None:
        interval = 0.2 if self.settings.exit_when_idle else self.settings.status_interval
        idle_since: float | None = None
        while not self._stopping:
            state = await self.intake.probe(self.settings.queue)
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
                )
                now = time.monotonic()
                if not drained:
                    idle_since = None
                elif idle_since is None:
                    idle_since = now
                elif now - idle_since >= self.settings.idle_seconds:
                    self.request_stop("idle")
                    return
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stop.wait(), timeout=interval)

    # ---- shutdown -----------------------------------------------------------------------

    async def _close_stores(self) -> None:
        with contextlib.suppress(Exception):
            await self.handler.close()
        with contextlib.suppress(Exception):
            await self.parking.close()

    async def _shutdown(
        self, workers: list[asyncio.Task[None]], monitor: asyncio.Task[None]
    ) -> None:
        self.request_stop(self.stop_reason or "requested")
        await self.intake.stop()
        pending, self._pending = list(self._pending), deque()
        await self._give_back(pending)
        running = [*workers, *self._tasks]
        if running:
            _, unfinished = await asyncio.wait(running, timeout=self.settings.shutdown_timeout)
            if unfinished:
                log.warning("shutdown timeout: %d task(s) unfinished; their messages return "
                            "to the queue", len(unfinished),
                            extra={"fields": {"event": "shutdown_timeout"}})
                for task in unfinished:
                    task.cancel()
                await asyncio.gather(*unfinished, return_exceptions=True)
        leftover, self._pending = list(self._pending), deque()
        await self._give_back(leftover)
        monitor.cancel()
        await asyncio.gather(monitor, return_exceptions=True)
        async with self._flush_lock:
            await self.intake.flush()
        await self.intake.close()
        self.stats.set_connected(False)
        await self._close_stores()
        log.info("stopped (%s)", self.stop_reason,
                 extra={"fields": {"event": "stopped", "reason": self.stop_reason,
                                   **self.stats.totals()}})


async def serve_worker(
    settings: ConsumerSettings, handler: Handler, *, parking: ParkingStore
) -> tuple[ExitStatus, Stats]:
    """Run a :class:`WorkerRunner` as a service: signals, ``/metrics`` and ``/healthz``.

    SIGTERM/SIGINT stop it gracefully (exit 0); a second signal exits at once (130).
    """
    runner = WorkerRunner(settings, handler, parking=parking)
    loop = asyncio.get_running_loop()
    signals = 0

    def on_signal(name: str) -> None:
        nonlocal signals
        signals += 1
        if signals == 1:
            log.warning("%s: stopping (the running batch finishes; again to exit at once)",
                        name, extra={"fields": {"event": "signal", "signal": name}})
            runner.request_stop(name)
            return
        log.warning("%s again: exiting now; unacked messages return to the queue", name,
                    extra={"fields": {"event": "forced_exit", "signal": name}})
        for handler_ in logging.getLogger("proca_sync").handlers:
            handler_.flush()
        sys.stderr.flush()
        os._exit(int(ExitStatus.FORCED))

    installed = []
    for sig in (signal.SIGTERM, signal.SIGINT):
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(sig, on_signal, sig.name)
            installed.append(sig)
    health: HealthServer | None = None
    try:
        if settings.metrics_port is not None:
            health = HealthServer(runner.stats, port=settings.metrics_port,
                                  host=settings.metrics_host)
            port = await health.start()
            log.info("metrics on http://%s:%d/metrics and /healthz", settings.metrics_host, port,
                     extra={"fields": {"event": "metrics", "port": port}})
        await runner.run()
    finally:
        if health is not None:
            await health.close()
        for sig in installed:
            loop.remove_signal_handler(sig)
    return ExitStatus.OK, runner.stats
