"""Contact identity keys and newest-wins merging (sync/contacts.py), value by value."""

from __future__ import annotations

from typing import Any

import pytest

from proca_sync.sync.contacts import ContactState, normalise_email, stamp, timestamp_key
from proca_sync.sync.records import ConsentFact, ContactFacts, StatusFact


@pytest.mark.parametrize(
    ("email", "key"),
    [
        (None, None),
        ("", None),
        ("   ", None),
        ("  Ada@Example.ORG \n", "ada@example.org"),
        ("ada@example.org", "ada@example.org"),
    ],
)
def test_normalise_email(email: str | None, key: str | None) -> None:
    assert normalise_email(email) == key


@pytest.mark.parametrize(
    ("value", "key"),
    [
        (None, ""),
        ("", ""),
        ("2024-01-02T03:04:05Z", "2024-01-02T03:04:05.000000Z"),
        ("2024-01-02T03:04:05.123456Z", "2024-01-02T03:04:05.123456Z"),
        ("2024-01-02T05:04:05.5+02:00", "2024-01-02T03:04:05.500000Z"),
        ("2024-01-02T03:04:05", "2024-01-02T03:04:05.000000Z"),  # no zone: UTC
        ("2024-01-02T03:04:05.123Z", "2024-01-02T03:04:05.123000Z"),
    ],
)
def test_timestamp_key_is_fixed_width_utc(value: str | None, key: str) -> None:
    assert timestamp_key(value) == key


def test_stamp_orders_time_then_rank_then_id() -> None:
    assert stamp("T", 1, 42) == "T|1|00000000000000000042"
    assert stamp("T", 0, None) == "T|0|00000000000000000000"
    assert stamp("T", 0, 9) < stamp("T", 0, 10) < stamp("T", 1, 1) < stamp("U", 0, 1)


def facts(
    stamp_: str,
    *,
    refs: tuple[str, ...] = ("r1",),
    emails: tuple[str, ...] = (),
    fields: dict[str, Any] | None = None,
    admit: bool = False,
    real: bool = False,
    consent: ConsentFact | None = None,
    status: StatusFact | None = None,
) -> ContactFacts:
    return ContactFacts(
        refs=frozenset(refs), emails=frozenset(emails), fields=fields or {}, stamp=stamp_,
        admit=admit, real=real, consent=consent, status=status,
    )


def test_absorb_keeps_the_newest_value_of_each_field_and_breaks_ties_by_value() -> None:
    state = ContactState()
    state.absorb(facts("2", fields={"city": "Bern", "zip": "3000"}))
    state.absorb(facts("1", fields={"city": "Old", "phone": "1"}))  # older: only fills gaps
    assert state.fields == {"city": ("Bern", "2"), "zip": ("3000", "2"), "phone": ("1", "1")}
    state.absorb(facts("2", fields={"zip": "2999"}))  # same stamp: greater JSON wins
    assert state.value("zip") == "3000"
    state.absorb(facts("2", fields={"zip": "3001"}))
    assert state.value("zip") == "3001"
    assert state.value("nothing") is None


def test_absorb_and_join_collect_identities_and_flags() -> None:
    state = ContactState()
    state.absorb(facts("1", refs=("a",), emails=("a@x",), admit=True))
    state.absorb(facts("1", refs=("b",), real=True))
    assert state.refs == {"a", "b"} and state.emails == {"a@x"}
    assert state.admitted and state.real
    other = ContactState()
    other.absorb(facts("1", refs=("c",), emails=("c@x",)))
    other.join(state)
    assert other.refs == {"a", "b", "c"} and other.emails == {"a@x", "c@x"}
    assert other.admitted and other.real
    none = ContactState()
    none.join(ContactState())
    assert not none.admitted and not none.real and not none.opted_in


def test_consent_opts_in_with_the_earliest_time_and_an_opt_out_changes_nothing() -> None:
    state = ContactState()
    state.absorb(facts("1", consent=ConsentFact(1, False, "2024-01-01T00:00:00Z")))
    assert not state.opted_in and state.opt_in_at is None
    state.absorb(facts("1", consent=ConsentFact(2, True, None)))
    assert state.opted_in and state.opt_in_at is None
    state.absorb(facts("1", consent=ConsentFact(3, True, "2024-02-01T00:00:00Z")))
    state.absorb(facts("1", consent=ConsentFact(4, True, "2024-03-01T00:00:00Z")))
    assert state.opt_in_at == "2024-02-01T00:00:00Z"
    state.absorb(facts("1", consent=ConsentFact(5, True, "2024-01-15T00:00:00Z")))
    assert state.opt_in_at == "2024-01-15T00:00:00Z"

    other = ContactState()
    other.join(state)
    assert other.opted_in and other.opt_in_at == "2024-01-15T00:00:00Z"
    later = ContactState(opted_in=True, opt_in_at="2024-06-01T00:00:00Z")
    other.join(later)
    assert other.opt_in_at == "2024-01-15T00:00:00Z"
    no_time = ContactState(opted_in=True)
    no_time.join(ContactState(opted_in=True, opt_in_at="2024-06-01T00:00:00Z"))
    assert no_time.opt_in_at == "2024-06-01T00:00:00Z"
    keeps = ContactState()
    keeps.join(ContactState(opted_in=False, opt_in_at="2024-06-01T00:00:00Z"))
    assert not keeps.opted_in and keeps.opt_in_at is None


def status(value: str | None, stamp_: str) -> StatusFact:
    return StatusFact(status=value, changed_at=stamp_[:4], stamp=stamp_, source="event")


def test_the_status_with_the_greater_stamp_wins_in_absorb_and_join() -> None:
    state = ContactState()
    state.absorb(facts("1", status=status("unsub", "2024|3|unsub")))
    state.absorb(facts("1", status=status("double_opt_in", "2023|1|double_opt_in")))
    assert (state.status, state.status_changed, state.status_stamp) == (
        "unsub", "2024", "2024|3|unsub")
    state.absorb(facts("1", status=status("unsub", "2024|3|unsub")))  # equal: no change
    assert state.status == "unsub"

    other = ContactState()
    other.absorb(facts("1", status=status("double_opt_in", "2023|1|double_opt_in")))
    other.join(state)
    assert (other.status, other.status_changed, other.status_stamp) == (
        "unsub", "2024", "2024|3|unsub")
    other.join(ContactState(status="bounce", status_changed="2022", status_stamp="2022|3|b"))
    assert other.status == "unsub"
    assert not other.subscribed


def test_a_tie_between_object_values_ignores_their_key_order() -> None:
    """The same stamp: the greater canonical JSON (keys sorted) wins, so the winner does
    not depend on how a producer ordered the keys, nor on arrival order."""
    a = {"b": 1, "a": 2}  # canonical {"a":2,"b":1}
    b = {"a": 3}  # canonical {"a":3}: greater
    for first, second in ((a, b), (b, a)):
        state = ContactState()
        state.absorb(facts("2", fields={"address": first}))
        state.absorb(facts("2", fields={"address": second}))
        assert state.value("address") == b


def test_join_keeps_the_newer_value_of_each_field_from_either_side() -> None:
    state = ContactState()
    state.absorb(facts("2", fields={"city": "Bern"}))
    other = ContactState()
    other.absorb(facts("1", fields={"city": "Old", "phone": "1"}))
    state.join(other)
    assert state.fields == {"city": ("Bern", "2"), "phone": ("1", "1")}
    newer = ContactState()
    newer.absorb(facts("3", fields={"city": "Basel"}))
    state.join(newer)
    assert state.value("city") == "Basel"
