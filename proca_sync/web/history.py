"""The dashboard's last hour: consumer metrics and destination lag sampled by the web server.

A background task of the console reads the running consumers' ``/metrics`` (one URL or
several, summed) and each destination's lag from the ledger every few seconds. Each
sample goes into a bounded ring in memory *and* into the table ``web_samples`` of the
console's own store (the account store), rows older than the window deleted as new ones
arrive: a restarted console shows the hour before its restart, with a gap for the time
it was down. Rates are computed from the counters of consecutive samples; a counter that
went down means the consumer restarted, and its new value counts from zero.

One console process per account store: two would record interleaved samples.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import aiohttp
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import JSON, Column, Float, MetaData, Table, delete, insert, select
from sqlalchemy import exc as sa_exc

from proca_sync.crm.sql import create_store_engine
from proca_sync.errors import ConfigError

__all__ = ["History", "Reading", "Sample", "read_consumers"]

WINDOW_SECONDS = 3600.0
"""How far back the charts go."""
SAMPLE_SECONDS = 5.0
"""Default time between two samples."""
GAP_FACTOR = 3.0
"""Two samples further apart than this many intervals have a gap between them (the
console or the consumers were down): no rate is drawn across it."""

metadata = MetaData()

web_samples = Table(
    "web_samples",
    metadata,
    Column("at", Float, primary_key=True),
    Column("data", JSON, nullable=False),
)

BREAKER_ORDER = ("closed", "half_open", "open")


@dataclass(frozen=True, slots=True)
class Reading:
    """One read of the consumers' metrics (several consumers: counters summed)."""

    acked: float
    retried: float
    parked: float
    depth: int | None = None
    in_flight: int | None = None
    connected: bool | None = None
    breaker: str = "?"

    @property
    def settled(self) -> float:
        return self.acked + self.retried + self.parked


@dataclass(frozen=True, slots=True)
class Sample:
    """What the console saw at ``at`` (epoch seconds): ``reading`` is None when no
    consumer answered; ``lags`` maps a destination to its lag in seconds (None: none
    pending)."""

    at: float
    reading: Reading | None
    lags: Mapping[str, float | None] = field(default_factory=dict)
    error: str | None = None

    def to_json(self) -> dict[str, Any]:
        reading = None
        if self.reading is not None:
            r = self.reading
            reading = {
                "acked": r.acked, "retried": r.retried, "parked": r.parked, "depth": r.depth,
                "in_flight": r.in_flight, "connected": r.connected, "breaker": r.breaker,
            }  # fmt: skip
        return {"reading": reading, "lags": dict(self.lags), "error": self.error}

    @classmethod
    def from_json(cls, at: float, data: Mapping[str, Any]) -> Sample:
        raw = data.get("reading")
        reading = None
        if isinstance(raw, dict):
            reading = Reading(
                acked=float(raw.get("acked") or 0), retried=float(raw.get("retried") or 0),
                parked=float(raw.get("parked") or 0), depth=raw.get("depth"),
                in_flight=raw.get("in_flight"), connected=raw.get("connected"),
                breaker=str(raw.get("breaker") or "?"),
            )  # fmt: skip
        lags = data.get("lags") if isinstance(data.get("lags"), dict) else {}
        return cls(at=at, reading=reading, lags=lags or {}, error=data.get("error"))


def parse_metrics(text: str) -> Reading:
    """The figures the dashboard shows, from one consumer's Prometheus text."""
    outcomes: dict[str, float] = {}
    values: dict[str, Any] = {}
    breaker = "?"
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == "proca_sync_messages_total":
                outcome = sample.labels.get("outcome", "?")
                outcomes[outcome] = outcomes.get(outcome, 0.0) + sample.value
            elif sample.name == "proca_sync_queue_depth":
                values["depth"] = int(sample.value)
            elif sample.name == "proca_sync_in_flight":
                values["in_flight"] = int(sample.value)
            elif sample.name == "proca_sync_connected":
                values["connected"] = bool(sample.value)
            elif sample.name == "proca_sync_breaker_state" and sample.value == 1:
                breaker = sample.labels.get("state", "?")
    return Reading(
        acked=outcomes.get("ack", 0.0), retried=outcomes.get("retry", 0.0),
        parked=outcomes.get("park", 0.0), breaker=breaker, **values,
    )  # fmt: skip


def combine(readings: Sequence[Reading]) -> Reading:
    """Several consumers as one: counters and in-flight summed; the queue depth is the
    largest (workers on one queue each report that queue's depth); connected only if all
    are; the worst breaker state."""

    def known(values: list[Any]) -> list[Any]:
        return [v for v in values if v is not None]

    depths = known([r.depth for r in readings])
    flights = known([r.in_flight for r in readings])
    connected = known([r.connected for r in readings])
    breakers = [r.breaker for r in readings]
    worst = max(breakers, key=lambda b: BREAKER_ORDER.index(b) if b in BREAKER_ORDER else -1)
    return Reading(
        acked=sum(r.acked for r in readings), retried=sum(r.retried for r in readings),
        parked=sum(r.parked for r in readings), depth=max(depths) if depths else None,
        in_flight=sum(flights) if flights else None,
        connected=all(connected) if connected else None, breaker=worst,
    )  # fmt: skip


