"""Consumer statistics stay bounded however long the service runs."""

from __future__ import annotations

from proca_sync.consumer.policy import Outcome
from proca_sync.consumer.status import Stats


def test_rate_window_does_not_grow_without_a_reader() -> None:
    stats = Stats()
    stats.in_flight = 50_000
    for _ in range(50_000):
        stats.settled(Outcome.ACK, "synced")
    # Nobody called rate(): entries older than the window must still be dropped, so the
    # window holds at most what settled within it (all of these did: the loop is fast).
    first = stats._acks[0][0]
    stats._acks.appendleft((first - 3600.0, 1))
    stats.settled(Outcome.ACK, "synced")
    assert stats._acks[0][0] >= first
    assert stats.outcomes["ack"] == 50_001
