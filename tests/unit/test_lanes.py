"""Per-lane ordering: heads of distinct lanes only, in push order, one at a time per lane."""

from __future__ import annotations

import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from proca_sync.consumer.lanes import Lanes


def test_take_gives_heads_of_distinct_lanes_oldest_first() -> None:
    lanes: Lanes[str] = Lanes()
    for lane, item in [("a", "a1"), ("b", "b1"), ("a", "a2"), ("c", "c1"), ("b", "b2")]:
        lanes.push(lane, item)
    assert lanes.take(10) == [("a", "a1"), ("b", "b1"), ("c", "c1")]
    assert lanes.take(10) == []  # every lane is busy
    assert len(lanes) == 5 and lanes.busy == 3


def test_batch_limit() -> None:
    lanes: Lanes[int] = Lanes()
    for n in range(10):
        lanes.push(f"l{n}", n)
    assert [item for _, item in lanes.take(4)] == [0, 1, 2, 3]
    assert [item for _, item in lanes.take(4)] == [4, 5, 6, 7]
    assert [item for _, item in lanes.take(4)] == [8, 9]


def test_finish_frees_the_lane_for_its_next_item() -> None:
    lanes: Lanes[str] = Lanes()
    lanes.push("a", "a1")
    lanes.push("a", "a2")
    assert lanes.take(5) == [("a", "a1")]
    assert lanes.take(5) == []
    assert lanes.finish("a") == "a1"
    assert lanes.take(5) == [("a", "a2")]
    lanes.finish("a")
    assert len(lanes) == 0 and not lanes.ready


def test_release_keeps_the_head_in_front() -> None:
    lanes: Lanes[str] = Lanes()
    lanes.push("a", "a1")
    lanes.push("a", "a2")
    lanes.push("b", "b1")
    assert lanes.take(1) == [("a", "a1")]
    lanes.release("a")  # e.g. held while the breaker is open
    assert lanes.take(5) == [("a", "a1"), ("b", "b1")]


def test_finish_of_a_lane_that_is_not_busy_is_an_error() -> None:
    lanes: Lanes[str] = Lanes()
    lanes.push("a", "a1")
    with pytest.raises(KeyError):
        lanes.finish("a")


def test_drain_leaves_busy_heads_and_returns_the_rest_in_push_order() -> None:
    lanes: Lanes[str] = Lanes()
    for lane, item in [("a", "a1"), ("b", "b1"), ("a", "a2"), ("b", "b2"), ("c", "c1")]:
        lanes.push(lane, item)
    lanes.take(1)  # a1 busy
    assert lanes.drain() == ["b1", "a2", "b2", "c1"]
    assert len(lanes) == 1
    assert lanes.finish("a") == "a1"
    assert len(lanes) == 0


def test_discard_removes_matching_items_behind_busy_heads() -> None:
    lanes: Lanes[str] = Lanes()
    for lane, item in [("a", "old-a1"), ("a", "old-a2"), ("a", "new-a1"), ("b", "old-b1")]:
        lanes.push(lane, item)
    lanes.take(1)  # old-a1 is being handled: it stays
    assert lanes.discard(lambda item: item.startswith("old")) == ["old-a2", "old-b1"]
    lanes.finish("a")
    assert lanes.take(5) == [("a", "new-a1")]


@settings(max_examples=200, deadline=None)
@given(
    pushes=st.lists(st.integers(min_value=0, max_value=7), min_size=1, max_size=80),
    seed=st.integers(min_value=0, max_value=2**32),
    batch=st.integers(min_value=1, max_value=5),
)
def test_random_schedules_keep_each_lane_in_order_and_exclusive(
    pushes: list[int], seed: int, batch: int
) -> None:
    """Any interleaving of takes, finishes and releases: per lane, items are handled in
    push order, never two at once, and every item is handled exactly once."""
    rng = random.Random(seed)
    lanes: Lanes[tuple[str, int]] = Lanes()
    expected: dict[str, list[int]] = {}
    for n, lane_no in enumerate(pushes):
        lane = f"lane{lane_no}"
        lanes.push(lane, (lane, n))
        expected.setdefault(lane, []).append(n)
    handled: dict[str, list[int]] = {}
    in_progress: dict[str, tuple[str, int]] = {}
    while len(lanes):
        if in_progress and (rng.random() < 0.5 or not lanes.ready):
            lane = rng.choice(sorted(in_progress))
            item = in_progress.pop(lane)
            if rng.random() < 0.2:
                lanes.release(lane)  # not done: stays at the head
                continue
            assert lanes.finish(lane) == item
            handled.setdefault(lane, []).append(item[1])
            continue
        for lane, item in lanes.take(batch):
            assert lane not in in_progress, "two items of one lane at once"
            assert item[0] == lane
            in_progress[lane] = item
    assert handled == expected
