"""The engine's decisions, message by message (pure: no database)."""

from __future__ import annotations

from typing import Any

import orjson
import pytest

from proca_sync.errors import DecodeError, Reason
from proca_sync.messages import decode
from proca_sync.sync import (
    ContactState,
    Ignored,
    IgnoreReason,
    Mode,
    Options,
    SyncRecord,
    body_digest,
    is_subscribed,
    model_message,
)
from tests.conftest import fixture_bytes
from tests.support.builders import action, campaign_updated, dumps, email_status


def model(message: dict[str, Any] | bytes, **options: Any) -> SyncRecord | Ignored:
    body = message if isinstance(message, bytes) else dumps(message)
    return model_message(decode(body), Options(**options), digest=body_digest(body))


SIGNED = dict(ref="A" * 43, email="ada@example.org", created="2024-01-01T10:00:00Z")


@pytest.mark.parametrize(
    ("mode", "privacy", "synced"),
    [
        pytest.param(Mode.ALL, {"with_consent": False, "opt_in": None}, True, id="all-followup"),
        pytest.param(
            Mode.CONTACT, {"with_consent": True, "opt_in": False}, True, id="contact-consent"
        ),
        pytest.param(
            Mode.CONTACT, {"with_consent": False, "opt_in": True}, False, id="contact-followup"
        ),
        pytest.param(Mode.OPT_IN, {"with_consent": True, "opt_in": True}, True, id="optin-yes"),
        pytest.param(Mode.OPT_IN, {"with_consent": True, "opt_in": False}, False, id="optin-no"),
        pytest.param(
            Mode.OPT_IN, {"with_consent": True, "opt_in": None}, False, id="optin-not-asked"
        ),
        pytest.param(
            Mode.OPT_IN,
            {"with_consent": False, "opt_in": True},
            True,
            id="optin-followup-of-optedin",
        ),
        pytest.param(
            Mode.OPT_IN,
            {
                "with_consent": True,
                "opt_in": False,
                "email_status": "double_opt_in",
                "status_changed": "2024-01-02T00:00:00Z",
            },
            True,
            id="optin-doi-without-box",
        ),
        pytest.param(
            Mode.DOUBLE_OPT_IN, {"with_consent": True, "opt_in": True}, False, id="doi-unconfirmed"
        ),
        pytest.param(
            Mode.DOUBLE_OPT_IN,
            {
                "with_consent": False,
                "opt_in": False,
                "email_status": "double_opt_in",
                "status_changed": "2024-01-02T00:00:00Z",
            },
            True,
            id="doi-followup",
        ),
    ],
)
def test_modes(mode: Mode, privacy: dict[str, Any], synced: bool) -> None:
    result = model(action(1, **SIGNED, **privacy), mode=mode)
    if synced:
        assert (
            isinstance(result, SyncRecord) and result.contact is not None and result.contact.admit
        )
    else:
        assert result == Ignored(IgnoreReason.MODE, mode.value)


@pytest.mark.parametrize(
    ("body", "reason"),
    [
        pytest.param(
            dumps(
                {
                    **action(1, **SIGNED),
                    "stage": "system",
                    "actionId": None,
                    "eventType": "new_user",
                    "privacy": {},
                    "tracking": {},
                }
            ),
            IgnoreReason.SYSTEM,
            id="system",
        ),
        pytest.param(
            dumps({**action(1, **SIGNED), "stage": "supporter_confirm"}),
            IgnoreReason.NOT_DELIVERED,
            id="confirm-stage",
        ),
        pytest.param(
            dumps(
                {
                    "schema": "proca:event:2",
                    "eventType": "confirm_created",
                    "timestamp": "2024-01-01T00:00:00Z",
                    "confirm": {"operation": "add_staffer", "email": "x@example.org"},
                }
            ),
            IgnoreReason.CONFIRM_CREATED,
            id="confirm_created",
        ),
        pytest.param(
            dumps(
                {
                    "schema": "proca:event:2",
                    "eventType": "brand_new",
                    "timestamp": "2024-01-01T00:00:00Z",
                }
            ),
            IgnoreReason.UNKNOWN_EVENT,
            id="unknown-event",
        ),
    ],
)
def test_acknowledged_and_ignored(body: bytes, reason: IgnoreReason) -> None:
    result = model(body)
    assert isinstance(result, Ignored) and result.reason is reason


def test_testing_actions_flagged_or_skipped() -> None:
    body = fixture_bytes("petition_optin.json")
    kept = model(body)
    assert isinstance(kept, SyncRecord) and kept.action is not None and kept.action.testing
    assert kept.contact is not None and not kept.contact.real
    assert model(body, skip_testing=True) == Ignored(IgnoreReason.TESTING)


