"""Batched acks: one multiple-ack over the settled prefix, never past an unsettled tag."""

from __future__ import annotations

import random

from hypothesis import given, settings
from hypothesis import strategies as st

from proca_sync.consumer.intake import AckBook


def test_contiguous_acks_become_one_multiple_ack() -> None:
    book = AckBook()
    for tag in (3, 1, 2):
        book.ack(tag)
    assert book.frames() == [(3, True)]
    assert book.frames() == []


def test_a_gap_is_never_covered() -> None:
    book = AckBook()
    book.ack(1)
    book.ack(2)
    book.ack(4)  # 3 is still being handled
    assert book.frames() == [(2, True), (4, False)]
    book.ack(3)
    assert book.frames() == [(3, True)]  # 4 is already acked on its own


def test_multiple_ack_names_the_last_acked_tag_not_a_rejected_one() -> None:
    book = AckBook()
    book.ack(1)
    book.settled(2)  # rejected individually: acking tag 2 would be a broker error
    book.ack(3)
    assert book.frames() == [(3, True)]
    book.ack(5)
    book.settled(4)
    book.settled(6)
    assert book.frames() == [(5, True)]
    book.settled(7)
    assert book.frames() == []


def test_nothing_acked_nothing_sent() -> None:
    book = AckBook()
    book.settled(1)
    assert book.frames() == []
    assert book.pending == 0


@settings(max_examples=200, deadline=None)
@given(n=st.integers(min_value=1, max_value=60), seed=st.integers(0, 2**32))
def test_random_settlement_orders(n: int, seed: int) -> None:
    """Simulate the broker: every tag ends up settled exactly once, and an ack never
    covers a tag that is still unsettled at the broker."""
    rng = random.Random(seed)
    book = AckBook()
    unsettled = set(range(1, n + 1))  # what the broker still waits for
    decided: set[int] = set()
    order = list(range(1, n + 1))
    rng.shuffle(order)
    for tag in order:
        if rng.random() < 0.25:
            book.settled(tag)
            unsettled.discard(tag)  # reject sent on its own
        else:
            book.ack(tag)
            decided.add(tag)
        if rng.random() < 0.4:
            for frame_tag, multiple in book.frames(singles=rng.random() < 0.5):
                covered = {t for t in unsettled if t <= frame_tag} if multiple else {frame_tag}
                assert frame_tag in unsettled, "acking a tag the broker no longer holds"
                assert covered <= decided, "a multiple ack covered an undecided tag"
                unsettled -= covered
    for frame_tag, multiple in book.frames():
        covered = {t for t in unsettled if t <= frame_tag} if multiple else {frame_tag}
        assert frame_tag in unsettled
        assert covered <= decided
        unsettled -= covered
    assert unsettled == set()


def test_acks_behind_a_gap_can_wait_for_the_prefix() -> None:
    book = AckBook()
    book.ack(1)
    book.ack(3)
    book.ack(4)  # 2 is still being handled
    assert book.frames(singles=False) == [(1, True)]
    assert book.pending == 2  # 3 and 4 wait for 2
    book.ack(2)
    assert book.frames(singles=False) == [(4, True)]  # one frame covers 2, 3 and 4
    assert book.pending == 0


def test_held_acks_go_out_alone_when_asked() -> None:
    book = AckBook()
    book.ack(2)
    assert book.frames(singles=False) == []
    assert book.frames() == [(2, False)]
    book.ack(1)
    assert book.frames(singles=False) == [(1, True)]  # 2 is settled already: not named


def test_a_tag_settled_on_its_own_is_never_acked_after() -> None:
    """A rejected tag is gone at the broker: an ack noted for it before is dropped."""
    book = AckBook()
    book.ack(2)
    book.settled(2)
    assert book.pending == 0
    assert book.frames() == []
    book.ack(1)
    assert book.frames() == [(1, True)]  # 2 is not named
    book.settled(1)  # already settled: nothing changes
    book.ack(3)
    assert book.frames() == [(3, True)]


def test_a_tag_acked_again_is_not_sent_again() -> None:
    book = AckBook()
    book.ack(1)
    assert book.frames() == [(1, True)]
    book.ack(1)  # already acked at the broker: a second ack would close the channel
    assert book.pending == 0
    assert book.frames() == []


def test_after_a_single_ack_the_prefix_grows_past_it() -> None:
    """A tag acked on its own counts as settled: once the gap before it closes, later
    acks go out in one multiple ack again, not held or one by one."""
    book = AckBook()
    book.ack(2)
    assert book.frames() == [(2, False)]
    book.ack(1)
    book.ack(3)
    assert book.frames(singles=False) == [(3, True)]
    book.ack(4)
    assert book.frames(singles=False) == [(4, True)]
