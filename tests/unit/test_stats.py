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


def test_a_batch_is_counted_in_one_call_as_many_singles_would_be() -> None:
    # The runner counts a batch per outcome and label at once (a metrics update takes a
    # lock): the totals, the metrics and the ack rate must equal one call per message.
    grouped, single = Stats(), Stats()
    for stats in (grouped, single):
        stats.in_flight = 7
    grouped.settled(Outcome.ACK, "synced", 5)
    grouped.settled(Outcome.PARK, "invalid_json", 2)
    for _ in range(5):
        single.settled(Outcome.ACK, "synced")
    single.settled(Outcome.PARK, "invalid_json")
    single.settled(Outcome.PARK, "invalid_json")
    for stats in (grouped, single):
        assert stats.in_flight == 0
        assert stats.outcomes == {"ack": 5, "park": 2}
        assert stats.labels == {"synced": 5, "invalid_json": 2}
        assert stats.settled_total == 7
        assert sum(n for _, n in stats._acks) == 7
        sample = stats.registry.get_sample_value
        assert sample("proca_sync_messages_total", {"outcome": "ack", "label": "synced"}) == 5
        assert sample("proca_sync_messages_total", {"outcome": "park", "label": "invalid_json"}) == 2
