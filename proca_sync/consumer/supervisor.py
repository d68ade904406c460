"""``proca-sync run --workers N``: N consumer processes on one queue, under one supervisor.

One process uses one core; the merge into the SQL CRM does not depend on order and the
CRM is safe under concurrent writers (:mod:`proca_sync.crm.sql`), so throughput grows by
running several consumers of the same queue — RabbitMQ shares its deliveries between
them (competing consumers, each with its own prefetch). The supervisor:

* starts each worker as a process of its own (``multiprocessing`` *spawn*: a fresh
  interpreter, nothing inherited from the supervisor's event loop), in its own process
  group, so that a terminal's Ctrl-C reaches the supervisor only, which stops them all;
* restarts a worker that died (a crash, a SIGKILL) after a delay that doubles with each
  death in a row (:data:`RESTART_BASE` … :data:`RESTART_MAX`); the messages it held
  unacked went back to the queue with its connection, and the CRM recognises those it
  had already committed. A worker that exits 2 (configuration: missing queue, refused
  access) stops them all: every worker would meet the same;
* stops them all gracefully on SIGTERM/SIGINT (each finishes its batches, hands back
  what it has not started, acks, closes); a second signal kills them (exit 130);
* keeps every ``run`` option's meaning: ``--exit-when-idle`` stops them all once every
  worker finds the queue (and its retry circuit) drained with nothing in flight, at
  the same time; ``--max-messages`` counts the messages settled by all of them (one
  shared count);
* serves one ``/metrics`` and ``/healthz`` and shows one status line for all of them:
  each worker sends the supervisor a snapshot of its counters four times a second
  (:meth:`~proca_sync.consumer.status.Stats.snapshot`, counts only), and the
  supervisor sums them — counters of a worker that died are kept, so totals do not go
  back (up to a quarter second of a killed worker's last counts may be missing).

The webhook CRM is refused with ``--workers`` above 1 by the CLI: it needs a contact's
messages in order, and competing consumers do not keep them on one process.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import multiprocessing
import multiprocessing.connection
import os
import signal
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from multiprocessing.process import BaseProcess
from pathlib import Path
from typing import Any

from prometheus_client.core import Metric
from prometheus_client.exposition import generate_latest
from prometheus_client.registry import Collector, CollectorRegistry
from rich.console import Console
from rich.live import Live
from rich.text import Text

from proca_sync import aio
from proca_sync.config import ConsumerSettings
from proca_sync.consumer.status import HealthServer

__all__ = ["RESTART_BASE", "RESTART_MAX", "Supervisor", "WorkersStats", "parse_workers"]

log = logging.getLogger("proca_sync.consumer")

RESTART_BASE = 0.5
"""Seconds before restarting a worker that died (doubled for each death in a row)."""
RESTART_MAX = 30.0
STABLE_AFTER = 30.0
"""A worker that ran this long before dying is restarted after the base delay again."""
SNAPSHOT_INTERVAL = 0.25
STOP_GRACE = 15.0
"""Seconds beyond ``--shutdown-timeout`` a worker may take to exit before it is killed."""

_EXIT_OK, _EXIT_FAILED, _EXIT_CONFIG, _EXIT_FORCED = 0, 1, 2, 130


def parse_workers(text: str) -> int:
    """``--workers``: a number from 1, or ``auto`` (the cores this process may use)."""
    if text.strip().lower() == "auto":
        try:
            return max(1, len(os.sched_getaffinity(0)))
        except AttributeError:  # not Linux
            return max(1, os.cpu_count() or 1)
    try:
        value = int(text)
    except ValueError:
        raise ValueError(f"--workers must be a number or 'auto', not {text!r}") from None
    if value < 1:
        raise ValueError("--workers must be at least 1")
    return value


# ---- the worker process ---------------------------------------------------------------------


@dataclass(frozen=True)
class WorkerSpec:
    """What a worker process needs (pickled to it): settings, key file, logging."""

    index: int
    settings: ConsumerSettings
    keys: Path | None
    log_level: str
    setup_logging: Callable[[str], object]
    log_each: bool = True
    erasure_key: Path | None = None
    """The erasure key file: a worker's SQL CRM loads it (now or once ``crm forget``
    creates it), so that an older redelivered message does not bring an erased person
    back, as in a single process."""


_EARLY_STOP = [False]


def _worker_main(
    spec: WorkerSpec, conn: multiprocessing.connection.Connection, settled: Any
) -> None:
    """Entry point of a worker process: consume until the supervisor says stop."""
    os.setpgrp()  # a terminal's Ctrl-C goes to the supervisor, which stops us
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    # A stop that arrives while starting (imports, connecting) is kept for later.
    signal.signal(signal.SIGTERM, lambda *_: _EARLY_STOP.__setitem__(0, True))
    spec.setup_logging(spec.log_level)
    for name in ("aio_pika", "aiormq"):
        logging.getLogger(name).setLevel(logging.CRITICAL)
    sys.exit(aio.run(_worker(spec, conn, settled)))


async def _worker(
    spec: WorkerSpec, conn: multiprocessing.connection.Connection, settled: Any
) -> int:
    from proca_sync.consumer.intake import BrokerUnavailableError, IntakeError
    from proca_sync.consumer.parking import ParkingStore
    from proca_sync.consumer.runner import Consumer
    from proca_sync.consumer.status import Stats
    from proca_sync.crm import backend_from_url
    from proca_sync.crm.sql import SqlBackend
    from proca_sync.crypto import Keystore
    from proca_sync.errors import ConfigError

    settings = spec.settings
    idle_flag = [False]
    try:
        keystore = Keystore.load(spec.keys) if spec.keys is not None else None
        backend = backend_from_url(settings.crm)
        if spec.erasure_key is not None and isinstance(backend, SqlBackend):
            backend.watch_erasure_key(spec.erasure_key)
        consumer = Consumer(
            settings,
            backend=backend,
            parking=ParkingStore(settings.parked),
            keystore=keystore,
            stats=Stats(shared=settled),
            log_each=spec.log_each,
            on_idle=lambda idle: idle_flag.__setitem__(0, idle),
        )
    except ConfigError as exc:
        log.error("%s", exc,
                  extra={"fields": {"event": "worker_config", "worker": spec.index}})
        return _EXIT_CONFIG
    loop = asyncio.get_running_loop()
    signals = 0

    def on_term() -> None:
        nonlocal signals
        signals += 1
        if signals == 1:
            consumer.request_stop("supervisor")
            return
        logging.getLogger("proca_sync").handlers[0].flush()
        os._exit(_EXIT_FORCED)

    loop.add_signal_handler(signal.SIGTERM, on_term)
    if _EARLY_STOP[0]:
        on_term()

    def send(kind: str) -> bool:
        # The time is this process's monotonic clock, which on Linux is the machine's:
        # the supervisor compares it with its own (the first report marks "ready").
        try:
            conn.send((kind, idle_flag[0], consumer.stats.snapshot(), time.monotonic()))
        except (BrokenPipeError, EOFError, OSError):
            return False
        return True

    async def report() -> None:
        while True:
            if not send("stats"):
                # The supervisor is gone: nobody would stop us, so stop.
                consumer.request_stop("supervisor_gone")
                return
            await asyncio.sleep(SNAPSHOT_INTERVAL)

    reporter = asyncio.create_task(report())
    try:
        await consumer.run()
    except (IntakeError, ConfigError) as exc:
        log.error("%s", exc, extra={"fields": {"event": "worker_config", "worker": spec.index}})
        return _EXIT_CONFIG
    except BrokerUnavailableError as exc:
        log.error("%s", exc, extra={"fields": {"event": "broker_unavailable"}})
        return _EXIT_FAILED
    finally:
        reporter.cancel()
        await asyncio.gather(reporter, return_exceptions=True)
    send("done")
    return _EXIT_OK


# ---- the supervisor ---------------------------------------------------------------------------


@dataclass
class _Slot:
    index: int
    process: BaseProcess | None = None
    conn: multiprocessing.connection.Connection | None = None
    started: float = 0.0
    deaths: int = 0
    restart_at: float | None = None
    snapshot: dict[str, Any] | None = None
    ready_at: float | None = None
    """When this run of the worker was ready to consume (imports done, the CRM and
    the keys loaded): its first report, stamped by the worker."""
    idle: bool = False
    done: bool = False
    exit_code: int | None = None


@dataclass
class _Retired:
    """Counter samples of workers that are gone, so that totals never go back."""

    samples: dict[tuple[str, str, tuple[tuple[str, str], ...]], float] = field(
        default_factory=dict
    )
    meta: dict[str, tuple[str, str]] = field(default_factory=dict)
    totals: dict[str, Any] = field(default_factory=dict)


class WorkersStats:
    """The supervisor's view: its workers' snapshots summed (``/metrics``, ``/healthz``,
    the status line, the exit summary)."""

    def __init__(self, slots: list[_Slot]) -> None:
        self.slots = slots
        self.retired = _Retired()
        self.restarts = 0
        self.started = time.monotonic()
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(_Collector(self))

    def live(self) -> list[dict[str, Any]]:
        return [
            s.snapshot for s in self.slots
            if s.snapshot is not None and s.process is not None and s.process.is_alive()
        ]  # fmt: skip

    def retire(self, snapshot: dict[str, Any] | None) -> None:
        """A worker ended: keep its counters (not its gauges) in the sums."""
        if snapshot is None:
            return
        for name, kind, doc, samples in snapshot["samples"]:
            if kind not in {"counter", "histogram"}:
                continue
            self.retired.meta[name] = (kind, doc)
            for sample, labels, value in samples:
                key = (name, sample, tuple(sorted(labels.items())))
                self.retired.samples[key] = self.retired.samples.get(key, 0.0) + value
        # What it held unsettled went back to the queue with its connection.
        ended = {**snapshot["totals"], "in_flight": 0}
        self.retired.totals = _add_totals(self.retired.totals, ended)

    def totals(self) -> dict[str, Any]:
        totals = dict(self.retired.totals)
        for snapshot in self._current():
            totals = _add_totals(totals, snapshot["totals"])
        totals.setdefault("by_label", {})
        for name in ("received", "acked", "retried", "parked", "returned", "in_flight",
                     "reconnects"):  # fmt: skip
            totals.setdefault(name, 0)
        totals["workers"] = len(self.slots)
        totals["restarts"] = self.restarts
        return totals

    def _current(self) -> Iterable[dict[str, Any]]:
        return [s.snapshot for s in self.slots if s.snapshot is not None]

    def alive(self) -> int:
        return sum(1 for s in self.slots if s.process is not None and s.process.is_alive())

    def healthy(self) -> bool:
        live = self.live()
        return (
            len(live) == len(self.slots)
            and all(bool(s["connected"]) and s["breaker"] == "closed" for s in live)
        )

    def health(self) -> dict[str, Any]:
        live = self.live()
        return {
            "status": "ok" if self.healthy() else "degraded",
            "workers": len(self.slots),
            "workers_alive": self.alive(),
            "restarts": self.restarts,
            "connected": sum(1 for s in live if s["connected"]),
            "breaker": sorted({s["breaker"] for s in live}),
            "in_flight": sum(s["totals"]["in_flight"] for s in live),
            "batches_in_flight": sum(s["batches"] for s in live),
            "queue_depth": max((s["depth"] for s in live if s["depth"] is not None),
                               default=None),
        }  # fmt: skip

    def metrics(self) -> bytes:
        return generate_latest(self.registry)

    def line(self) -> Text:
        live = self.live()
        totals = self.totals()
        depths = [s["depth"] for s in live if s["depth"] is not None]
        breakers = {s["breaker"] for s in live}
        text = Text()
        text.append(f"{sum(s['rate'] for s in live):7.1f} msg/s  ", style="bold")
        text.append(f"workers {self.alive()}/{len(self.slots)}  ")
        text.append(f"acked {totals['acked']}  ")
        text.append(f"retried {totals['retried']}  ", style="yellow")
        text.append(f"parked {totals['parked']}  ", style="red")
        text.append(f"in flight {sum(s['totals']['in_flight'] for s in live)}  ")
        text.append(f"queue {max(depths) if depths else '?'}  ")
        worst = "open" if "open" in breakers else "half_open" if "half_open" in breakers else (
            "closed"
        )
        style = {"closed": "green", "open": "red", "half_open": "yellow"}[worst]
        text.append(f"breaker {worst}", style=style)
        if self.restarts:
            text.append(f"  restarts {self.restarts}", style="yellow")
        return text


def _add_totals(into: dict[str, Any], more: dict[str, Any]) -> dict[str, Any]:
    out = dict(into)
    for key, value in more.items():
        if key == "by_label":
            labels = dict(out.get("by_label", {}))
            for label, count in value.items():
                labels[label] = labels.get(label, 0) + count
            out["by_label"] = dict(sorted(labels.items()))
        elif isinstance(value, int):
            out[key] = out.get(key, 0) + value
    return out


class _Collector(Collector):
    """Sums the workers' samples at scrape time. Counters and histograms: live workers
    plus those that ended. Gauges: live workers only — summed (in flight, batches,
    connected workers, workers per breaker state), except the queue depth (the same
    queue seen by each: the largest)."""

    def __init__(self, stats: WorkersStats) -> None:
        self.stats = stats

    def collect(self) -> Iterable[Metric]:
        sums: dict[tuple[str, str, tuple[tuple[str, str], ...]], float] = {}
        meta: dict[str, tuple[str, str]] = dict(self.stats.retired.meta)
        for key, value in self.stats.retired.samples.items():
            sums[key] = value
        for snapshot in self.stats.live():
            for name, kind, doc, samples in snapshot["samples"]:
                meta[name] = (kind, doc)
                for sample, labels, value in samples:
                    key = (name, sample, tuple(sorted(labels.items())))
                    if name == "proca_sync_queue_depth":
                        sums[key] = max(sums.get(key, 0.0), value)
                    else:
                        sums[key] = sums.get(key, 0.0) + value
        families: dict[str, Metric] = {}
        for (name, sample, labels), value in sorted(sums.items()):
            family = families.get(name)
            if family is None:
                kind, doc = meta[name]
                family = families[name] = Metric(name, doc, kind)
            family.add_sample(sample, dict(labels), value)
        workers = Metric("proca_sync_workers", "Worker processes running now", "gauge")
        workers.add_sample("proca_sync_workers", {}, float(self.stats.alive()))
        restarts = Metric("proca_sync_worker_restarts", "Workers restarted after dying",
                          "counter")  # fmt: skip
        restarts.add_sample("proca_sync_worker_restarts_total", {}, float(self.stats.restarts))
        return [*families.values(), workers, restarts]


class Supervisor:
    """Runs ``workers`` consumer processes of ``settings`` until stopped."""

    def __init__(
        self,
        settings: ConsumerSettings,
        *,
        workers: int,
        keys: Path | None,
        log_level: str,
        setup_logging: Callable[[str], object],
        log_each: bool = True,
        erasure_key: Path | None = None,
        restart_base: float = RESTART_BASE,
        restart_max: float = RESTART_MAX,
    ) -> None:
        self.settings = settings
        self.workers = workers
        self.keys = keys
        self.log_level = log_level
        self.setup_logging = setup_logging
        self.log_each = log_each
        self.erasure_key = erasure_key
        self.restart_base = restart_base
        self.restart_max = restart_max
        self._context = multiprocessing.get_context("spawn")
        self._settled = self._context.Value("q", 0)
        self.slots = [_Slot(i) for i in range(workers)]
        self.stats = WorkersStats(self.slots)
        self.stop_reason = ""
        self.status = _EXIT_OK
        self._stop = asyncio.Event()
        self._signals = 0
        self.first_ready: float | None = None
        """``time.monotonic()`` when the first worker was ready to consume (its first
        report): a process's start (interpreter, imports) lies before it."""

    # ---- public ---------------------------------------------------------------------------

    @property
    def settled(self) -> int:
        """Messages settled by all workers so far (the shared ``--max-messages`` count)."""
        return int(self._settled.value)

    def request_stop(self, reason: str, status: int = _EXIT_OK) -> None:
        if self._stop.is_set():
            return
        self.stop_reason = reason
        self.status = status
        self._stop.set()

    async def run(self, *, console: Console | None = None) -> tuple[int, WorkersStats]:
        """Supervise until a stop; returns the exit status and the summed totals."""
        loop = asyncio.get_running_loop()
        installed = []
        for sig in (signal.SIGTERM, signal.SIGINT):
            with contextlib.suppress(NotImplementedError, RuntimeError):
                loop.add_signal_handler(sig, self._on_signal, sig.name)
                installed.append(sig)
        health: HealthServer | None = None
        display: asyncio.Task[None] | None = None
        try:
            if self.settings.metrics_port is not None:
                health = HealthServer(
                    self.stats, port=self.settings.metrics_port, host=self.settings.metrics_host
                )
                port = await health.start()
                log.info("metrics of all workers on http://%s:%d/metrics and /healthz",
                         self.settings.metrics_host, port,
                         extra={"fields": {"event": "metrics", "port": port}})  # fmt: skip
            log.info("starting the workers on %s", self.settings.queue,
                     extra={"fields": {"event": "supervisor_started",
                                       "workers": self.workers}})  # fmt: skip
            for slot in self.slots:
                self._start(slot)
            if console is not None:
                display = asyncio.create_task(self._live(console))
            await self._watch()
            await self._stop_all()
        finally:
            if display is not None:
                display.cancel()
                await asyncio.gather(display, return_exceptions=True)
            if health is not None:
                await health.close()
            for sig in installed:
                loop.remove_signal_handler(sig)
            for slot in self.slots:  # whatever happened, no worker outlives us
                if slot.process is not None and slot.process.is_alive():
                    slot.process.kill()
        log.info("stopped (%s)", self.stop_reason,
                 extra={"fields": {"event": "stopped", "reason": self.stop_reason,
                                   **self.stats.totals()}})  # fmt: skip
        return self.status, self.stats

    # ---- workers --------------------------------------------------------------------------

    def _child_settings(self) -> ConsumerSettings:
        # The supervisor serves the metrics; the workers do not listen.
        return self.settings.model_copy(update={"metrics_port": None})

    def _start(self, slot: _Slot) -> None:
        parent, child = self._context.Pipe(duplex=False)
        spec = WorkerSpec(
            slot.index, self._child_settings(), self.keys, self.log_level, self.setup_logging,
            self.log_each, self.erasure_key,
        )
        process = self._context.Process(
            target=_worker_main, args=(spec, child, self._settled),
            name=f"proca-sync-worker-{slot.index}", daemon=False,
        )  # fmt: skip
        process.start()
        child.close()
        slot.process, slot.conn = process, parent
        slot.started = time.monotonic()
        slot.restart_at = None
        slot.snapshot = slot.ready_at = None
        slot.idle = slot.done = False
        log.info("worker started",
                 extra={"fields": {"event": "worker_started", "worker": slot.index,
                                   "pid": process.pid}})  # fmt: skip

    def _receive(self, slot: _Slot) -> None:
        conn = slot.conn
        if conn is None:
            return
        try:
            while conn.poll():
                kind, idle, snapshot, sent_at = conn.recv()
                slot.snapshot, slot.idle = snapshot, bool(idle)
                if slot.ready_at is None:
                    slot.ready_at = sent_at
                    if self.first_ready is None or sent_at < self.first_ready:
                        self.first_ready = sent_at
                    log.info("worker ready",
                             extra={"fields": {"event": "worker_ready", "worker": slot.index,
                                               "seconds": round(sent_at - slot.started, 3)}})
                slot.done = slot.done or kind == "done"
        except (EOFError, OSError):
            pass

    async def _watch(self) -> None:
        limit = self.settings.max_messages
        while not self._stop.is_set():
            now = time.monotonic()
            for slot in self.slots:
                self._receive(slot)
                process = slot.process
                if process is not None and not process.is_alive():
                    self._ended(slot, now)
                elif process is None and slot.restart_at is not None and now >= slot.restart_at:
                    self.stats.restarts += 1
                    self._start(slot)
            if self._stop.is_set():
                break
            if limit is not None and self._settled.value >= limit:
                self.request_stop("max_messages")
                break
            if self.settings.exit_when_idle and all(
                s.process is not None and s.process.is_alive() and s.idle for s in self.slots
            ):
                self.request_stop("idle")
                break
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stop.wait(), timeout=0.1)

    def _ended(self, slot: _Slot, now: float) -> None:
        assert slot.process is not None
        code = slot.process.exitcode
        self._receive(slot)
        self.stats.retire(slot.snapshot)
        slot.snapshot = None
        slot.process.join(timeout=1)
        slot.process = None
        if slot.conn is not None:
            slot.conn.close()
            slot.conn = None
        slot.exit_code = code
        if code == _EXIT_CONFIG:
            log.error("a worker met a configuration error; stopping all workers",
                      extra={"fields": {"event": "worker_exit", "worker": slot.index,
                                        "code": code}})  # fmt: skip
            self.request_stop("config", _EXIT_CONFIG)
            return
        limit = self.settings.max_messages
        if code == _EXIT_OK and limit is not None and self._settled.value >= limit:
            self.request_stop("max_messages")
            return
        lived = now - slot.started
        slot.deaths = 1 if lived >= STABLE_AFTER else slot.deaths + 1
        delay = min(self.restart_max, self.restart_base * 2 ** (slot.deaths - 1))
        slot.restart_at = now + delay
        # Figures in the fields only (see the consumer's batch line).
        log.warning("a worker exited (%s); restarting it", _describe(code),
                    extra={"fields": {"event": "worker_exit", "worker": slot.index,
                                      "code": code, "lived_s": round(lived, 1),
                                      "restart_in_s": round(delay, 2)}})  # fmt: skip

    async def _stop_all(self) -> None:
        """SIGTERM to every worker; wait for them (then SIGKILL the stragglers)."""
        for slot in self.slots:
            if slot.process is not None and slot.process.is_alive() and slot.process.pid:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(slot.process.pid, signal.SIGTERM)
        deadline = time.monotonic() + self.settings.shutdown_timeout + STOP_GRACE
        while True:
            running = [s for s in self.slots if s.process is not None and s.process.is_alive()]
            for slot in self.slots:
                self._receive(slot)
            if not running:
                break
            if time.monotonic() > deadline:
                for slot in running:
                    assert slot.process is not None
                    log.error("a worker did not stop in time; killed",
                              extra={"fields": {"event": "worker_killed",
                                                "worker": slot.index}})  # fmt: skip
                    slot.process.kill()
                self.status = self.status or _EXIT_FAILED
                break
            await asyncio.sleep(0.05)
        for slot in self.slots:
            if slot.process is not None:
                slot.process.join(timeout=5)
                code = slot.process.exitcode
                self._receive(slot)
                self.stats.retire(slot.snapshot)
                slot.snapshot = None
                slot.process = None
                slot.exit_code = code
                # Killed by SIGTERM itself: it had not yet reached its handler (still
                # starting), so it held nothing — a clean stop too.
                clean = code in (_EXIT_OK, None, -signal.SIGTERM)
                if not clean and self.status == _EXIT_OK:
                    self.status = _EXIT_FORCED if code == _EXIT_FORCED else _EXIT_FAILED
            if slot.conn is not None:
                slot.conn.close()
                slot.conn = None

    # ---- signals and display ----------------------------------------------------------------

    def _on_signal(self, name: str) -> None:
        self._signals += 1
        if self._signals == 1:
            log.warning("%s: stopping the workers (in-flight messages finish; again to exit "
                        "at once)", name,
                        extra={"fields": {"event": "signal", "signal": name}})  # fmt: skip
            self.request_stop(name)
            return
        log.warning("%s again: killing the workers; unacked messages return to the queue",
                    name, extra={"fields": {"event": "forced_exit", "signal": name}})
        for slot in self.slots:
            if slot.process is not None and slot.process.is_alive():
                slot.process.kill()
        for handler in logging.getLogger("proca_sync").handlers:
            handler.flush()
        os._exit(_EXIT_FORCED)

    async def _live(self, console: Console) -> None:
        with Live(self.stats.line(), console=console, refresh_per_second=4,
                  transient=True) as live:  # fmt: skip
            while True:
                await asyncio.sleep(0.25)
                live.update(self.stats.line())


def _describe(code: int | None) -> str:
    if code is None:
        return "unknown"
    if code < 0:
        with contextlib.suppress(ValueError):
            return f"signal {signal.Signals(-code).name}"
    return "non-zero status"

