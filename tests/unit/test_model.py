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
from proca_sync.sync.records import (
    ActionRecord,
    CampaignFact,
    ConsentFact,
    ContactFacts,
    StatusFact,
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
    message = action(
        3,
        ref="D" * 43,
        email="d@example.org",
        created="2024-01-01T10:00:00Z",
        record={"lastName": value},
    )
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


# ---- the whole record, value by value ---------------------------------------------------

REF = "R" * 43
DIGEST = "d" * 24


def _full_action() -> dict[str, Any]:
    """A consent-bearing delivered action with every optional part set."""
    message = action(
        42,
        ref=REF,
        email="  Ada@Example.ORG ",
        created="2024-01-01T10:00:00Z",
        given_at="2024-01-01T09:00:00Z",  # earlier than the action: only follow-ups use it
        record={"lastName": "Lovelace", "phone": "", "postcode": None, "city": "London"},
        email_status="double_opt_in",
        status_changed="2024-01-02T00:00:00Z",
        custom={"comment": "yes", "n": 3},
    )
    message["contact"]["dupeRank"] = 2
    message["contact"]["area"] = "GB"
    message["action"]["donation"] = {"amount": 500, "currency": "EUR", "payload": {}}
    return message


def test_a_delivered_action_gives_this_record_field_by_field() -> None:
    result = model_message(decode(dumps(_full_action())), Options(), digest=DIGEST)
    created = "2024-01-01T10:00:00.000000Z"
    assert result == SyncRecord(
        key=f"action:42:{DIGEST}",
        kind="action",
        contact=ContactFacts(
            refs=frozenset({REF}),
            emails=frozenset({"ada@example.org"}),
            # no contactRef / dupeRank, no empty or null values, the e-mail normalised
            fields={
                "firstName": "Ada",
                "email": "ada@example.org",
                "area": "GB",
                "lastName": "Lovelace",
                "city": "London",
            },
            stamp=f"{created}|1|{42:020d}",  # the action's own time: it carries consent
            admit=True,
            real=True,
            consent=ConsentFact(42, True, "2024-01-01T09:00:00Z"),
            status=StatusFact(
                status="double_opt_in",
                changed_at="2024-01-02T00:00:00Z",
                stamp="2024-01-02T00:00:00.000000Z|1|double_opt_in",
                source="action:42",
            ),
        ),
        action=ActionRecord(
            action_id=42,
            action_type="register",
            campaign="petition_x",
            created_at="2024-01-01T10:00:00Z",
            testing=False,
            data={
                "actionId": 42,
                "actionType": "register",
                "campaign": "petition_x",
                "createdAt": "2024-01-01T10:00:00Z",
                "customFields": {"comment": "yes", "n": 3},
                "testing": False,
                "withConsent": True,
                "optIn": True,
                "dupeRank": 2,
                "donation": {"amount": 500, "currency": "EUR", "payload": {}},
                "actionPage": {
                    "name": "example.org/petition/en",
                    "locale": "en",
                    "thankYouTemplate": None,
                    "thankYouTemplateRef": None,
                    "supporterConfirmTemplate": None,
                },
                "actionPageId": 10,
                "orgId": 7,
                "tracking": {
                    "source": "unknown",
                    "medium": "unknown",
                    "campaign": "unknown",
                    "content": "",
                    "location": "",
                },
            },
            version=f"{created}|{DIGEST}",
        ),
        campaign=CampaignFact(
            "petition_x",
            {
                "name": "petition_x",
                "title": "Petition X",
                "externalId": None,
                "contactSchema": "basic",
                "campaignId": 5,
            },
            f"0|{created}|{42:020d}|{DIGEST}",
        ),
    )


def test_a_minimal_action_gives_empty_parts_not_missing_keys() -> None:
    message = {
        "schema": "proca:action:2",
        "stage": "deliver",
        "actionId": 3,
        "action": {"actionType": "share", "createdAt": "2024-01-01T10:00:00Z"},
        "campaign": {"name": "c"},
        "contact": {"email": "b@example.org"},
        "privacy": {"withConsent": False, "optIn": True},
    }
    result = model_message(decode(dumps(message)), Options(), digest=DIGEST)
    assert isinstance(result, SyncRecord) and result.action is not None
    assert result.contact is not None and result.campaign is not None
    data = result.action.data
    assert data["customFields"] == {}
    assert (data["donation"], data["actionPage"], data["tracking"]) == (None, None, None)
    assert (data["actionPageId"], data["orgId"], data["dupeRank"]) == (None, None, None)
    assert data["optIn"] is True and data["withConsent"] is False
    assert result.contact.refs == frozenset()
    assert result.contact.emails == frozenset({"b@example.org"})
    assert result.contact.lane == "email:b@example.org"
    assert result.contact.stamp == f"2024-01-01T10:00:00.000000Z|0|{3:020d}"
    assert result.contact.consent is None and result.contact.status is None
    assert result.campaign.data == {"name": "c", "campaignId": None}


@pytest.mark.parametrize(
    ("given_at", "data_time"),
    [
        pytest.param("2023-06-01T08:00:00Z", "2023-06-01T08:00:00.000000Z", id="earlier"),
        pytest.param("2024-06-01T08:00:00Z", "2024-05-01T00:00:00.000000Z", id="later"),
    ],
)
def test_a_followup_is_stamped_at_the_earlier_of_its_time_and_the_consent(
    given_at: str, data_time: str
) -> None:
    message = action(
        7,
        ref=REF,
        email=None,
        created="2024-05-01T00:00:00Z",
        with_consent=False,
        given_at=given_at,
    )
    result = model_message(decode(dumps(message)), Options(), digest=DIGEST)
    assert isinstance(result, SyncRecord) and result.contact is not None
    assert result.contact.stamp == f"{data_time}|0|{7:020d}"
    # the action itself keeps its own time
    assert result.action is not None
    assert result.action.version == f"2024-05-01T00:00:00.000000Z|{DIGEST}"


def test_a_status_without_a_change_time_is_still_a_fact() -> None:
    message = action(8, ref=REF, email=None, created="2024-01-01T10:00:00Z", email_status="bounce")
    result = model_message(decode(dumps(message)), Options(), digest=DIGEST)
    assert isinstance(result, SyncRecord) and result.contact is not None
    assert result.contact.status == StatusFact(
        status="bounce", changed_at=None, stamp="|3|bounce", source="action:8"
    )


def test_an_email_status_event_gives_this_record_field_by_field() -> None:
    event = email_status(
        ref=REF,
        email="Ada@example.org",
        status="unsub",
        changed="2024-03-01T00:00:00Z",
        action_id=9,
        created="2024-02-01T00:00:00Z",
    )
    event["action"]["testing"] = True
    event["supporter"]["contact"]["lastName"] = "Lovelace"
    event["campaignId"] = 5
    event["campaign"] = {"name": "petition_x", "title": "Petition X", "contactSchema": "basic"}
    result = model_message(decode(dumps(event)), Options(), digest=DIGEST)
    data_time = "2024-02-01T00:00:00.000000Z"  # the action's time, not the event's
    assert result == SyncRecord(
        key=f"email_status:{DIGEST}",
        kind="email_status",
        contact=ContactFacts(
            refs=frozenset({REF}),
            emails=frozenset({"ada@example.org"}),
            fields={"firstName": "Ada", "email": "ada@example.org", "lastName": "Lovelace"},
            stamp=f"{data_time}|0|{9:020d}",
            admit=False,
            real=False,
            consent=None,
            status=StatusFact(
                status="unsub",
                changed_at="2024-03-01T00:00:00Z",
                stamp="2024-03-01T00:00:00.000000Z|3|unsub",
                source="event",
            ),
        ),
        campaign=CampaignFact(
            "petition_x",
            {
                "name": "petition_x",
                "title": "Petition X",
                "contactSchema": "basic",
                "campaignId": 5,
            },
            f"0|{data_time}|0|{DIGEST}",
        ),
    )


@pytest.mark.parametrize(
    ("given_at", "data_time"),
    [
        pytest.param("2024-01-05T00:00:00Z", "2024-01-05T00:00:00.000000Z", id="consent-time"),
        pytest.param(None, "2024-03-01T00:00:00.000000Z", id="event-time"),
    ],
)
def test_an_event_without_its_action_is_stamped_at_the_consent_or_event_time(
    given_at: str | None, data_time: str
) -> None:
    event = email_status(
        ref=REF, email=None, status="double_opt_in", changed="2024-03-01T00:00:00Z"
    )
    event["supporter"]["privacy"]["givenAt"] = given_at
    result = model_message(decode(dumps(event)), Options(), digest=DIGEST)
    assert isinstance(result, SyncRecord) and result.contact is not None
    assert result.contact.stamp == f"{data_time}|0|{0:020d}"
    assert result.contact.admit is True and result.contact.real is True
    assert result.campaign is None and result.action is None
    assert result.lane == f"ref:{REF}"


def test_a_campaign_update_gives_this_record() -> None:
    update = campaign_updated(
        "petition_x", "New title", when="2024-01-01T12:00:00+02:00", external_id=3
    )
    result = model_message(decode(dumps(update)), Options(), digest=DIGEST)
    assert result == SyncRecord(
        key=f"campaign:petition_x:{DIGEST}",
        kind="campaign",
        campaign=CampaignFact(
            "petition_x",
            {
                "id": 5,
                "name": "petition_x",
                "title": "New title",
                "externalId": 3,
                "contactSchema": "basic",
                "config": {"lang_setting": "en"},
                "org": {"name": "example_org", "title": "Example Org"},
                "campaignId": 5,
            },
            f"1|2024-01-01T10:00:00.000000Z|{DIGEST}",  # the update's time, in UTC
        ),
    )
    assert result.lane == "campaign:petition_x"


def test_a_campaign_update_keeps_a_campaign_id_of_its_own() -> None:
    update = campaign_updated("petition_x", "T", when="2024-01-01T00:00:00Z")
    update["campaign"]["campaignId"] = 99  # an unknown key of the campaign wins
    result = model_message(decode(dumps(update)), Options(), digest=DIGEST)
    assert isinstance(result, SyncRecord) and result.campaign is not None
    assert result.campaign.data["campaignId"] == 99


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        pytest.param(
            {
                **action(1, **SIGNED),
                "stage": "system",
                "actionId": None,
                "eventType": "join_campaign",
                "privacy": {},
                "tracking": {},
            },
            Ignored(IgnoreReason.SYSTEM, "join_campaign"),
            id="system",
        ),
        pytest.param(
            {**action(1, **SIGNED), "stage": "system", "actionId": None},
            Ignored(IgnoreReason.SYSTEM, ""),
            id="system-without-eventType",
        ),
        pytest.param(
            {**action(1, **SIGNED), "stage": "action_confirm"},
            Ignored(IgnoreReason.NOT_DELIVERED, "action_confirm"),
            id="confirm-stage",
        ),
        pytest.param(
            {"schema": "proca:event:2", "eventType": "brand_new"},
            Ignored(IgnoreReason.UNKNOWN_EVENT, "brand_new"),
            id="unknown-event",
        ),
        pytest.param(
            {"schema": "proca:event:2", "eventType": "confirm_created", "confirm": {}},
            Ignored(IgnoreReason.CONFIRM_CREATED, ""),
            id="confirm_created",
        ),
    ],
)
def test_ignored_messages_say_which(body: dict[str, Any], expected: Ignored) -> None:
    assert model(body) == expected


