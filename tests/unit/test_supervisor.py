"""The supervisor's pure parts: ``--workers`` parsing and the sums over workers."""

from __future__ import annotations

import os

import pytest

from proca_sync.consumer.policy import Outcome
from proca_sync.consumer.status import Stats
from proca_sync.consumer.supervisor import WorkersStats, _Slot, parse_workers


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        pytest.param("1", 1, id="one"),
        pytest.param("3", 3, id="three"),
        pytest.param("auto", len(os.sched_getaffinity(0)), id="auto"),
        pytest.param(" AUTO ", len(os.sched_getaffinity(0)), id="auto-any-case"),
    ],
)
def test_parse_workers(text: str, expected: int) -> None:
    assert parse_workers(text) == expected


@pytest.mark.parametrize("text", ["0", "-2", "two", ""])
def test_parse_workers_refuses(text: str) -> None:
    with pytest.raises(ValueError, match="--workers"):
        parse_workers(text)


def _worker_stats(acked: int, parked: int) -> Stats:
    stats = Stats()
    for _ in range(acked + parked + 1):
        stats.delivered()
    for _ in range(acked):
        stats.settled(Outcome.ACK, "applied")
    for _ in range(parked):
        stats.settled(Outcome.PARK, "invalid_json")
    return stats  # one delivery still in flight


def test_totals_keep_the_counts_of_workers_that_ended() -> None:
    slots = [_Slot(0), _Slot(1)]
    stats = WorkersStats(slots)
    stats.retire(_worker_stats(5, 1).snapshot())  # a worker that died
    slots[1].snapshot = _worker_stats(7, 0).snapshot()  # the one running now
    totals = stats.totals()
    assert totals["acked"] == 12
    assert totals["parked"] == 1
    assert totals["by_label"] == {"applied": 12, "invalid_json": 1}
    # What the dead worker held went back to the queue: only the live one's in flight.
    assert totals["in_flight"] == 1
    metrics = stats.metrics().decode()
    # Counters of the dead worker stay in /metrics; no live process here, so only those.
    assert 'proca_sync_messages_total{label="applied",outcome="ack"} 5.0' in metrics
    assert "proca_sync_workers 0.0" in metrics
