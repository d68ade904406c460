"""The dashboard's history: rates from counters, gaps, counter resets, the window, and
the samples kept across a restart of the console (a real SQLite file)."""

from __future__ import annotations

from pathlib import Path

import pytest

from proca_sync.web.history import History, Reading, Sample, combine, parse_metrics

T0 = 1_800_000_000.0


def reading(acked: float, retried: float = 0, parked: float = 0, depth: int = 0) -> Reading:
    return Reading(acked=acked, retried=retried, parked=parked, depth=depth)


def history(tmp_path: Path, **kwargs: float) -> History:
    store = History(f"sqlite:///{tmp_path / 'web.db'}", interval=5.0, **kwargs)
    store.open_sync(now=T0)
    return store


def test_rates_come_from_consecutive_counters(tmp_path: Path) -> None:
    h = history(tmp_path)
    h.record(Sample(T0, reading(0)))
    h.record(Sample(T0 + 5, reading(50, 5, 5, depth=7), lags={"brevo": 2.0}))
    series = h.series()
    assert series["t"] == [T0, T0 + 5]
    assert series["rate"] == [None, 12.0]
    assert (series["acked"][1], series["retried"][1], series["parked"][1]) == (10.0, 1.0, 1.0)
    assert series["depth"] == [0, 7]
    assert series["lag"] == {"brevo": [None, 2.0]}
    assert h.rate() == 12.0


@pytest.mark.parametrize(
    ("second", "expected"),
    [
        pytest.param(Sample(T0 + 5, reading(20)), 4.0, id="counter-reset-counts-from-zero"),
        pytest.param(Sample(T0 + 60, reading(200)), None, id="gap-after-downtime"),
        pytest.param(Sample(T0 + 5, None, error="down"), None, id="consumer-unreachable"),
    ],
)
def test_resets_gaps_and_outages(tmp_path: Path, second: Sample, expected: float | None) -> None:
    h = history(tmp_path)
    h.record(Sample(T0, reading(100)))
    h.record(second)
    assert h.series()["rate"][-1] == expected


def test_samples_survive_a_restart_and_the_window_is_kept(tmp_path: Path) -> None:
    h = history(tmp_path, window=60.0)
    for i in range(20):  # 100 s of samples in a 60 s window
        h.record(Sample(T0 + 5 * i, reading(10 * i)))
    assert h.samples()[0].at == T0 + 35  # the last 60 s, both ends included
    h.close()
    again = History(f"sqlite:///{tmp_path / 'web.db'}", window=60.0, interval=5.0)
    again.open_sync(now=T0 + 95)
    assert [s.at for s in again.samples()] == [T0 + 5 * i for i in range(7, 20)]
    assert again.series()["rate"][-1] == 2.0
    again.open_sync(now=T0 + 1000)  # opened long after: nothing recent
    assert again.samples() == []


def test_metrics_text_and_several_consumers() -> None:
    text = (
        "# TYPE proca_sync_messages_total counter\n"
        'proca_sync_messages_total{outcome="ack",label="ok"} 7\n'
        'proca_sync_messages_total{outcome="ack",label="dup"} 3\n'
        'proca_sync_messages_total{outcome="park",label="x"} 1\n'
        "# TYPE proca_sync_queue_depth gauge\nproca_sync_queue_depth 4\n"
        "# TYPE proca_sync_in_flight gauge\nproca_sync_in_flight 2\n"
        "# TYPE proca_sync_connected gauge\nproca_sync_connected 1\n"
        "# TYPE proca_sync_breaker_state gauge\n"
        'proca_sync_breaker_state{state="closed"} 0\nproca_sync_breaker_state{state="open"} 1\n'
    )
    one = parse_metrics(text)
    assert (one.acked, one.parked, one.depth, one.in_flight, one.breaker) == (10, 1, 4, 2, "open")
    two = combine([one, Reading(acked=5, retried=1, parked=0, depth=6, in_flight=1,
                                connected=False, breaker="closed")])  # fmt: skip
    assert (two.acked, two.retried, two.depth, two.in_flight) == (15, 1, 6, 3)
    assert two.connected is False and two.breaker == "open"