def test_skip_testing_keeps_real_actions() -> None:
    result = model(action(1, **SIGNED), skip_testing=True)
    assert isinstance(result, SyncRecord) and result.contact is not None
    assert result.contact.real


def test_the_default_options_sync_everything_and_keep_testing_actions() -> None:
    assert Options() == Options(mode=Mode.ALL, skip_testing=False)


def test_body_digest_is_24_hex_characters_of_blake2b() -> None:
    assert body_digest(b"proca") == "467aa7a1f78ff74d8780333c"
    assert body_digest(b"") == "b8e1dda3ac0aa3820ad2990b"


def test_a_blank_email_is_no_email() -> None:
    message = action(4, ref=REF, email="   ", created="2024-01-01T10:00:00Z")
    result = model_message(decode(dumps(message)), Options(), digest=DIGEST)
    assert isinstance(result, SyncRecord) and result.contact is not None
    assert result.contact.emails == frozenset()
    assert "email" not in result.contact.fields


@pytest.mark.parametrize("name", ["lastName", "postcode", "country"])
@pytest.mark.parametrize("value", [{"a": 1}, ["x"]], ids=["dict", "list"])
def test_column_fields_must_be_scalars_and_the_error_names_only_the_field(
    name: str, value: Any
) -> None:
    message = action(
        5, ref=REF, email="e@example.org", created="2024-01-01T10:00:00Z", record={name: value}
    )
    with pytest.raises(DecodeError) as info:
        model(message)
    assert info.value.args == (f"contact.{name} is a {type(value).__name__}",)
    assert info.value.reason is Reason.INVALID_FIELD


