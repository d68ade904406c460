"""The status stamp: at one change time an objection beats an unknown status beats a
confirmation beats no status, whatever the arrival order (sync.md §6)."""

from __future__ import annotations

import pytest

from proca_sync.sync.consent import is_subscribed, status_stamp

T = "2024-03-01T00:00:00.000000Z"


@pytest.mark.parametrize(
    ("status", "stamp"),
    [
        pytest.param(None, f"{T}|0|", id="none"),
        pytest.param("active", f"{T}|0|active", id="active"),
        pytest.param("double_opt_in", f"{T}|1|double_opt_in", id="doi"),
        pytest.param("weird", f"{T}|2|weird", id="unknown"),
        *[pytest.param(s, f"{T}|3|{s}", id=s) for s in ("bounce", "blocked", "spam", "unsub",
                                                          "inactive")],
    ],
)
def test_status_stamp_is_time_then_severity_then_value(status: str | None, stamp: str) -> None:
    assert status_stamp(status, T) == stamp


def test_at_one_time_the_stricter_status_sorts_last_and_a_later_time_beats_any() -> None:
    order = [None, "active", "double_opt_in", "weird", "unsub"]
    stamps = [status_stamp(status, T) for status in order]
    assert sorted(stamps) == stamps
    later = status_stamp(None, "2024-03-01T00:00:00.000001Z")
    assert later > max(stamps)


def test_neutral_statuses_follow_the_consent_and_double_opt_in_subscribes() -> None:
    for status in (None, "active"):
        assert is_subscribed(opted_in=True, email_status=status) is True
        assert is_subscribed(opted_in=False, email_status=status) is False
    assert is_subscribed(opted_in=False, email_status="double_opt_in") is True
    assert is_subscribed(opted_in=True, email_status="unsub") is False
