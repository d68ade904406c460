"""The outcome policy: one table from handling result to ack / retry / park / hold."""

from __future__ import annotations

import datetime as dt
from typing import Any

import pytest

from proca_sync.consumer.policy import ATTEMPTS_HEADER, Outcome, attempts_of, decide
from proca_sync.crm.base import NullBackend
from proca_sync.engine import Engine
from proca_sync.errors import (
    BackendRejectedError,
    BackendUnavailableError,
    ConfigError,
    DecodeError,
    DecryptError,
    PermanentError,
    Reason,
    TransientError,
)
from proca_sync.sync.records import Ignored, IgnoreReason

MAX = 48


@pytest.mark.parametrize(
    ("result", "attempts", "closed", "outcome", "label", "reason"),
    [
        pytest.param("applied", 0, True, Outcome.ACK, "applied", None, id="applied"),
        pytest.param("duplicate", 3, True, Outcome.ACK, "duplicate", None, id="duplicate"),
        pytest.param("applied", 0, False, Outcome.ACK, "applied", None, id="applied-breaker-open"),
        pytest.param(
            Ignored(IgnoreReason.CONFIRM_CREATED), 0, True, Outcome.ACK,
            "ignored:confirm_created", None, id="ignored",
        ),
        pytest.param(
            DecodeError("x", reason=Reason.INVALID_JSON), 0, True, Outcome.PARK,
            "invalid_json", Reason.INVALID_JSON, id="bad-json",
        ),
        pytest.param(
            DecodeError("x", reason=Reason.UNKNOWN_SCHEMA), 0, True, Outcome.PARK,
            "unknown_schema", Reason.UNKNOWN_SCHEMA, id="unknown-schema",
        ),
        pytest.param(
            DecryptError("x", reason=Reason.DECRYPT_FAILED), 0, True, Outcome.PARK,
            "decrypt_failed", Reason.DECRYPT_FAILED, id="tampered",
        ),
        pytest.param(
            DecryptError("x", reason=Reason.UNKNOWN_KEY), 0, True, Outcome.PARK,
            "unknown_key", Reason.UNKNOWN_KEY, id="missing-key",
        ),
        pytest.param(
            BackendRejectedError("422"), 0, True, Outcome.PARK,
            "crm_rejected", Reason.CRM_REJECTED, id="crm-validation",
        ),
        pytest.param(
            PermanentError("x", reason=Reason.MISSING_FIELD), 0, False, Outcome.PARK,
            "missing_field", Reason.MISSING_FIELD, id="permanent-even-when-open",
        ),
        pytest.param(
            BackendUnavailableError("down"), 0, True, Outcome.RETRY,
            "BackendUnavailableError", None, id="crm-down-first",
        ),
        pytest.param(
            BackendUnavailableError("429", retry_after=5), MAX - 1, True, Outcome.RETRY,
            "BackendUnavailableError", None, id="last-retry",
        ),
        pytest.param(
            BackendUnavailableError("down"), MAX, True, Outcome.PARK,
            "retries_exhausted", Reason.RETRIES_EXHAUSTED, id="exhausted",
        ),
        pytest.param(
            TransientError("locked"), MAX + 10, False, Outcome.HOLD,
            "held", None, id="breaker-open-holds-even-past-budget",
        ),
        pytest.param(
            BackendUnavailableError("down"), 0, False, Outcome.HOLD, "held", None, id="held",
        ),
        pytest.param(
            RuntimeError("bug"), 0, True, Outcome.RETRY, "RuntimeError", None,
            id="unexpected-is-transient",
        ),
        pytest.param(
            KeyError("bug"), MAX, True, Outcome.PARK, "retries_exhausted",
            Reason.RETRIES_EXHAUSTED, id="unexpected-exhausted",
        ),
        pytest.param(
            ConfigError("?"), 0, True, Outcome.RETRY, "ConfigError", None, id="config-per-message",
        ),
    ],
)
def test_decide(
    result: Any, attempts: int, closed: bool, outcome: Outcome, label: str, reason: Reason | None
) -> None:
    decision = decide(result, attempts=attempts, max_retries=MAX, breaker_closed=closed)
    assert decision.outcome is outcome
    assert decision.label == label
    assert decision.reason == reason


def test_exhausted_keeps_last_error_text() -> None:
    decision = decide(BackendUnavailableError("database unavailable (OperationalError)"),
                      attempts=2, max_retries=2)
    assert decision.outcome is Outcome.PARK
    assert "after 3 attempt(s)" in decision.detail
    assert "database unavailable (OperationalError)" in decision.detail


