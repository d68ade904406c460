"""What the consumer shows about itself: counters, Prometheus metrics, ``/healthz``, and
the live status line on a terminal.

Everything here holds counts, states, ids and reason codes only — never message content.
The metrics use their own :class:`~prometheus_client.CollectorRegistry` (no process-wide
globals), served with ``/healthz`` by a small asyncio HTTP server.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import Counter, deque
from typing import Any, Protocol

import orjson
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Gauge,
    Histogram,
    generate_latest,
)
from prometheus_client import Counter as PromCounter
from rich.text import Text

from proca_sync.consumer.breaker import BreakerState
from proca_sync.consumer.policy import Outcome

__all__ = ["HealthServer", "SharedCount", "Stats", "StatsView"]


class SharedCount(Protocol):
    """A count shared by processes (``multiprocessing.Value``): ``--max-messages``
    across the workers of one supervisor."""

    value: int

    def get_lock(self) -> Any: ...


class StatsView(Protocol):
    """What :class:`HealthServer` serves: one process's :class:`Stats`, or the sum of
    a supervisor's workers."""

    def metrics(self) -> bytes: ...

    def healthy(self) -> bool: ...

    def health(self) -> dict[str, Any]: ...

_RATE_WINDOW = 10.0


class Stats:
    """Per-outcome totals and live gauges of one consumer run."""

    def __init__(self, *, shared: SharedCount | None = None) -> None:
        self.shared = shared
        self.started = time.monotonic()
        self.outcomes: Counter[str] = Counter()
        self.labels: Counter[str] = Counter()
        self.received = 0
        self.in_flight = 0
        self.batches = 0
        self.depth: int | None = None
        self.fail_depth: int | None = None
        self.breaker = BreakerState.CLOSED
        self.connected: bool | None = None  # None: not connected yet
        self.reconnects = 0
        self._acks: deque[tuple[float, int]] = deque()

        self.registry = CollectorRegistry(auto_describe=True)
        self._messages = PromCounter(
            "proca_sync_messages", "Settled deliveries by outcome and label",
            ["outcome", "label"], registry=self.registry,
        )
        self._received = PromCounter(
            "proca_sync_deliveries", "Deliveries received from the broker", registry=self.registry
        )
        self._in_flight = Gauge(
            "proca_sync_in_flight", "Deliveries held unsettled", registry=self.registry
        )
        self._depth = Gauge(
            "proca_sync_queue_depth", "Messages ready in the queue (last poll)",
            registry=self.registry,
        )
        self._breaker = Gauge(
            "proca_sync_breaker_state", "Circuit breaker state (1 for the current one)",
            ["state"], registry=self.registry,
        )
        self._connected = Gauge(
            "proca_sync_connected", "1 while connected to the broker", registry=self.registry
        )
        self._reconnects = PromCounter(
            "proca_sync_reconnects", "Reconnections to the broker", registry=self.registry
        )
        self._batches = Gauge(
            "proca_sync_batches_in_flight", "CRM calls running now", registry=self.registry
        )
        self.batch_seconds = Histogram(
            "proca_sync_batch_seconds", "Duration of CRM batch calls", registry=self.registry,
        )
        # Gauges read at scrape time, and the labelled children looked up once: the
        # per-message path only adds to plain integers.
        self._in_flight.set_function(lambda: self.in_flight)
        self._batches.set_function(lambda: self.batches)
        self._children: dict[tuple[str, str], Any] = {}
        self.set_breaker(BreakerState.CLOSED)

    # ---- updates ----------------------------------------------------------------------

    def delivered(self) -> None:
        self.received += 1
        self.in_flight += 1
        self._received.inc()

    def settled(self, outcome: Outcome, label: str, count: int = 1) -> None:
        """``count`` deliveries left our hands the same way (``outcome`` is never
        ``HOLD``); a batch counts its deliveries per outcome and label in one call."""
        self.in_flight -= count
        self.outcomes[outcome.value] += count
        self.labels[label] += count
        child = self._children.get((outcome.value, label))
        if child is None:
            child = self._children[(outcome.value, label)] = self._messages.labels(
                outcome.value, label
            )
        child.inc(count)
        if self.shared is not None:
            with self.shared.get_lock():
                self.shared.value += count
        if outcome in (Outcome.ACK, Outcome.PARK):
            now = time.monotonic()
            self._acks.append((now, count))
            self._prune(now)

    def _prune(self, now: float) -> None:
        # Done on every settle, not only when the rate is read: without a status line
        # nobody reads it, and a service must not keep one entry per message forever.
        while self._acks and now - self._acks[0][0] > _RATE_WINDOW:
            self._acks.popleft()

    def batch_started(self) -> None:
        self.batches += 1

    def batch_finished(self, seconds: float) -> None:
        self.batches -= 1
        self.batch_seconds.observe(seconds)

    def returned(self, count: int = 1) -> None:
        """Deliveries given back unsettled (their channel closed, or shutdown)."""
        self.in_flight -= count
        self.outcomes["returned"] += count

    def set_depth(self, depth: int | None, fail_depth: int | None = None) -> None:
        self.depth = depth
        self.fail_depth = fail_depth
        if depth is not None:
            self._depth.set(depth)

    def set_breaker(self, state: BreakerState) -> None:
        self.breaker = state
        for each in BreakerState:
            self._breaker.labels(each.value).set(1 if each is state else 0)

    def set_connected(self, connected: bool) -> None:
        self.connected = connected
        self._connected.set(1 if connected else 0)

    def reconnected(self) -> None:
        self.reconnects += 1
        self._reconnects.inc()

    # ---- reading ----------------------------------------------------------------------

    @property
    def settled_total(self) -> int:
        """Settled deliveries: of this process, or of every worker sharing the count."""
        if self.shared is not None:
            return int(self.shared.value)
        return sum(v for k, v in self.outcomes.items() if k != "returned")

    def snapshot(self) -> dict[str, Any]:
        """Everything a supervisor shows of this worker (counts and states only): the
        totals, live gauges and every metric sample, to be summed over workers."""
        samples = [
            (
                metric.name,
                metric.type,
                metric.documentation,
                [
                    (sample.name, dict(sample.labels), sample.value)
                    for sample in metric.samples
                    if not sample.name.endswith("_created")
                ],
            )
            for metric in self.registry.collect()
        ]
        return {
            "totals": self.totals(),
            "rate": self.rate(),
            "depth": self.depth,
            "fail_depth": self.fail_depth,
            "breaker": self.breaker.value,
            "connected": self.connected,
            "batches": self.batches,
            "samples": samples,
        }

    def rate(self) -> float:
        """Acked or parked messages per second over the last few seconds."""
        now = time.monotonic()
        self._prune(now)
        span = min(_RATE_WINDOW, max(now - self.started, 1e-3))
        return sum(n for _, n in self._acks) / span

    def healthy(self) -> bool:
        return bool(self.connected) and self.breaker is BreakerState.CLOSED

    def health(self) -> dict[str, Any]:
        return {
            "status": "ok" if self.healthy() else "degraded",
            "connection": "connected" if self.connected else "disconnected",
            "breaker": self.breaker.value,
            "in_flight": self.in_flight,
            "batches_in_flight": self.batches,
            "queue_depth": self.depth,
        }

    def totals(self) -> dict[str, Any]:
        """Per-outcome totals (for the exit summary)."""
        return {
            "received": self.received,
            "acked": self.outcomes[Outcome.ACK.value],
            "retried": self.outcomes[Outcome.RETRY.value],
            "parked": self.outcomes[Outcome.PARK.value],
            "returned": self.outcomes["returned"],
            "in_flight": self.in_flight,  # 0 after a clean stop: every delivery accounted for
            "reconnects": self.reconnects,
            "by_label": dict(sorted(self.labels.items())),
        }

    def line(self) -> Text:
        """The live status line."""
        depth = "?" if self.depth is None else str(self.depth)
        styles = {"closed": "green", "open": "red", "half_open": "yellow"}
        breaker_style = styles[self.breaker.value]
        text = Text()
        text.append(f"{self.rate():7.1f} msg/s  ", style="bold")
        text.append(f"acked {self.outcomes[Outcome.ACK.value]}  ")
        text.append(f"retried {self.outcomes[Outcome.RETRY.value]}  ", style="yellow")
        text.append(f"parked {self.outcomes[Outcome.PARK.value]}  ", style="red")
        text.append(f"in flight {self.in_flight}  queue {depth}  ")
        if self.fail_depth:
            text.append(f"retrying {self.fail_depth}  ", style="yellow")
        text.append(f"breaker {self.breaker.value}", style=breaker_style)
        if self.connected is None:
            text.append("  connecting…", style="yellow")
        elif not self.connected:
            text.append("  reconnecting…", style="red")
        return text

    def metrics(self) -> bytes:
        return generate_latest(self.registry)


