"""The pusher: keeps one destination in sync from the ledger's change log.

One round: take the next window of changes after the destination's cursor, coalesce them
per contact, and build :class:`~proca_sync.destinations.base.Batch`\\ es of the merged
current state of what the destination lacks (:meth:`LedgerState.plan`); push each batch;
record what was written (so a second push sends nothing), park for this destination what
the API refused for good, offer again what failed transiently; then move the cursor past
the window. The cursor only ever passes changes that are done or parked: a crash or a
SIGKILL at any point repeats some work (idempotent by design) and loses nothing.

Retries: a whole-batch :class:`~proca_sync.errors.TransientError` (outage, 5xx and 429
after the client's own retries, refused credentials) waits with exponential backoff and
full jitter, at least the ``retry_after`` the API asked for; after ``threshold`` in a row
the circuit breaker (:mod:`proca_sync.consumer.breaker`) opens and the destination is
probed with ``ping()`` until it answers. Per-item transient failures are offered again
the same way, alone.

Only the holder of the destination's lease pushes; the lease is renewed every third of
its ``ttl`` and taken over by another process once a dead holder's lease has run out.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import random
import secrets
import socket
import time
from collections.abc import Awaitable, Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, TypeVar

from proca_sync.consumer.breaker import Breaker
from proca_sync.crm.sql import SqlBackend
from proca_sync.destinations.base import Batch, Destination, DestinationRejectedError, ItemKey
from proca_sync.destinations.state import LeaseLostError, LedgerState, Plan, Status
from proca_sync.errors import ConfigError, PermanentError, ProcaSyncError, TransientError

__all__ = [
    "DEFAULT_LEASE_TTL",
    "PushResult",
    "Pusher",
    "PusherCollector",
    "PusherStats",
    "alongside",
    "status_line",
]

log = logging.getLogger("proca_sync.destinations")

DEFAULT_LEASE_TTL = 15.0
"""Seconds a lease lasts without renewal: the longest a dead pusher blocks another."""
DEFAULT_WINDOW = 5_000
"""Changes read per round."""
FIRST_WINDOW_SHARE = 10
"""A window read when nothing was read ahead holds this share of ``window`` changes."""
IDLE_POLL = 1.0
"""Seconds between looks at the change log while following without a commit signal."""

T = TypeVar("T")


@dataclass(slots=True)
class PusherStats:
    """Counters of one pusher (for the status line, metrics and summaries)."""

    contacts: int = 0
    actions: int = 0
    erasures: int = 0
    retired: int = 0
    """Addresses retired (a contact merged away, or its address changed)."""
    requests: int = 0
    parked: int = 0
    transient_failures: int = 0
    batches: int = 0
    overlapped: int = 0
    """Batches started while the window before theirs was still in flight."""
    throttled: int = 0
    """429 answers the destination's API gave (its connector's ``throttled``, if any)."""
    last_success: float | None = None
    pending: int = 0
    oldest_pending: float | None = None
    """When the oldest change not yet pushed was committed (``None``: caught up)."""
    breaker: str = "closed"
    holding: bool = False

    @property
    def lag(self) -> float:
        """Seconds the oldest change not yet pushed has waited (0 when caught up)."""
        if self.oldest_pending is None:
            return 0.0
        return max(0.0, time.time() - self.oldest_pending)


@dataclass(frozen=True, slots=True)
class PushResult:
    caught_up: bool
    """No change left after the cursor when the push ended."""
    parked: int
    """Items parked for this destination (all of them, not only this run's)."""
    stats: PusherStats = field(default_factory=PusherStats)


class Pusher:
    """Pushes the ledger's changes to one destination (see the module docstring)."""

    def __init__(
        self,
        backend: SqlBackend,
        destination: Destination,
        *,
        include_testing: bool = False,
        batch_size: int | None = None,
        lease_ttl: float = DEFAULT_LEASE_TTL,
        window: int | None = None,
        breaker: Breaker | None = None,
        max_delay: float = 30.0,
    ) -> None:
        self.backend = backend
        self.destination = destination
        self.name = destination.name
        self.state = LedgerState(backend, destination.name)
        self.include_testing = include_testing
        self.batch_size = max(1, min(destination.max_batch, batch_size or destination.max_batch))
        self.lease_ttl = lease_ttl
        self.breaker = breaker or Breaker(threshold=3, base_delay=0.5, max_delay=max_delay)
        self.max_delay = max_delay
        self.concurrency = max(1, int(getattr(destination, "concurrency", 1)))
        """Batches in flight at once: the connector's ``concurrency`` attribute, if any
        (how many requests its API takes in parallel; its rate limiter still paces them)."""
        self.window = window or max(DEFAULT_WINDOW, 2 * self.concurrency * self.batch_size)
        """Changes read per round: by default enough for ``concurrency`` full batches (a
        contact's change and its action's, two a contact; the batches of one window hold
        distinct contacts, so they may all be in flight at once)."""
        self.owner = f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(4)}"
        self.stats = PusherStats()
        self.progress: Callable[[PusherStats], None] | None = None
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"push-{self.name}")
        # The next window is read on a thread of its own while the current one is pushed
        # (its records and the lease renewals keep the first thread).
        self._reader = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"plan-{self.name}")
        self._ahead: asyncio.Task[Plan | None] | None = None
        self._written: dict[ItemKey, str] = {}
        self._current: Plan | None = None
        # The next window once read, and the tasks pushing its early batches (below).
        self._next: Plan | None = None
        self._early: list[asyncio.Task[bool]] = []
        # The slots bound the requests in flight, not the recording of their outcome: a
        # batch's record in the ledger does not hold back the next batch's request.
        self._slots = asyncio.Semaphore(self.concurrency)  # made anew by run()
        self._queued = 0
        """Batches waiting for a slot."""
        self._wake = asyncio.Event()
        self._stop = asyncio.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._lease_lost = False
        self._deadline: float | None = None

    # ---- plumbing -------------------------------------------------------------------------

    async def _db(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, lambda: fn(*args, **kwargs))

    async def _read(
        self,
        after: int | None,
        assumed: dict[tuple[str, str], str | None] | None = None,
        *,
        limit: int | None = None,
    ) -> Plan | None:
        """The plan of the window after the cursor (or after change ``after``, taking
        the ``assumed`` records as written)."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(
            self._reader,
            lambda: self.state.plan(
                limit=limit or self.window,
                include_testing=self.include_testing,
                erasure=self.destination.supports_erasure,
                after=after,
                assumed=assumed,
            ),
        )

    async def _drop_ahead(self) -> None:
        """Forget the window read ahead and stop its early batches (the current one did
        not complete). What they wrote is recorded; the rest is offered again later."""
        ahead, self._ahead = self._ahead, None
        early, self._early = self._early, []
        self._next = None
        self._written = {}
        for task in [t for t in (ahead, *early) if t is not None]:
            task.cancel()
        for task in [t for t in (ahead, *early) if t is not None]:
            with contextlib.suppress(asyncio.CancelledError, ProcaSyncError):
                await task

    def _on_commit(self) -> None:
        loop = self._loop
        if loop is not None and not loop.is_closed():
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(self._wake.set)

    def wake(self) -> None:
        self._wake.set()

    def request_stop(self) -> None:
        self._stop.set()
        self._wake.set()

    @property
    def stopping(self) -> bool:
        """``True`` once :meth:`request_stop` was called."""
        return self._stop.is_set()

    async def pause(self, seconds: float) -> None:
        """Wait ``seconds``, or less when asked to stop."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._stop.wait(), seconds)

    def _expired(self) -> bool:
        return self._stop.is_set() or (
            self._deadline is not None and time.monotonic() >= self._deadline
        )

    async def _sleep(self, seconds: float, *, wakeable: bool = False) -> None:
        """Wait ``seconds``, less when stopped or at the deadline (or woken)."""
        if self._deadline is not None:
            seconds = min(seconds, max(0.0, self._deadline - time.monotonic()))
        event = self._wake if wakeable else self._stop
        if seconds <= 0:
            return
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(event.wait(), seconds)

    # ---- the loop -------------------------------------------------------------------------

    async def run(self, *, follow: bool = False, within: float | None = None) -> PushResult:
        """Push until caught up (or, with ``follow``, until :meth:`request_stop`), or for
        at most ``within`` seconds. Raises :class:`ConfigError` when the destination's
        configuration is refused; every other failure is retried or parked."""
        self._loop = asyncio.get_running_loop()
        self._slots = asyncio.Semaphore(self.concurrency)
        self._current = None
        self._deadline = None if within is None else time.monotonic() + within
        self.backend.commit_hooks.append(self._on_commit)
        renewer: asyncio.Task[None] | None = None
        try:
            await self._db(self.backend.open_sync)
            await self._db(self.state.register)
            await self.destination.open()
            renewer = asyncio.create_task(self._keep_lease(), name=f"lease-{self.name}")
            while not self._expired():
                if not self.stats.holding and not await self._acquire():
                    await self._sleep(self.lease_ttl / 3, wakeable=False)
                    continue
                self._wake.clear()
                try:
                    done = await self._round()
                except LeaseLostError:
                    log.warning(
                        "destination %s: lease lost to another process", self.name,
                        extra={"fields": {"event": "lease_lost", "destination": self.name}},
                    )
                    self.stats.holding = False
                    continue
                except TransientError as exc:  # the ledger itself (locked, restarting)
                    log.warning("destination %s: ledger unavailable (%s)", self.name, exc)
                    await self._sleep(1.0)
                    continue
                if done:
                    self.stats.pending = 0
                    self._report()
                    if not follow:
                        break
                    await self._sleep(IDLE_POLL, wakeable=True)
            status = await self._db(self.state.status)
        finally:
            with contextlib.suppress(ValueError):
                self.backend.commit_hooks.remove(self._on_commit)
            await self._drop_ahead()
            if renewer is not None:
                renewer.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await renewer
            if self.stats.holding:
                with contextlib.suppress(ProcaSyncError):
                    await self._db(self.state.release, self.owner)
                self.stats.holding = False
            with contextlib.suppress(Exception):
                await self.destination.close()
        self.stats.pending = status.pending
        return PushResult(
            caught_up=status.pending == 0, parked=status.parked, stats=self.stats
        )

    async def status(self) -> Status:
        return await self._db(self.state.status)

    def close(self) -> None:
        self._executor.shutdown(wait=True)
        self._reader.shutdown(wait=True)

    async def _acquire(self) -> bool:
        try:
            held = await self._db(self.state.acquire, self.owner, self.lease_ttl)
        except TransientError:
            return False
        self.stats.holding = held
        self._lease_lost = False
        return held

    async def _keep_lease(self) -> None:
        while True:
            await asyncio.sleep(self.lease_ttl / 3)  # sleep-ok: the renewal period
            if not self.stats.holding:
                continue
            try:
                held = await self._db(self.state.acquire, self.owner, self.lease_ttl)
            except TransientError:
                continue
            if not held:
                self._lease_lost = True
                self.stats.holding = False

    async def _round(self) -> bool:
        """One window; ``True`` when there was nothing left to push.

        Bounded pipelining: while a window's batches are in flight, the next window is
        read and coalesced (one window ahead, on the reader thread), taking as written
        what the current window will record (:meth:`Plan.assumptions`: addresses,
        retirements, campaign projections). Once every batch of the current window has
        a request slot, the next window's batches of contacts the current one does not
        name start (:meth:`_overlap`); the rest of it waits until the current window is
        done, less what that wrote meanwhile (:meth:`Plan.without`), so nothing is sent
        twice. If the current window parked something of a contact the next one names,
        the next one is read again. The same contact is never in flight twice, and the
        cursor only moves past windows whose every item is written or parked."""
        try:
            return await self._window()
        except BaseException:
            await self._drop_ahead()
            raise

    async def _window(self) -> bool:
        previous = self._current
        plan, self._next = self._next, None
        early, self._early = self._early, []
        if plan is None and self._ahead is not None:
            ahead, self._ahead = self._ahead, None
            plan = await ahead
        if (
            plan is not None
            and previous is not None
            and previous.parked
            and plan.touched & previous.touched
        ):
            # The window read ahead assumed the previous one written whole; it parked
            # items of contacts this one names: read it again (once its early batches,
            # of other contacts, are done).
            if not all(await asyncio.gather(*early)):
                return False
            early, plan = [], None
        if plan is None:
            # Nothing was read ahead (or nothing was there then, or it is stale): look
            # now, at a small window, so that the first requests leave early; the
            # windows read ahead meanwhile are full.
            plan = await self._read(None, limit=max(1, self.window // FIRST_WINDOW_SHARE))
        else:
            plan.without(self._written)
        self._written = {}
        self._current = plan
        if plan is None:
            self.stats.oldest_pending = None
            return True
        self.stats.oldest_pending = plan.first_at
        self.stats.pending = plan.pending
        self._report()
        self._ahead = asyncio.create_task(
            self._read(plan.last_seq, plan.assumptions()), name=f"plan-{self.name}"
        )
        # An empty phase when every batch of the window went early: the next window may
        # still start early while they are in flight.
        phases = plan.phases(self.batch_size) or [[]]
        for n, phase in enumerate(phases):
            # Batches of one phase hold distinct contacts: they may be in flight together.
            tasks = [asyncio.create_task(self._push(b, plan)) for b in phase]
            try:
                if n == len(phases) - 1:
                    await self._overlap(plan, [*tasks, *early])
                done = await asyncio.gather(*tasks)
            except BaseException:
                for task in [*tasks, *early]:
                    task.cancel()
                await asyncio.gather(*tasks, *early, return_exceptions=True)
                raise
            if self._lease_lost:
                raise LeaseLostError("lease lost")
            if not all(done):
                await asyncio.gather(*early, return_exceptions=True)
                await self._drop_ahead()
                return False  # stopped or out of time: the cursor stays
        if not all(await asyncio.gather(*early)):
            await self._drop_ahead()
            return False
        await self._db(
            self.state.advance,
            self.owner,
            plan.last_seq,
            forgotten=plan.forgotten,
            projections=plan.projections,
        )
        return False

    async def _overlap(self, plan: Plan, tasks: list[asyncio.Task[bool]]) -> None:
        """While the last batches of ``plan`` are in flight, start the next window's
        batches of contacts ``plan`` does not name, once every batch of ``plan`` has a
        slot and the next window is read: the request slots do not idle at the end of a
        window. The next window's other contacts, its erasures, and all of it when it
        retires addresses, wait for ``plan`` to be done. Its cursor moves only after
        this one's."""
        await asyncio.sleep(0)  # sleep-ok: let the batches queue for their slots first
        pending: set[asyncio.Future[Any]] = set(tasks)
        while True:
            pending = {t for t in pending if not t.done()}
            if not pending:
                return
            ahead = self._ahead
            if ahead is not None and ahead.done() and self._queued == 0:
                self._ahead = None
                following = ahead.result()
                if following is None:
                    return
                self._next = following
                if not following.retirements:
                    batches = following.take(plan.touched, self.batch_size)
                    self._early = [
                        asyncio.create_task(self._push(b, following)) for b in batches
                    ]
                    self.stats.overlapped += len(batches)
                return
            waiting: set[asyncio.Future[Any]] = set(pending)
            if ahead is not None and not ahead.done():
                waiting.add(ahead)
            await asyncio.wait(waiting, return_when=asyncio.FIRST_COMPLETED)

    async def _push(self, batch: Batch, plan: Plan) -> bool:
        """Push one batch until every item is written or parked; ``False`` if stopped."""
        remaining: Batch | None = batch
        while remaining is not None:
            if self._expired() or self._lease_lost:
                return False
            try:
                self._queued += 1
                try:
                    await self._slots.acquire()
                finally:
                    self._queued -= 1
                try:
                    if self._expired() or self._lease_lost:
                        return False
                    report = await self.destination.push(remaining)
                finally:
                    self._slots.release()
            except ConfigError:
                raise
            except TransientError as exc:
                self.stats.transient_failures += 1
                self.stats.throttled = int(getattr(self.destination, "throttled", 0))
                log.warning(
                    "destination %s: push failed (%s), retrying", self.name, type(exc).__name__,
                    extra={"fields": {"event": "push_retry", "destination": self.name}},
                )
                await self._backoff(exc.retry_after)
                continue
            except PermanentError as exc:
                code = getattr(exc, "code", type(exc).__name__)
                failed: dict[ItemKey, ProcaSyncError] = {
                    key: DestinationRejectedError(str(exc), code=code) for key in _keys(remaining)
                }
                await self._settle(remaining, plan, failed)
                return True
            self.stats.requests += report.requests
            self.stats.batches += 1
            self.stats.throttled = int(getattr(self.destination, "throttled", 0))
            retry = await self._settle(remaining, plan, report.failed)
            self.breaker.record_success()
            self.stats.breaker = str(self.breaker.state)
            if retry is None:
                remaining = None
            else:
                remaining, retry_after = retry
                await self._backoff(retry_after)
        self.stats.last_success = time.time()
        return True

    async def _settle(
        self, batch: Batch, plan: Plan, failed: dict[ItemKey, ProcaSyncError]
    ) -> tuple[Batch, float | None] | None:
        """Record what was written and park what was refused; the batch of what failed
        transiently (with the contacts of its actions) and the wait asked, if any."""
        done: dict[ItemKey, tuple[int, str]] = {}
        parked: dict[ItemKey, tuple[int, str, str]] = {}
        again: set[ItemKey] = set()
        retry_after: float | None = None
        for key in _keys(batch):
            error = failed.get(key)
            if error is None:
                done[key] = plan.digests[key]
            elif isinstance(error, PermanentError):
                code = getattr(error, "code", None) or type(error).__name__
                parked[key] = (plan.digests[key][0], str(code), str(error))
            else:
                again.add(key)
                after = getattr(error, "retry_after", None)
                if after is not None:
                    retry_after = max(retry_after or 0.0, after)
        addresses = {
            key[1]: plan.addresses[key[1]]
            for key in done
            if key[0] == "contact" and key[1] in plan.addresses
        }
        await self._db(self.state.record, self.owner, done, parked, addresses)
        for key in [*done, *parked]:
            self._written[key] = plan.digests[key][1]
        if parked:
            plan.parked = True
        self.stats.contacts += sum(1 for k in done if k[0] == "contact")
        self.stats.actions += sum(1 for k in done if k[0] == "action")
        self.stats.erasures += sum(1 for k in done if k[0] == "erasure")
        self.stats.retired += sum(1 for k in done if k[0] == "retired")
        self.stats.parked += len(parked)
        for key, (_version, code, _message) in parked.items():
            log.warning(
                "destination %s: %s %s parked (%s)", self.name, key[0], key[1], code,
                extra={"fields": {"event": "parked", "destination": self.name,
                                  "item": f"{key[0]}:{key[1]}", "code": code}},
            )
        self._report()
        if not again:
            return None
        actions = [a for a in batch.actions if a.key in again]
        owners = {a.contact_id for a in actions}
        contacts = [c for c in batch.contacts if c.key in again or c.contact_id in owners]
        erasures = [e for e in batch.erasures if e.key in again]
        self.stats.transient_failures += 1
        return (
            Batch(contacts=contacts, actions=actions, erasures=erasures, campaigns=batch.campaigns),
            retry_after,
        )

    async def _backoff(self, retry_after: float | None) -> None:
        """Wait before trying again: backoff with jitter, or the breaker's probes."""
        opened = self.breaker.record_failure(retry_after)
        self.stats.breaker = str(self.breaker.state)
        self._report()
        if not opened:
            base = min(self.max_delay, 0.5 * 2.0 ** max(0, self.breaker.failures - 1))
            delay = random.uniform(base / 2, base)
            await self._sleep(max(delay, retry_after or 0.0))
            return
        while not self._expired():
            await self._sleep(self.breaker.probe_delay() * random.uniform(0.75, 1.0))
            if self._expired():
                return
            try:
                await self.destination.ping()
            except ConfigError:
                raise
            except TransientError as exc:
                self.breaker.probe_failed(exc.retry_after)
                continue
            self.breaker.probe_succeeded()
            self.stats.breaker = str(self.breaker.state)
            return

    def _report(self) -> None:
        if self.progress is not None:
            self.progress(self.stats)


def _keys(batch: Batch) -> list[ItemKey]:
    return (
        [c.key for c in batch.contacts]
        + [a.key for a in batch.actions]
        + [e.key for e in batch.erasures]
    )


async def alongside(main: Awaitable[T], pushers: Sequence[Pusher]) -> T:
    """Run ``main`` (the consumer) with every pusher following the change log, woken by
    each commit; stop the pushers when ``main`` ends. A pusher whose configuration is
    refused stops (logged); the consumer goes on acking into the ledger regardless."""

    async def follow(pusher: Pusher) -> None:
        # A pusher that cannot start or fails in a way its loop does not retry (the
        # ledger busy while the consumer writes, a bug) starts again after a backoff:
        # it must not die quietly while the consumer goes on acking.
        delay = 1.0
        while not pusher.stopping:
            try:
                await pusher.run(follow=True)
            except ConfigError as exc:
                log.error(
                    "destination %s: configuration refused (%s); not pushing", pusher.name, exc,
                    extra={"fields": {"event": "destination_config", "destination": pusher.name}},
                )
                return
            except Exception as exc:  # classified below, then retried
                transient = isinstance(exc, TransientError)
                log.log(
                    logging.WARNING if transient else logging.ERROR,
                    "destination %s: pusher stopped (%s), starting again in %.0f s",
                    pusher.name, type(exc).__name__, delay,
                    extra={"fields": {"event": "pusher_restart", "destination": pusher.name,
                                      "error": type(exc).__name__}},
                )
                await pusher.pause(delay)
                delay = min(delay * 2.0, pusher.max_delay)
                continue
            return

    tasks = [asyncio.create_task(follow(p), name=f"push-{p.name}") for p in pushers]
    try:
        return await main
    finally:
        for pusher in pushers:
            pusher.request_stop()
        if tasks:
            await asyncio.wait(tasks, timeout=30)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for pusher in pushers:
            pusher.close()


class PusherCollector:
    """Prometheus metrics of the pushers (register it on the consumer's registry)."""

    def __init__(self, pushers: Sequence[Pusher]) -> None:
        self.pushers = list(pushers)

    def describe(self) -> list[Any]:
        return []

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        items = CounterMetricFamily(
            "proca_sync_destination_items", "Items written to a destination",
            labels=["destination", "kind"],
        )
        requests = CounterMetricFamily(
            "proca_sync_destination_requests", "Requests made to a destination",
            labels=["destination"],
        )
        parked = CounterMetricFamily(
            "proca_sync_destination_parked", "Items parked for a destination this run",
            labels=["destination"],
        )
        failures = CounterMetricFamily(
            "proca_sync_destination_transient_failures", "Transient push failures",
            labels=["destination"],
        )
        pending = GaugeMetricFamily(
            "proca_sync_destination_pending_changes", "Changes after the cursor",
            labels=["destination"],
        )
        breaker = GaugeMetricFamily(
            "proca_sync_destination_breaker_open", "1 while the circuit breaker is not closed",
            labels=["destination"],
        )
        last = GaugeMetricFamily(
            "proca_sync_destination_last_success_seconds", "Unix time of the last success",
            labels=["destination"],
        )
        throttled = CounterMetricFamily(
            "proca_sync_destination_throttled", "429 answers from a destination's API",
            labels=["destination"],
        )
        lag = GaugeMetricFamily(
            "proca_sync_destination_lag_seconds",
            "Seconds the oldest change not yet pushed has waited (0 when caught up)",
            labels=["destination"],
        )
        for pusher in self.pushers:
            name, stats = pusher.name, pusher.stats
            for kind in ("contacts", "actions", "erasures", "retired"):
                items.add_metric([name, kind], getattr(stats, kind))
            requests.add_metric([name], stats.requests)
            parked.add_metric([name], stats.parked)
            failures.add_metric([name], stats.transient_failures)
            pending.add_metric([name], stats.pending)
            breaker.add_metric([name], 0 if stats.breaker == "closed" else 1)
            last.add_metric([name], stats.last_success or 0)
            throttled.add_metric([name], stats.throttled)
            lag.add_metric([name], stats.lag)
        yield from (items, requests, parked, failures, pending, breaker, last, throttled, lag)


def status_line(pushers: Sequence[Pusher]) -> str:
    """One short line per the pushers, for the live status line (counts only)."""
    parts = []
    for pusher in pushers:
        stats = pusher.stats
        state = "" if stats.breaker == "closed" else f" breaker {stats.breaker}"
        parts.append(
            f"{pusher.name}: {stats.contacts}c/{stats.actions}a pushed, "
            f"{stats.pending} pending, {stats.parked} parked{state}"
        )
    return " | ".join(parts)