async def read_consumers(urls: Sequence[str], *, seconds: float = 3.0) -> Reading:
    """Read every consumer's metrics and combine them.

    Raises :class:`aiohttp.ClientError` or :class:`TimeoutError` when one of them does
    not answer (a partial sum would draw a false drop in the charts)."""
    readings = []
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=seconds)) as client:
        for url in urls:
            async with client.get(url) as reply:
                reply.raise_for_status()
                readings.append(parse_metrics(await reply.text()))
    return combine(readings)


def _rate(now: float, before: float, seconds: float) -> float:
    # A counter that went down: the consumer restarted and counts again from zero.
    delta = now - before if now >= before else now
    return round(delta / seconds, 3)


class History:
    """The last hour of samples: a ring in memory, kept in ``web_samples`` across restarts.

    Synchronous (the sampler records from a worker thread while pages read): the ring is
    guarded by a lock; one writer at a time."""

    def __init__(
        self, url: str, *, window: float = WINDOW_SECONDS, interval: float = SAMPLE_SECONDS
    ) -> None:
        self.engine, _dialect = create_store_engine(url, what="web account store")
        self.window = window
        self.interval = interval
        self._ring: deque[Sample] = deque(maxlen=int(window / interval * 1.5) + 10)
        self._lock = threading.Lock()

    def open_sync(self, *, now: float | None = None) -> None:
        """Create the table on first use and load the samples of the last window.

        Raises :class:`ConfigError` if the store is unusable."""
        now = time.time() if now is None else now
        try:
            with self.engine.begin() as conn:
                metadata.create_all(conn, checkfirst=True)
                rows = conn.execute(
                    select(web_samples.c.at, web_samples.c.data)
                    .where(web_samples.c.at >= now - self.window)
                    .order_by(web_samples.c.at)
                ).all()
        except sa_exc.SQLAlchemyError as exc:
            raise ConfigError(f"web account store unusable ({type(exc).__name__})") from None
        with self._lock:
            self._ring.clear()
            for at, data in rows:
                self._ring.append(Sample.from_json(float(at), data))

    def close(self) -> None:
        self.engine.dispose()

    def record(self, sample: Sample) -> None:
        """Keep ``sample``, in memory and in the store; forget those older than the window.

        Raises :class:`sqlalchemy.exc.SQLAlchemyError` when the store cannot be written
        (the sample stays in memory)."""
        cutoff = sample.at - self.window
        with self._lock:
            self._ring.append(sample)
            while self._ring and self._ring[0].at < cutoff:
                self._ring.popleft()
        with self.engine.begin() as conn:
            conn.execute(insert(web_samples).values(at=sample.at, data=sample.to_json()))
            conn.execute(delete(web_samples).where(web_samples.c.at < cutoff))

    def samples(self) -> list[Sample]:
        with self._lock:
            return list(self._ring)

    def latest(self) -> Sample | None:
        with self._lock:
            return self._ring[-1] if self._ring else None

    def rate(self) -> float | None:
        """Settled messages per second between the last two samples (None: unknown)."""
        points = self.series()["rate"]
        return points[-1] if points else None

    def series(self) -> dict[str, Any]:
        """The charts' data: one time axis (epoch seconds) and a value (or None: a gap)
        per sample for each series; ``lag`` maps each destination to its series."""
        samples = self.samples()
        t: list[float] = []
        rate: list[float | None] = []
        outcomes: dict[str, list[float | None]] = {"acked": [], "retried": [], "parked": []}
        depth: list[int | None] = []
        names = sorted({name for s in samples for name in s.lags})
        lag: dict[str, list[float | None]] = {name: [] for name in names}
        previous: Sample | None = None
        for sample in samples:
            t.append(round(sample.at, 3))
            now, before = sample.reading, previous.reading if previous else None
            seconds = sample.at - previous.at if previous else 0.0
            if (
                now is None or before is None or previous is None
                or seconds <= 0 or seconds > self.interval * GAP_FACTOR
            ):  # fmt: skip
                rate.append(None)
                for values in outcomes.values():
                    values.append(None)
            else:
                rate.append(_rate(now.settled, before.settled, seconds))
                outcomes["acked"].append(_rate(now.acked, before.acked, seconds))
                outcomes["retried"].append(_rate(now.retried, before.retried, seconds))
                outcomes["parked"].append(_rate(now.parked, before.parked, seconds))
            depth.append(None if now is None else now.depth)
            for name in names:
                value = sample.lags.get(name)
                lag[name].append(None if value is None else round(float(value), 1))
            previous = sample
        return {"t": t, "rate": rate, **outcomes, "depth": depth, "lag": lag}
