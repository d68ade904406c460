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


def test_after_discard_take_hands_a_lane_out_once() -> None:
    """Discarding behind a head re-queues the lane; the earlier queue entry for the same
    head must not make ``take`` hand the lane out twice, now or later."""
    lanes: Lanes[str] = Lanes()
    for lane, item in [("a", "a1"), ("a", "old-a2"), ("b", "old-b1"), ("b", "b2")]:
        lanes.push(lane, item)
    assert lanes.discard(lambda item: item.startswith("old")) == ["old-a2", "old-b1"]
    assert lanes.take(10) == [("a", "a1"), ("b", "b2")]
    assert lanes.take(10) == []
    assert not lanes.ready
    assert len(lanes) == 2 and lanes.busy == 2


def test_a_busy_lane_is_never_taken_even_after_discard_and_push() -> None:
    lanes: Lanes[str] = Lanes()
    lanes.push("a", "a1")
    lanes.push("a", "old-a2")
    lanes.discard(lambda item: item.startswith("old"))  # a second queue entry for a1
    assert lanes.take(1) == [("a", "a1")]
    lanes.push("a", "a3")
    lanes.push("a", "old-a4")
    assert lanes.discard(lambda item: item.startswith("old")) == ["old-a4"]
    assert lanes.take(10) == []  # a1 is still being handled
    assert not lanes.ready
    lanes.release("a")
    assert lanes.ready
    assert lanes.take(10) == [("a", "a1")]
    assert lanes.take(10) == []
    assert lanes.finish("a") == "a1"
    assert lanes.take(10) == [("a", "a3")]
    assert lanes.finish("a") == "a3"
    assert len(lanes) == 0 and lanes.busy == 0 and not lanes.ready
    assert list(lanes) == []


def test_discard_of_a_whole_lane_forgets_it_and_counts_right() -> None:
    lanes: Lanes[str] = Lanes()
    for lane, item in [("a", "old-a1"), ("b", "b1"), ("a", "old-a2")]:
        lanes.push(lane, item)
    assert len(lanes) == 3
    assert lanes.discard(lambda item: item.startswith("old")) == ["old-a1", "old-a2"]
    assert len(lanes) == 1 and sorted(lanes) == ["b1"]
    assert lanes.take(10) == [("b", "b1")]
    lanes.push("a", "a3")  # the lane starts afresh
    assert lanes.take(10) == [("a", "a3")]
    assert lanes.busy == 2


def test_release_of_a_lane_that_is_not_busy_is_an_error() -> None:
    lanes: Lanes[str] = Lanes()
    with pytest.raises(KeyError, match="lane is not busy"):
        lanes.release("nowhere")


@settings(max_examples=200, deadline=None)
@given(
    ops=st.lists(
        st.tuples(st.sampled_from(["push", "take", "done", "again", "discard"]),
                  st.integers(min_value=0, max_value=5)),
        min_size=1, max_size=120,
    ),
)
def test_random_schedules_with_discards_never_hand_out_a_busy_lane_or_an_item_twice(
    ops: list[tuple[str, int]],
) -> None:
    """Pushes, takes, finishes, releases and discards in any order: a lane is never in
    two hands, an item is handed out again only after a release, discarded items are
    never handed out, and every item ends handled or discarded, each lane in push order."""
    lanes: Lanes[tuple[str, int]] = Lanes()
    pushed: dict[str, list[int]] = {}
    in_progress: dict[str, tuple[str, int]] = {}
    handled: dict[str, list[int]] = {}
    discarded: set[int] = set()
    n = 0
    for op, arg in ops:
        lane = f"lane{arg % 4}"
        if op == "push":
            n += 1
            lanes.push(lane, (lane, n))
            pushed.setdefault(lane, []).append(n)
        elif op == "take":
            taken = lanes.take(arg + 1)
            assert len({lane for lane, _ in taken}) == len(taken)
            for got_lane, item in taken:
                assert got_lane not in in_progress, "a busy lane was taken"
                assert item[1] not in discarded
                assert item[1] not in handled.get(got_lane, [])
                in_progress[got_lane] = item
        elif op in ("done", "again") and in_progress:
            got_lane = sorted(in_progress)[arg % len(in_progress)]
            item = in_progress.pop(got_lane)
            if op == "again":
                lanes.release(got_lane)
            else:
                assert lanes.finish(got_lane) == item
                handled.setdefault(got_lane, []).append(item[1])
        elif op == "discard":
            busy = {item[1] for item in in_progress.values()}
            gone = lanes.discard(lambda item, m=arg: item[1] % 3 == m % 3)
            assert [i for _, i in gone] == sorted(i for _, i in gone)
            assert not busy & {i for _, i in gone}
            discarded |= {i for _, i in gone}
        assert lanes.busy == len(in_progress)
    # drain what is left
    while len(lanes):
        for got_lane, item in lanes.take(10):
            assert got_lane not in in_progress
            in_progress[got_lane] = item
        for got_lane in sorted(in_progress):
            handled.setdefault(got_lane, []).append(lanes.finish(got_lane)[1])
        in_progress.clear()
    for lane, items in pushed.items():
        assert handled.get(lane, []) == [i for i in items if i not in discarded]


def test_after_discard_the_oldest_remaining_head_is_taken_first() -> None:
    lanes: Lanes[str] = Lanes()
    for lane, item in [("a", "old-a1"), ("b", "b2"), ("a", "a3")]:
        lanes.push(lane, item)
    lanes.discard(lambda item: item.startswith("old"))
    # a's queue entry still names old-a1's place (first); a3 is younger than b2
    assert lanes.take(1) == [("b", "b2")]
    assert lanes.take(1) == [("a", "a3")]


def test_ready_is_false_while_the_only_queued_lane_is_busy() -> None:
    """A discard re-queues a lane whose earlier queue entry is still there; once the lane
    is taken, that leftover entry must not make ``ready`` say yes (the runner would wake
    its workers for nothing)."""
    lanes: Lanes[str] = Lanes()
    lanes.push("a", "a1")
    lanes.push("a", "old-a2")
    lanes.discard(lambda item: item.startswith("old"))  # a queued twice for a1
    assert lanes.take(1) == [("a", "a1")]
    assert not lanes.ready  # the second entry names a busy lane
    assert lanes.take(10) == []
    lanes.release("a")
    assert lanes.ready


def test_discard_looks_at_every_lane_after_one_without_a_match() -> None:
    lanes: Lanes[str] = Lanes()
    for lane, item in [("a", "a1"), ("b", "old-b1"), ("c", "c1"), ("d", "old-d1")]:
        lanes.push(lane, item)
    assert lanes.discard(lambda item: item.startswith("old")) == ["old-b1", "old-d1"]
    assert len(lanes) == 2
    assert lanes.take(10) == [("a", "a1"), ("c", "c1")]