def test_other_fields_may_be_lists_or_objects() -> None:
    message = action(
        6,
        ref=REF,
        email="e@example.org",
        created="2024-01-01T10:00:00Z",
        record={"address": {"street": "Main"}, "tags": ["a"]},
    )
    result = model(message)
    assert isinstance(result, SyncRecord) and result.contact is not None
    assert result.contact.fields["address"] == {"street": "Main"}
    assert result.contact.fields["tags"] == ["a"]


def test_identity_errors_say_what_is_missing() -> None:
    message = action(2, ref="C" * 43, email="", created="2024-01-01T10:00:00Z")
    message["contact"]["contactRef"] = ""
    with pytest.raises(DecodeError) as info:
        model(message)
    assert info.value.args == ("action without contactRef or e-mail",)
    event = email_status(ref="B" * 43, email=None, status="bounce", changed="2024-01-02T00:00:00Z")
    event["supporter"]["contact"]["contactRef"] = None
    with pytest.raises(DecodeError) as info:
        model(event)
    assert info.value.args == ("email_status event without contactRef or e-mail",)


def test_a_campaign_update_holds_only_the_keys_it_carried() -> None:
    """No default is invented (``contactSchema: basic``, ``config: {}``, nulls): the
    campaign record holds what the server sent, as an action's snapshot does."""
    update = {
        "schema": "proca:event:2",
        "eventType": "campaign_updated",
        "timestamp": "2024-01-01T00:00:00Z",
        "campaignId": 5,
        "campaign": {"name": "petition_x", "title": "T"},
    }
    result = model_message(decode(dumps(update)), Options(), digest=DIGEST)
    assert isinstance(result, SyncRecord) and result.campaign is not None
    assert result.campaign.data == {"name": "petition_x", "title": "T", "campaignId": 5}
