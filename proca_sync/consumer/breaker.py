"""The circuit breaker in front of the CRM (a pure state machine; the runner drives it).

::

    CLOSED ──(threshold consecutive transient batch failures, or one with retry_after)──► OPEN
    OPEN ──(backend.ping() answers after probe_delay())──► HALF_OPEN
    HALF_OPEN ──(one batch succeeds)──► CLOSED
    HALF_OPEN ──(that batch fails)──► OPEN (longer delay)
    OPEN ──(ping fails)──► OPEN (longer delay)

While it is not closed the runner takes no new work and holds failing batches unacked
(policy ``HOLD``) instead of cycling them through retries, so an outage does not spend
the messages' retry budget. Delays grow exponentially from ``base_delay`` up to
``max_delay``; a ``retry_after`` from the CRM (HTTP 429/503) is honoured even above the
cap, up to ``max_retry_after``.
"""

from __future__ import annotations

from enum import StrEnum

__all__ = ["Breaker", "BreakerState"]


class BreakerState(StrEnum):
    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half_open"


class Breaker:
    """Counts consecutive transient CRM failures and decides when to stop and probe."""

    def __init__(
        self,
        *,
        threshold: int = 3,
        base_delay: float = 0.5,
        max_delay: float = 10.0,
        max_retry_after: float = 300.0,
    ) -> None:
        if threshold < 1 or base_delay <= 0 or max_delay < base_delay:
            raise ValueError("breaker needs threshold >= 1 and 0 < base_delay <= max_delay")
        self.threshold = threshold
        self.base_delay = base_delay
        self.max_delay = max_delay
        self.max_retry_after = max_retry_after
        self.state = BreakerState.CLOSED
        self.failures = 0
        """Consecutive failed batches while closed."""
        self.trips = 0
        """Failed probes and batches since the breaker opened; sets the backoff."""
        self.retry_after: float | None = None
        self.opened = 0
        """How many times it opened (for metrics)."""

    @property
    def closed(self) -> bool:
        return self.state is BreakerState.CLOSED

    def record_success(self) -> None:
        """A batch reached the CRM. Closes a half-open breaker; an open one stays open
        (a batch started before it opened proves little; the probe decides)."""
        if self.state is BreakerState.OPEN:
            return
        self.state = BreakerState.CLOSED
        self.failures = 0
        self.trips = 0
        self.retry_after = None

    def record_failure(self, retry_after: float | None = None) -> bool:
        """A batch failed transiently. Returns whether the breaker is now open."""
        if retry_after is not None:
            self.retry_after = max(self.retry_after or 0.0, retry_after)
        if self.state is BreakerState.CLOSED:
            self.failures += 1
            if self.failures >= self.threshold or retry_after is not None:
                self._open()
        elif self.state is BreakerState.HALF_OPEN:
            self.trips += 1
            self.state = BreakerState.OPEN
        return self.state is BreakerState.OPEN

    def probe_delay(self) -> float:
        """Seconds to wait before the next ``ping``: exponential, capped, ≥ retry_after."""
        delay: float = min(self.max_delay, self.base_delay * 2.0 ** min(self.trips, 30))
        if self.retry_after is not None:
            delay = max(delay, min(self.retry_after, self.max_retry_after))
        return delay

    def probe_succeeded(self) -> None:
        """``ping`` answered: let one batch through."""
        if self.state is BreakerState.OPEN:
            self.state = BreakerState.HALF_OPEN
            self.retry_after = None

    def probe_failed(self, retry_after: float | None = None) -> None:
        """``ping`` failed: stay open, wait longer."""
        if self.state is BreakerState.OPEN:
            self.trips += 1
            self.retry_after = retry_after

    def _open(self) -> None:
        self.state = BreakerState.OPEN
        self.failures = 0
        self.trips = 0
        self.opened += 1