def test_foreign_error_text_is_not_copied() -> None:
    # A foreign exception may quote a payload: only its class is kept.
    decision = decide(ValueError("jane@example.org"), attempts=5, max_retries=5)
    assert "jane@example.org" not in decision.detail
    assert "ValueError" in decision.detail


def test_zero_max_retries_parks_first_failure() -> None:
    assert decide(TransientError("x"), attempts=0, max_retries=0).outcome is Outcome.PARK


def test_every_prepare_failure_of_the_fixtures_variants_parks(load_fixture: Any) -> None:
    """The engine's own permanent failures all map to PARK with their reason code."""
    engine = Engine(backend=NullBackend())
    bodies = [b"{", b"[]", b'{"schema": "proca:action:9"}', load_fixture("event.json")[:40]]
    for body in bodies:
        with pytest.raises(PermanentError) as caught:
            engine.prepare(body)
        decision = decide(caught.value, attempts=0, max_retries=MAX)
        assert decision.outcome is Outcome.PARK
        assert decision.reason is caught.value.reason


# ---- attempts --------------------------------------------------------------------------------

Q = "cus.320.deliver"
NOW = dt.datetime(2024, 1, 1, tzinfo=dt.UTC)


def death(queue: str, reason: str, count: int) -> dict[str, Any]:
    return {"count": count, "queue": queue, "reason": reason, "exchange": "", "time": NOW,
            "routing-keys": [queue]}


@pytest.mark.parametrize(
    ("headers", "expected"),
    [
        pytest.param(None, 0, id="no-headers"),
        pytest.param({}, 0, id="empty"),
        pytest.param({"x-death": []}, 0, id="empty-x-death"),
        pytest.param(
            {"x-death": [death(Q, "rejected", 7), death("org.320.fail", "expired", 7)]}, 7,
            id="proca-circuit",
        ),
        pytest.param(
            {"x-death": [death("org.320.fail", "expired", 9), death(Q, "rejected", 4)]}, 4,
            id="own-entry-wins-over-first",
        ),
        pytest.param(
            {"x-death": [death("other", "rejected", 2), death("org.320.fail", "expired", 5)]}, 5,
            id="fallback-max",
        ),
        pytest.param({ATTEMPTS_HEADER: 3}, 3, id="local-header"),
        pytest.param(
            {ATTEMPTS_HEADER: 2, "x-death": [death(Q, "rejected", 6)]}, 6, id="larger-of-both",
        ),
        pytest.param({ATTEMPTS_HEADER: True}, 0, id="bool-is-not-a-count"),
        pytest.param({ATTEMPTS_HEADER: "5"}, 0, id="string-is-not-a-count"),
        pytest.param({ATTEMPTS_HEADER: -4}, 0, id="negative"),
        pytest.param({"x-death": "garbage"}, 0, id="garbage"),
    ],
)
def test_attempts_of(headers: dict[str, Any] | None, expected: int) -> None:
    assert attempts_of(headers, Q) == expected


# ---- what is logged and stored with each decision ------------------------------------------


@pytest.mark.parametrize(
    ("result", "attempts", "closed", "detail"),
    [
        pytest.param("applied", 0, True, "", id="applied"),
        pytest.param(Ignored(IgnoreReason.SYSTEM), 0, True, "", id="ignored"),
        pytest.param(DecodeError("x", reason=Reason.INVALID_JSON), 0, True,
                     "DecodeError: invalid_json: x", id="permanent"),
        pytest.param(BackendUnavailableError("down"), 0, False,
                     "BackendUnavailableError: down", id="held"),
        pytest.param(BackendUnavailableError("down"), 1, True,
                     "BackendUnavailableError: down", id="retry"),
        pytest.param(KeyError("jane@example.org"), 1, True, "KeyError", id="retry-foreign"),
        pytest.param(TransientError("locked"), 2, True,
                     "after 3 attempt(s): TransientError: locked", id="exhausted"),
    ],
)
def test_decision_detail(result: Any, attempts: int, closed: bool, detail: str) -> None:
    decision = decide(result, attempts=attempts, max_retries=2, breaker_closed=closed)
    assert decision.detail == detail


def test_the_breaker_is_closed_unless_told() -> None:
    assert decide(TransientError("x"), attempts=0, max_retries=1).outcome is Outcome.RETRY
    assert decide(TransientError("x"), attempts=1, max_retries=1).outcome is Outcome.PARK