def test_followup_data_is_as_old_as_its_supporter_record() -> None:
    share = model(
        action(
            2,
            ref="A" * 43,
            email=None,
            created="2024-05-01T00:00:00Z",
            with_consent=False,
            given_at="2024-01-01T10:00:00Z",
        )
    )
    signature = model(action(1, **SIGNED))
    assert isinstance(share, SyncRecord) and isinstance(signature, SyncRecord)
    assert share.contact is not None and signature.contact is not None
    assert share.contact.stamp < signature.contact.stamp  # same time, consent-bearing ranks first
    assert "email" not in share.contact.fields  # a null never blanks a stored value
    assert share.contact.consent is None and signature.contact.consent is not None


def test_email_status_event_admits_only_double_opt_in() -> None:
    doi = model(
        email_status(
            ref="B" * 43, email=None, status="double_opt_in", changed="2024-01-02T00:00:00Z"
        )
    )
    bounce = model(
        email_status(ref="B" * 43, email=None, status="bounce", changed="2024-01-02T00:00:00Z")
    )
    assert isinstance(doi, SyncRecord) and doi.contact is not None and doi.contact.admit
    assert (
        isinstance(bounce, SyncRecord) and bounce.contact is not None and not bounce.contact.admit
    )
    assert bounce.contact.status is not None and bounce.contact.status.status == "bounce"


def test_event_without_identity_is_a_permanent_error() -> None:
    event = email_status(ref="B" * 43, email=None, status="bounce", changed="2024-01-02T00:00:00Z")
    event["supporter"]["contact"]["contactRef"] = None
    with pytest.raises(DecodeError) as info:
        model(event)
    assert info.value.reason is Reason.MISSING_FIELD


def test_action_without_identity_is_a_permanent_error() -> None:
    """No contactRef and no e-mail: the supporter can never be found (it used to reach
    the CRM and fail there, as a transient error, on every retry)."""
    message = action(2, ref="C" * 43, email="", created="2024-01-01T10:00:00Z")
    message["contact"]["contactRef"] = ""
    with pytest.raises(DecodeError) as info:
        model(message)
    assert info.value.reason is Reason.MISSING_FIELD


@pytest.mark.parametrize("value", [{"a": 1}, ["x"]], ids=["object", "list"])
def test_a_column_field_that_is_not_a_scalar_is_a_permanent_error(value: Any) -> None:
    message = action(3, ref="D" * 43, email="d@example.org", created="2024-01-01T10:00:00Z",
                     record={"lastName": value})
    with pytest.raises(DecodeError) as info:
        model(message)
    assert info.value.reason is Reason.INVALID_FIELD


def test_campaign_update_outranks_action_snapshots() -> None:
    update = model(campaign_updated("petition_x", "New title", when="2020-01-01T00:00:00Z"))
    later_action = model(action(1, **SIGNED))
    assert isinstance(update, SyncRecord) and isinstance(later_action, SyncRecord)
    assert update.campaign is not None and later_action.campaign is not None
    assert update.campaign.stamp > later_action.campaign.stamp


def test_same_bytes_same_key_different_bytes_different_key() -> None:
    body = fixture_bytes("event.json")
    first, again = model(body), model(orjson.loads(body))
    assert isinstance(first, SyncRecord) and isinstance(again, SyncRecord)
    assert first.key == model(body).key  # type: ignore[union-attr]
    assert first.lane == again.lane == "ref:1E4HalXr1WJkKnaeSyOgI8zTG8cKMu-vgFzWqeICtxY"


@pytest.mark.parametrize(
    ("opted_in", "status", "expected"),
    [
        pytest.param(True, None, True, id="optin"),
        pytest.param(False, None, False, id="no-optin"),
        pytest.param(False, "double_opt_in", True, id="doi"),
        pytest.param(True, "active", True, id="active-is-neutral"),
        *[
            pytest.param(True, s, False, id=s)
            for s in ("bounce", "blocked", "spam", "unsub", "inactive", "weird")
        ],
    ],
)
def test_subscription(opted_in: bool, status: str | None, expected: bool) -> None:
    assert is_subscribed(opted_in=opted_in, email_status=status) is expected


def test_join_is_commutative() -> None:
    records = [
        model(action(1, **SIGNED, record={"postcode": "1"})),
        model(
            action(
                2,
                ref="A" * 43,
                email="ada@example.org",
                created="2024-02-01T00:00:00Z",
                opt_in=False,
                record={"postcode": "2"},
            )
        ),
        model(
            email_status(ref="A" * 43, email=None, status="unsub", changed="2024-03-01T00:00:00Z")
        ),
    ]
    facts = [r.contact for r in records if isinstance(r, SyncRecord) and r.contact is not None]
    forward, backward = ContactState(), ContactState()
    for f in facts:
        forward.absorb(f)
    for f in reversed(facts):
        backward.absorb(f)
    assert forward == backward
    assert forward.value("postcode") == "2" and forward.opted_in and not forward.subscribed
