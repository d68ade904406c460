"""The circuit breaker's state machine."""

from __future__ import annotations

import pytest

from proca_sync.consumer.breaker import Breaker, BreakerState


def test_opens_after_threshold_consecutive_failures() -> None:
    breaker = Breaker(threshold=3)
    assert not breaker.record_failure()
    assert not breaker.record_failure()
    assert breaker.state is BreakerState.CLOSED
    assert breaker.record_failure()
    assert breaker.state is BreakerState.OPEN and breaker.opened == 1


def test_success_resets_the_count() -> None:
    breaker = Breaker(threshold=3)
    breaker.record_failure()
    breaker.record_failure()
    breaker.record_success()
    breaker.record_failure()
    breaker.record_failure()
    assert breaker.closed


def test_retry_after_opens_at_once_and_sets_the_delay() -> None:
    breaker = Breaker(threshold=3, max_delay=10)
    assert breaker.record_failure(retry_after=42.0)
    assert breaker.probe_delay() == 42.0  # honoured above the cap


def test_retry_after_is_bounded() -> None:
    breaker = Breaker(max_retry_after=300)
    breaker.record_failure(retry_after=1e9)
    assert breaker.probe_delay() == 300


def test_probe_delays_grow_exponentially_to_the_cap() -> None:
    breaker = Breaker(threshold=1, base_delay=0.5, max_delay=10)
    breaker.record_failure()
    delays = []
    for _ in range(8):
        delays.append(breaker.probe_delay())
        breaker.probe_failed()
    assert delays == [0.5, 1, 2, 4, 8, 10, 10, 10]


def test_half_open_success_closes() -> None:
    breaker = Breaker(threshold=1)
    breaker.record_failure()
    breaker.probe_succeeded()
    assert breaker.state is BreakerState.HALF_OPEN
    breaker.record_success()
    assert breaker.state is BreakerState.CLOSED
    assert breaker.probe_delay() == breaker.base_delay


def test_half_open_failure_reopens_with_a_longer_delay() -> None:
    breaker = Breaker(threshold=1, base_delay=1, max_delay=10)
    breaker.record_failure()
    first = breaker.probe_delay()
    breaker.probe_succeeded()
    assert breaker.record_failure()
    assert breaker.state is BreakerState.OPEN
    assert breaker.probe_delay() > first


def test_late_success_of_an_older_batch_does_not_close_an_open_breaker() -> None:
    breaker = Breaker(threshold=1)
    breaker.record_failure()
    breaker.record_success()
    assert breaker.state is BreakerState.OPEN


def test_failures_while_open_do_not_count_again() -> None:
    breaker = Breaker(threshold=2)
    breaker.record_failure()
    breaker.record_failure()
    breaker.record_failure()
    assert breaker.opened == 1


def test_probe_success_on_a_closed_breaker_changes_nothing() -> None:
    breaker = Breaker()
    breaker.probe_succeeded()
    breaker.probe_failed()
    assert breaker.closed


@pytest.mark.parametrize(
    "kwargs",
    [{"threshold": 0}, {"base_delay": 0}, {"base_delay": 5, "max_delay": 1}],
)
def test_invalid_settings(kwargs: dict[str, float]) -> None:
    with pytest.raises(ValueError, match="breaker"):
        Breaker(**kwargs)  # type: ignore[arg-type]