class HealthServer:
    """``GET /metrics`` (Prometheus text) and ``GET /healthz`` (JSON; 200 when connected
    and the breaker is closed, else 503) on 127.0.0.1 or ``host``."""

    def __init__(self, stats: StatsView, *, port: int, host: str = "127.0.0.1") -> None:
        self.stats = stats
        self.port = port
        self.host = host
        self._server: asyncio.Server | None = None

    async def start(self) -> int:
        """Listen; returns the bound port (useful with port 0)."""
        self._server = await asyncio.start_server(self._handle, self.host, self.port)
        sockets = self._server.sockets
        self.port = int(sockets[0].getsockname()[1]) if sockets else self.port
        return self.port

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server.wait_closed(), timeout=2)

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            request = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), timeout=5)
            parts = request.split(b"\r\n", 1)[0].split()
            path = parts[1].decode("latin-1").split("?", 1)[0] if len(parts) > 1 else "/"
            if path == "/metrics":
                status, ctype, body = 200, CONTENT_TYPE_LATEST, self.stats.metrics()
            elif path == "/healthz":
                status = 200 if self.stats.healthy() else 503
                ctype, body = "application/json", orjson.dumps(self.stats.health())
            else:
                status, ctype, body = 404, "text/plain", b"not found\n"
            reason = {200: "OK", 404: "Not Found", 503: "Service Unavailable"}[status]
            writer.write(
                f"HTTP/1.1 {status} {reason}\r\nContent-Type: {ctype}\r\n"
                f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n".encode("latin-1")
                + body
            )
            await writer.drain()
        except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, TimeoutError, OSError):
            pass
        finally:
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()
