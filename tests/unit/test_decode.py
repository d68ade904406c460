"""decode(): bytes → validated message, or a DecodeError with a reason code (messages.md)."""

from __future__ import annotations

import copy
import traceback
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest

from proca_sync.errors import DecodeError, PermanentError, Reason
from proca_sync.messages import (
    ActionMessage,
    CampaignUpdatedEvent,
    ConfirmCreatedEvent,
    EmailStatusEvent,
    Stage,
    UnknownEvent,
    decode,
    decode_document,
    to_wire,
)

Loader = Callable[[str], bytes]
Mutator = Callable[[dict[str, Any]], None]

# ---- every sample decodes and re-encodes to the same JSON ------------------------------

FIXTURE_TABLE = [
    pytest.param("petition_optin.json", ActionMessage, "deliver", id="petition_optin"),
    pytest.param("petition_optout.json", ActionMessage, "deliver", id="petition_optout"),
    pytest.param("petition_doubleoptin.json", ActionMessage, "deliver", id="petition_doubleoptin"),
    pytest.param("share_twitter.json", ActionMessage, "deliver", id="share_twitter"),
    pytest.param("event.json", EmailStatusEvent, "email_status", id="event_minimal"),
    pytest.param(
        "event_doubleoptin.json", EmailStatusEvent, "email_status", id="event_doubleoptin"
    ),
]


def test_fixture_table_covers_every_sample(fixtures_dir: Path) -> None:
    listed = {p.values[0] for p in FIXTURE_TABLE}
    assert listed == {p.name for p in fixtures_dir.glob("*.json")}


@pytest.mark.parametrize(("name", "cls", "kind"), FIXTURE_TABLE)
def test_fixture_decodes_to_class(load_fixture: Loader, name: str, cls: type, kind: str) -> None:
    message = decode(load_fixture(name))
    assert type(message) is cls
    if isinstance(message, ActionMessage):
        assert message.stage is Stage(kind)
        assert isinstance(message.action_id, int)
        assert message.contact.contact_ref
    else:
        assert message.event_type == kind


@pytest.mark.parametrize(("name", "cls", "kind"), FIXTURE_TABLE)
def test_fixture_round_trips(load_fixture: Loader, name: str, cls: type, kind: str) -> None:
    body = load_fixture(name)
    assert to_wire(decode(body)) == orjson.loads(body)
    # str input is accepted too and gives the same message
    assert to_wire(decode(body.decode("utf-8"))) == orjson.loads(body)


def test_unknown_keys_are_kept(load_fixture: Loader) -> None:
    optin = decode(load_fixture("petition_optin.json"))
    assert isinstance(optin, ActionMessage)
    assert optin.campaign is not None
    assert optin.campaign.model_extra == {"id": "614"}  # a string, kept as it came
    wire = to_wire(optin)
    assert wire["campaign"]["id"] == "614"
    assert "externalId" not in wire["campaign"]  # absent stays absent (not null)
    # clear-text record keys that are not layer-1 fields live on as contact extras
    assert wire["contact"]["street"] == "42 rue de la paix"
    assert optin.contact.record()["lastName"] == "de Beauvoir - test"

    event = decode(load_fixture("event_doubleoptin.json"))
    assert isinstance(event, EmailStatusEvent)
    wire = to_wire(event)
    assert wire["action"]["id"] == 4722132
    assert wire["actionPage"]["id"] == 3120
    assert wire["campaign"]["id"] == 564


def test_fixture_field_values(load_fixture: Loader) -> None:
    optin = decode(load_fixture("petition_optin.json"))
    assert isinstance(optin, ActionMessage)
    assert optin.action.action_type == "register"
    assert optin.action.testing is True
    assert optin.action.custom_fields == {
        "comment": "This is a comment",
        "emailProvider": "gmail.com",
    }
    assert optin.privacy.opt_in is True
    assert optin.privacy.with_consent is True
    assert optin.privacy.email_status is None
    assert optin.personal_info is None
    assert optin.org_id == 766

    minimal = decode(load_fixture("event.json"))
    assert isinstance(minimal, EmailStatusEvent)
    assert minimal.action_id is None
    assert minimal.campaign is None
    assert minimal.supporter.privacy.email_status == "double_opt_in"
    assert minimal.supporter.contact.dupe_rank == 4


@pytest.mark.parametrize(("name", "cls", "kind"), FIXTURE_TABLE)
def test_repr_hides_personal_data(load_fixture: Loader, name: str, cls: type, kind: str) -> None:
    document = orjson.loads(load_fixture(name))
    contact = document["contact"] if "contact" in document else document["supporter"]["contact"]
    text = repr(decode(load_fixture(name)))
    for key in ("email", "firstName", "lastName", "phone"):
        if contact.get(key):
            assert contact[key] not in text


# ---- reason codes ----------------------------------------------------------------------


def _set(path: str, value: Any) -> Mutator:
    def mutate(document: dict[str, Any]) -> None:
        *parents, last = path.split(".")
        node = document
        for part in parents:
            node = node[part]
        node[last] = value

    return mutate


def _drop(path: str) -> Mutator:
    def mutate(document: dict[str, Any]) -> None:
        *parents, last = path.split(".")
        node = document
        for part in parents:
            node = node[part]
        del node[last]

    return mutate


_V1 = {
    "schema": "proca:action:1",
    "stage": "deliver",
    "actionId": 17,
    "action": {"actionType": "register", "fields": {}, "createdAt": "2022-11-01T11:11:11Z"},
    "campaign": {"name": "test", "title": "Test"},
    "contact": {
        "ref": "MDWJu2fbogTgTHgLTLl-OFvRII63xZE76i7w3qHfbbE",
        "firstName": "Simone",
        "email": "sync+3@proca.app",
        "area": "BE",
        "payload": "",
    },
    "privacy": None,
}

MUTATION_CASES = [
    # schema
    pytest.param(
        "petition_optin.json",
        _set("schema", "proca:action:3"),
        Reason.UNKNOWN_SCHEMA,
        id="unknown-schema",
    ),
    pytest.param(
        "petition_optin.json",
        _set("schema", "proca:event:1"),
        Reason.UNKNOWN_SCHEMA,
        id="unknown-schema-event-v1",
    ),
    pytest.param("petition_optin.json", _drop("schema"), Reason.UNKNOWN_SCHEMA, id="no-schema"),
    pytest.param(
        "petition_optin.json", _set("schema", None), Reason.UNKNOWN_SCHEMA, id="null-schema"
    ),
    pytest.param(
        "petition_optin.json", _set("schema", 2), Reason.UNKNOWN_SCHEMA, id="number-schema"
    ),
    # missing fields
    pytest.param(
        "petition_optin.json", _drop("action"), Reason.MISSING_FIELD, id="action-without-action"
    ),
    pytest.param(
        "petition_optin.json", _drop("stage"), Reason.MISSING_FIELD, id="action-without-stage"
    ),
    pytest.param(
        "petition_optin.json",
        _drop("action.createdAt"),
        Reason.MISSING_FIELD,
        id="action-without-createdAt",
    ),
    pytest.param(
        "petition_optin.json",
        _drop("action.actionType"),
        Reason.MISSING_FIELD,
        id="action-without-actionType",
    ),
    pytest.param(
        "petition_optin.json",
        _set("actionId", None),
        Reason.MISSING_FIELD,
        id="deliver-null-actionId",
    ),
    pytest.param(
        "petition_optin.json", _drop("actionId"), Reason.MISSING_FIELD, id="deliver-no-actionId"
    ),
    pytest.param(
        "share_twitter.json",
        _set("campaign", None),
        Reason.MISSING_FIELD,
        id="deliver-null-campaign",
    ),
    pytest.param(
        "share_twitter.json",
        _set("contact", {"dupeRank": 0}),
        Reason.MISSING_FIELD,
        id="deliver-contact-without-ref-or-email",
    ),
    pytest.param("event.json", _drop("eventType"), Reason.MISSING_FIELD, id="event-no-eventType"),
    pytest.param(
        "event.json", _set("eventType", 7), Reason.MISSING_FIELD, id="event-number-eventType"
    ),
    pytest.param(
        "event.json", _drop("supporter"), Reason.MISSING_FIELD, id="email-status-no-supporter"
    ),
    pytest.param(
        "event.json", _drop("timestamp"), Reason.MISSING_FIELD, id="email-status-no-timestamp"
    ),
    pytest.param(
        "event.json", _drop("supporter.contact"), Reason.MISSING_FIELD, id="email-status-no-contact"
    ),
    # wrong types / values
    pytest.param(
        "petition_optin.json", _set("actionId", "abc"), Reason.INVALID_FIELD, id="actionId-abc"
    ),
    pytest.param(
        "petition_optin.json", _set("actionId", 1.5), Reason.INVALID_FIELD, id="actionId-fraction"
    ),
    pytest.param(
        "petition_optin.json",
        _set("action.createdAt", "yesterday"),
        Reason.INVALID_FIELD,
        id="createdAt-yesterday",
    ),
    pytest.param(
        "petition_optin.json",
        _set("action.createdAt", 1700000000),
        Reason.INVALID_FIELD,
        id="createdAt-number",
    ),
    pytest.param(
        "petition_optin.json",
        _set("action.createdAt", "0001-01-01T00:00:00+01:00"),
        Reason.INVALID_FIELD,
        id="createdAt-out-of-range-low",
    ),
    pytest.param(
        "petition_optin.json",
        _set("action.createdAt", "9999-12-31T23:59:59-01:00"),
        Reason.INVALID_FIELD,
        id="createdAt-out-of-range-high",
    ),
    pytest.param(
        "petition_optin.json",
        _set("privacy.givenAt", "soon"),
        Reason.INVALID_FIELD,
        id="givenAt-not-a-timestamp",
    ),
    pytest.param(
        "petition_optin.json",
        _set("stage", "confirm"),
        Reason.INVALID_FIELD,
        id="stage-confirm-library-value",
    ),
    pytest.param(
        "petition_optin.json", _set("stage", "delivered"), Reason.INVALID_FIELD, id="stage-unknown"
    ),
    pytest.param(
        "petition_optin.json", _set("action", []), Reason.INVALID_FIELD, id="action-is-list"
    ),
    pytest.param(
        "petition_optin.json", _set("contact", "ref"), Reason.INVALID_FIELD, id="contact-is-string"
    ),
    pytest.param(
        "petition_optin.json",
        _set("contact.dupeRank", "first"),
        Reason.INVALID_FIELD,
        id="dupeRank-string",
    ),
    pytest.param(
        "petition_optin.json",
        _set("action.customFields", {"a": {"nested": 1}}),
        Reason.INVALID_FIELD,
        id="customFields-nested",
    ),
    pytest.param(
        "petition_optin.json",
        _set("personalInfo", {"payload": 5}),
        Reason.INVALID_FIELD,
        id="personalInfo-payload-number",
    ),
    pytest.param(
        "petition_optin.json",
        _set("privacy.optIn", "maybe"),
        Reason.INVALID_FIELD,
        id="optIn-string",
    ),
    pytest.param(
        "event.json",
        _set("supporter.contact", []),
        Reason.INVALID_FIELD,
        id="email-status-contact-list",
    ),
    pytest.param(
        "event.json",
        _set("timestamp", "later"),
        Reason.INVALID_FIELD,
        id="email-status-bad-timestamp",
    ),
]


@pytest.mark.parametrize(("name", "mutate", "reason"), MUTATION_CASES)
def test_reason_codes_for_broken_documents(
    load_fixture: Loader, name: str, mutate: Mutator, reason: Reason
) -> None:
    document = orjson.loads(load_fixture(name))
    mutate(document)
    with pytest.raises(DecodeError) as info:
        decode(orjson.dumps(document))
    assert info.value.reason is reason
    assert isinstance(info.value, PermanentError)
    # decode_document gives the same answer on the parsed dict
    with pytest.raises(DecodeError) as again:
        decode_document(copy.deepcopy(document))
    assert again.value.reason is reason


RAW_CASES = [
    pytest.param(b"{not json", Reason.INVALID_JSON, id="invalid-json"),
    pytest.param(b"", Reason.INVALID_JSON, id="empty-body"),
    pytest.param(
        b'{"schema": "proca:action:2", "x": "\xff\xfe"}', Reason.INVALID_JSON, id="non-utf8-bytes"
    ),
    pytest.param(b"\xc3\x28", Reason.INVALID_JSON, id="non-utf8-only"),
    pytest.param('{"schema": "\ud800"}', Reason.INVALID_JSON, id="lone-surrogate-str"),
    pytest.param(b'{"schema": "proca:action:2"} {}', Reason.INVALID_JSON, id="two-documents"),
    pytest.param(b"[]", Reason.NOT_AN_OBJECT, id="json-array"),
    pytest.param(b'[{"schema": "proca:action:2"}]', Reason.NOT_AN_OBJECT, id="array-of-object"),
    pytest.param(b"42", Reason.NOT_AN_OBJECT, id="json-number"),
    pytest.param(b"4.2", Reason.NOT_AN_OBJECT, id="json-float"),
    pytest.param(b'"proca:action:2"', Reason.NOT_AN_OBJECT, id="json-string"),
    pytest.param(b"null", Reason.NOT_AN_OBJECT, id="json-null"),
    pytest.param(b"true", Reason.NOT_AN_OBJECT, id="json-bool"),
    pytest.param(b"{}", Reason.UNKNOWN_SCHEMA, id="empty-object"),
]


@pytest.mark.parametrize(("body", "reason"), RAW_CASES)
def test_reason_codes_for_raw_bodies(body: bytes | str, reason: Reason) -> None:
    with pytest.raises(DecodeError) as info:
        decode(body)
    assert info.value.reason is reason
    assert str(info.value).startswith(f"{reason}: ")


@pytest.mark.parametrize(
    "name",
    ["petition_optin.json", "event_doubleoptin.json", "share_twitter.json"],
)
@pytest.mark.parametrize("fraction", [0.1, 0.5, 0.99])
def test_truncated_fixture_is_invalid_json(
    load_fixture: Loader, name: str, fraction: float
) -> None:
    body = load_fixture(name).rstrip()
    with pytest.raises(DecodeError) as info:
        decode(body[: int(len(body) * fraction)])
    assert info.value.reason is Reason.INVALID_JSON


# ---- error messages never carry personal data ------------------------------------------

_EMAIL = "sync+3@proca.app"
_NAME = "Simone"
_LAST = "de Beauvoir - test"

LEAK_CASES = [
    pytest.param(_set("actionId", _EMAIL), id="email-as-actionId"),
    pytest.param(_set("schema", _EMAIL), id="email-as-schema"),
    pytest.param(_set("schema", _NAME), id="name-as-schema"),
    pytest.param(_set("stage", _NAME), id="name-as-stage"),
    pytest.param(_set("contact.email", [_EMAIL]), id="email-in-list"),
    pytest.param(_set("contact.firstName", {"value": _NAME}), id="name-in-object"),
    pytest.param(_set("contact.dupeRank", _LAST), id="lastname-as-dupeRank"),
    pytest.param(_set("action.createdAt", _EMAIL), id="email-as-createdAt"),
    pytest.param(_set("action.customFields", {"email": {"v": _EMAIL}}), id="email-in-custom"),
    pytest.param(_set("privacy.emailStatus", [_EMAIL]), id="email-as-emailStatus"),
    pytest.param(_drop("action"), id="missing-action"),
    pytest.param(_set("actionId", None), id="null-actionId"),
]


def _assert_no_personal_data(exc: BaseException, secrets: list[str]) -> None:
    rendered = "".join(traceback.format_exception(exc)) + str(exc) + repr(exc)
    for secret in secrets:
        assert secret not in rendered


@pytest.mark.parametrize("mutate", LEAK_CASES)
def test_errors_do_not_contain_personal_data(load_fixture: Loader, mutate: Mutator) -> None:
    document = orjson.loads(load_fixture("petition_optin.json"))
    mutate(document)
    with pytest.raises(DecodeError) as info:
        decode(orjson.dumps(document))
    _assert_no_personal_data(info.value, [_EMAIL, _NAME, _LAST, "+41 223456789"])


@pytest.mark.parametrize(
    "body",
    [
        pytest.param(b'{"email": "sync+3@proca.app", "firstName": "Simone"', id="truncated"),
        pytest.param(b'["sync+3@proca.app", "Simone"]', id="array"),
        pytest.param(b'"sync+3@proca.app Simone"', id="string"),
        pytest.param(b'{"email": "sync+3@proca.app", "firstName": "Simone"}', id="no-schema"),
        pytest.param(b'{"email": "sync+3@proca.app\xff Simone"}', id="non-utf8"),
    ],
)
def test_raw_errors_do_not_contain_personal_data(body: bytes) -> None:
    with pytest.raises(DecodeError) as info:
        decode(body)
    _assert_no_personal_data(info.value, [_EMAIL, _NAME])


def test_v1_errors_do_not_contain_personal_data() -> None:
    document = copy.deepcopy(_V1)
    document["contact"]["payload"] = orjson.dumps({"email": 5, "firstName": _NAME}).decode()
    with pytest.raises(DecodeError) as info:
        decode(orjson.dumps(document))
    assert info.value.reason is Reason.INVALID_FIELD
    _assert_no_personal_data(info.value, [_EMAIL, _NAME])


# ---- stage "system" (messages.md §6.5) -------------------------------------------------


def _system(event_type: str, *, org: bool, campaign: bool) -> dict[str, Any]:
    return {
        "schema": "proca:action:2",
        "stage": "system",
        "eventType": event_type,
        "actionId": None,
        "action": {
            "actionType": event_type,
            "customFields": {},
            "createdAt": "2024-05-02T10:11:12.123456Z",
            "testing": False,
        },
        "actionPageId": 3120 if campaign else None,
        "actionPage": (
            {
                "name": "example.org/petition/de",
                "locale": "de",
                "thankYouTemplate": None,
                "thankYouTemplateRef": None,
                "supporterConfirmTemplate": None,
            }
            if campaign
            else None
        ),
        "campaignId": 564 if campaign else None,
        "campaign": (
            {
                "name": "petition_x",
                "title": "Petition X",
                "externalId": None,
                "contactSchema": "basic",
            }
            if campaign
            else None
        ),
        "orgId": 766 if org else None,
        "org": {"name": "example_org", "title": "Example Organisation"} if org else None,
        "contact": {
            "firstName": "jane",
            "email": "jane@example.org",
            "contactRef": None,
            "dupeRank": 0,
            "area": None,
        },
        "personalInfo": None,
        "privacy": {},
        "tracking": {},
    }


@pytest.mark.parametrize(
    "document",
    [
        pytest.param(_system("join_campaign", org=True, campaign=True), id="join_campaign"),
        pytest.param(_system("new_org", org=True, campaign=False), id="new_org"),
        pytest.param(_system("new_user", org=False, campaign=False), id="new_user"),
    ],
)
def test_system_messages_decode(document: dict[str, Any]) -> None:
    message = decode(orjson.dumps(document))
    assert isinstance(message, ActionMessage)
    assert message.stage is Stage.SYSTEM
    assert message.event_type == document["eventType"]
    assert message.action_id is None
    assert message.contact.contact_ref is None
    wire = to_wire(message)
    assert wire == document
    assert wire["privacy"] == {}  # no withConsent / optIn invented
    assert wire["tracking"] == {}


# ---- events ----------------------------------------------------------------------------

CAMPAIGN_UPDATED = {
    "schema": "proca:event:2",
    "eventType": "campaign_updated",
    "timestamp": "2024-09-30T16:17:36Z",
    "campaignId": 564,
    "orgId": 766,
    "campaign": {
        "id": 564,
        "name": "petition_x",
        "title": "Petition X",
        "externalId": 621987,
        "contactSchema": "basic",
        "config": {"some_key": {"nested_value": [1, 2]}, "Locale": "de"},
        "org": {"name": "example_org", "title": "Example Organisation"},
    },
}

CONFIRM_LAUNCH_PAGE = {
    "schema": "proca:event:2",
    "eventType": "confirm_created",
    "timestamp": "2024-05-02T10:11:12.123456Z",
    "confirm": {
        "operation": "launch_page",
        "code": "12345678",
        "email": "",
        "message": "please launch",
        "subjectId": 3120,
        "objectId": "",
        "creator": {"email": "staff@example.org", "jobTitle": "Campaigner"},
        "acceptLink": "https://proca.example/link/accept/12345678?id=3120",
        "rejectLink": "https://proca.example/link/reject/12345678?id=3120",
        "campaign": {"name": "petition_x", "title": "Petition X"},
        "org": {
            "name": "example_org",
            "title": "Example Organisation",
            "twitter": {
                "name": None,
                "screenName": None,
                "picture": None,
                "description": None,
                "url": None,
                "followersCount": None,
            },
        },
    },
}

CONFIRM_ADD_STAFFER = {
    "schema": "proca:event:2",
    "eventType": "confirm_created",
    "timestamp": "2024-05-02T10:11:12Z",
    "confirm": {
        "operation": "add_staffer",
        "code": "87654321",
        "email": "newstaff@example.org",
        "message": "",
        "subjectId": 766,
        "objectId": 12,
        "creator": {},
        "acceptLink": "https://proca.example/link/accept/87654321?email=newstaff@example.org",
        "rejectLink": "https://proca.example/link/reject/87654321?email=newstaff@example.org",
        "org": {"name": "example_org", "title": "Example Organisation"},
    },
}


def test_campaign_updated_decodes() -> None:
    message = decode(orjson.dumps(CAMPAIGN_UPDATED))
    assert isinstance(message, CampaignUpdatedEvent)
    assert message.campaign_id == 564
    assert message.org_id == 766
    assert message.campaign.id == 564
    assert message.campaign.external_id == 621987
    assert message.campaign.org is not None
    assert message.campaign.org.name == "example_org"
    assert message.campaign.config == CAMPAIGN_UPDATED["campaign"]["config"]  # keys verbatim
    assert to_wire(message) == CAMPAIGN_UPDATED


@pytest.mark.parametrize(
    "document",
    [
        pytest.param(CONFIRM_LAUNCH_PAGE, id="launch_page"),
        pytest.param(CONFIRM_ADD_STAFFER, id="add_staffer"),
    ],
)
def test_confirm_created_decodes(document: dict[str, Any]) -> None:
    message = decode(orjson.dumps(document))
    assert isinstance(message, ConfirmCreatedEvent)
    assert message.confirm["operation"] == document["confirm"]["operation"]
    assert to_wire(message) == document
    assert "@example.org" not in repr(message)


def test_unknown_event_type_is_kept_whole() -> None:
    document = {
        "schema": "proca:event:2",
        "eventType": "supporter_erased",
        "timestamp": "2024-05-02T10:11:12.123456Z",
        "supporter": {"contactRef": "1E4HalXr1WJkKnaeSyOgI8zTG8cKMu-vgFzWqeICtxY"},
        "somethingNew": [1, {"deep": None}],
    }
    message = decode(orjson.dumps(document))
    assert type(message) is UnknownEvent
    assert message.event_type == "supporter_erased"
    assert message.model_extra == {
        "supporter": document["supporter"],
        "somethingNew": document["somethingNew"],
    }
    assert to_wire(message) == document


def test_unknown_event_type_without_timestamp() -> None:
    document = {"schema": "proca:event:2", "eventType": "future_thing"}
    message = decode(orjson.dumps(document))
    assert type(message) is UnknownEvent
    assert to_wire(message) == document


def test_dotted_routing_key_as_event_type_is_unknown() -> None:
    # messages.md §10 #5: "supporter.email_status" is a routing key, never an eventType
    document = orjson.loads(b'{"schema": "proca:event:2", "timestamp": "2024-09-30T16:17:36Z"}')
    document["eventType"] = "supporter.email_status"
    assert type(decode(orjson.dumps(document))) is UnknownEvent


@pytest.mark.parametrize(
    "stage",
    [
        pytest.param("deliver", id="deliver"),
        pytest.param("supporter_confirm", id="supporter_confirm"),
        pytest.param("action_confirm", id="action_confirm"),
    ],
)
def test_every_supporter_stage_decodes(load_fixture: Loader, stage: str) -> None:
    document = orjson.loads(load_fixture("petition_optin.json"))
    document["stage"] = stage
    message = decode(orjson.dumps(document))
    assert isinstance(message, ActionMessage)
    assert message.stage == stage
    assert to_wire(message) == document


@pytest.mark.parametrize(
    "created_at",
    [
        pytest.param("2022-11-20T23:21:54Z", id="seconds"),
        pytest.param("2024-05-02T10:11:12.123456Z", id="microseconds"),
        pytest.param("2024-05-02T12:11:12+02:00", id="offset"),
    ],
)
def test_timestamps_kept_verbatim(load_fixture: Loader, created_at: str) -> None:
    document = orjson.loads(load_fixture("share_twitter.json"))
    document["action"]["createdAt"] = created_at
    message = decode(orjson.dumps(document))
    assert isinstance(message, ActionMessage)
    assert message.action.created_at == created_at


def test_donation_and_encrypted_contact_round_trip(load_fixture: Loader) -> None:
    document = orjson.loads(load_fixture("share_twitter.json"))
    document["action"]["donation"] = {
        "amount": 1500,
        "currency": "EUR",
        "frequencyUnit": "monthly",
        "payload": {"id": "pi_123", "amount_received": 1500},
        "schema": "stripe_payment_intent",
    }
    document["contact"] = {
        "contactRef": "q3J0cYq3J0cYq3J0cYq3J0cYq3J0cYq3J0cYq3J0cYq",
        "dupeRank": 0,
        "firstName": None,
        "email": None,
        "area": "DE",
    }
    document["personalInfo"] = {
        "payload": "Tgj-z5Kq",
        "nonce": "AAECAwQFBgcICQoLDA0ODxAREhMUFRYX",
        "encryptKey": {"id": 12, "public": "W59ljG1wEj4oh90f9nEqK4fV_izE2XkkC6BMJtu8H2s"},
        "signKey": {"id": 1, "public": "jYUbBVfmt_VOWFBcB255mrABQjB4zKe9a8i746GXkhw"},
    }
    message = decode(orjson.dumps(document))
    assert isinstance(message, ActionMessage)
    assert message.action.donation is not None
    assert message.action.donation.schema_ == "stripe_payment_intent"
    assert message.personal_info is not None
    assert message.personal_info.encrypt_key is not None
    assert message.personal_info.encrypt_key.id == 12
    assert to_wire(message) == document


@pytest.mark.parametrize(
    ("path", "value"),
    [
        pytest.param(("actionId",), "1732850", id="id-as-string"),
        pytest.param(("action", "testing"), "yes", id="flag-as-string"),
        pytest.param(("privacy", "optIn"), 1, id="flag-as-number"),
        pytest.param(("contact", "dupeRank"), "0", id="rank-as-string"),
    ],
)
def test_json_types_are_not_coerced(path: tuple[str, ...], value: Any) -> None:
    document = orjson.loads(
        (
            Path(__file__).resolve().parents[2].parent
            / "shared"
            / "fixtures"
            / "petition_optin.json"
        ).read_bytes()
    )
    node = document
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = value
    with pytest.raises(DecodeError) as info:
        decode(orjson.dumps(document))
    assert info.value.reason is Reason.INVALID_FIELD


# ---- what the errors say: the field and the problem, never a value ----------------------

MESSAGES = {
    "unknown-schema": "unknown schema 'proca:action:3'",
    "unknown-schema-event-v1": "unknown schema 'proca:event:1'",
    "no-schema": "no schema key",
    "null-schema": "no schema key",
    "number-schema": "unknown schema 'int'",
    "action-without-action": "missing action",
    "action-without-stage": "missing stage",
    "action-without-createdAt": "missing action.createdAt",
    "action-without-actionType": "missing action.actionType",
    "deliver-null-actionId": "missing actionId",
    "deliver-no-actionId": "missing actionId",
    "deliver-null-campaign": "missing campaign",
    "deliver-contact-without-ref-or-email": "missing contact.contactRef",
    "event-no-eventType": "missing eventType",
    "event-number-eventType": "missing eventType",
    "email-status-no-supporter": "missing supporter",
    "email-status-no-timestamp": "missing timestamp",
    "email-status-no-contact": "missing supporter.contact",
    "actionId-abc": "actionId: int_type",
    "createdAt-yesterday": "action.createdAt: timestamp",
    "createdAt-number": "action.createdAt: string_type",
    "stage-unknown": "stage: enum",
    "customFields-nested": "action.customFields.a.str: string_type",
    "email-status-bad-timestamp": "timestamp: timestamp",
    # raw bodies
    "invalid-json": "body is not valid JSON",
    "non-utf8-bytes": "body is not UTF-8",
    "json-array": "body is a JSON list, not an object",
    "json-null": "body is a JSON NoneType, not an object",
}


_CASES = {p.id: p.values for p in [*MUTATION_CASES, *RAW_CASES]}


@pytest.mark.parametrize("case", sorted(MESSAGES))
def test_error_messages_name_the_field_and_the_problem(load_fixture: Loader, case: str) -> None:
    values = _CASES[case]
    if len(values) == 3:
        name, mutate, _ = values
        document = orjson.loads(load_fixture(name))
        mutate(document)
        body: bytes | str = orjson.dumps(document)
    else:
        body = values[0]
    with pytest.raises(DecodeError) as info:
        decode(body)
    assert info.value.args == (MESSAGES[case],)


@pytest.mark.parametrize(
    ("schema", "label"),
    [
        pytest.param("jane@example.org", "str", id="personal-data-is-not-echoed"),
        pytest.param("proca:" + "x" * 40, "str", id="too-long"),
        pytest.param("proca:action:2:extra", "proca:action:2:extra", id="four-parts"),
        pytest.param("proca:action:2:x:y", "str", id="five-parts"),
        pytest.param("Proca:action", "str", id="upper-case"),
        pytest.param(["proca:action:2"], "list", id="list"),
    ],
)
def test_an_unknown_schema_is_named_only_when_it_looks_like_one(schema: Any, label: str) -> None:
    with pytest.raises(DecodeError) as info:
        decode(orjson.dumps({"schema": schema}))
    assert info.value.args == (f"unknown schema {label!r}",)
    assert info.value.reason is Reason.UNKNOWN_SCHEMA


def test_v1_upgrade_errors_say_so() -> None:
    document = copy.deepcopy(_V1)
    document["contact"]["payload"] = '{"email": 5}'  # merged, then the v2 shape refuses it
    with pytest.raises(DecodeError) as info:
        decode(orjson.dumps(document))
    assert info.value.args == ("v1 upgrade: contact.email: string_type",)
    assert info.value.reason is Reason.INVALID_FIELD


def test_contacts_show_only_their_reference_in_repr() -> None:
    from proca_sync.messages.schemas import Contact, ContactV1

    contact = Contact(contact_ref="ref1", email="jane@example.org", first_name="Jane")
    assert repr(contact) == "Contact(contact_ref='ref1')"
    legacy = ContactV1(ref="ref2", email="jane@example.org", payload='{"a": 1}')
    assert repr(legacy) == "ContactV1(ref='ref2')"


def test_to_wire_gives_plain_json_types(load_fixture: Loader) -> None:
    from proca_sync.messages import to_wire

    wire = to_wire(decode(load_fixture("petition_optin.json")))
    assert type(wire["stage"]) is str  # not the Stage enum: the dict is plain JSON data
    assert wire == orjson.loads(orjson.dumps(wire))


def test_a_schema_label_is_echoed_up_to_40_characters() -> None:
    for length, label in ((40, "proca:" + "a" * 34), (41, "str")):
        with pytest.raises(DecodeError) as info:
            decode(orjson.dumps({"schema": "proca:" + "a" * (length - 6)}))
        assert info.value.args == (f"unknown schema {label!r}",)


@pytest.mark.parametrize(
    "schema",
    ["a:b", "proca:event:2:x", "x_1:y_2", "p9:0"],
)
def test_schema_labels_of_two_to_four_lowercase_parts_are_echoed(schema: str) -> None:
    with pytest.raises(DecodeError) as info:
        decode(orjson.dumps({"schema": schema}))
    assert info.value.args == (f"unknown schema {schema!r}",)


# ---- the models themselves: defaults of absent keys and validation errors --------------

_T = "2024-01-01T00:00:00Z"
_NO_CONTACT = {"contactRef": None, "dupeRank": None, "firstName": None, "email": None}
_NO_PRIVACY = {
    "optIn": None,
    "givenAt": None,
    "withConsent": False,
    "emailStatus": None,
    "emailStatusChanged": None,
}
_ACTION = {"actionType": "x", "customFields": {}, "createdAt": _T, "testing": False}


@pytest.mark.parametrize(
    ("model", "given", "expected"),
    [
        pytest.param(
            "Donation",
            {"amount": 1},
            {
                "amount": 1,
                "currency": "EUR",
                "frequencyUnit": "one_off",
                "payload": {},
                "schema": None,
            },
            id="Donation",
        ),
        pytest.param(
            "Action",
            {"actionType": "x", "createdAt": _T},
            {**_ACTION, "donation": None},
            id="Action",
        ),
        pytest.param(
            "ActionPage",
            {"name": "p"},
            {
                "name": "p",
                "locale": None,
                "thankYouTemplate": None,
                "thankYouTemplateRef": None,
                "supporterConfirmTemplate": None,
            },
            id="ActionPage",
        ),
        pytest.param(
            "Campaign",
            {"name": "c"},
            {"name": "c", "title": None, "externalId": None, "contactSchema": "basic"},
            id="Campaign",
        ),
        pytest.param("Org", {}, {"name": None, "title": None}, id="Org"),
        pytest.param("Contact", {}, {**_NO_CONTACT, "area": None}, id="Contact"),
        pytest.param("KeyRef", {"public": "k"}, {"id": None, "public": "k"}, id="KeyRef"),
        pytest.param(
            "PersonalInfo",
            {},
            {"payload": None, "nonce": None, "encryptKey": None, "signKey": None},
            id="PersonalInfo",
        ),
        pytest.param("Privacy", {}, _NO_PRIVACY, id="Privacy"),
        pytest.param(
            "Tracking",
            {},
            {"source": None, "medium": None, "campaign": None, "content": None, "location": None},
            id="Tracking",
        ),
        pytest.param(
            "ActionMessage",
            {"stage": "system", "action": {"actionType": "x", "createdAt": _T}},
            {
                "schema": "proca:action:2",
                "stage": "system",
                "actionId": None,
                "action": {**_ACTION, "donation": None},
                "actionPageId": None,
                "actionPage": None,
                "campaignId": None,
                "campaign": None,
                "orgId": None,
                "org": None,
                "contact": {**_NO_CONTACT, "area": None},
                "personalInfo": None,
                "privacy": _NO_PRIVACY,
                "tracking": None,
                "eventType": None,
            },
            id="ActionMessage",
        ),
        pytest.param(
            "Supporter",
            {"contact": {}},
            {
                "contact": {**_NO_CONTACT, "area": None},
                "privacy": _NO_PRIVACY,
                "personalInfo": None,
            },
            id="Supporter",
        ),
        pytest.param(
            "EmailStatusEvent",
            {"timestamp": _T, "supporter": {"contact": {}}},
            {
                "schema": "proca:event:2",
                "eventType": "email_status",
                "timestamp": _T,
                "supporter": {
                    "contact": {**_NO_CONTACT, "area": None},
                    "privacy": _NO_PRIVACY,
                    "personalInfo": None,
                },
                "actionId": None,
                "action": None,
                "actionPageId": None,
                "actionPage": None,
                "campaignId": None,
                "campaign": None,
                "tracking": None,
            },
            id="EmailStatusEvent",
        ),
        pytest.param(
            "CampaignUpdatedEvent",
            {"campaign": {"name": "c"}},
            {
                "schema": "proca:event:2",
                "eventType": "campaign_updated",
                "timestamp": None,
                "campaignId": None,
                "orgId": None,
                "campaign": {
                    "name": "c",
                    "title": None,
                    "externalId": None,
                    "contactSchema": "basic",
                    "id": None,
                    "config": {},
                    "org": None,
                },
            },
            id="CampaignUpdatedEvent",
        ),
        pytest.param(
            "ConfirmCreatedEvent",
            {},
            {
                "schema": "proca:event:2",
                "eventType": "confirm_created",
                "timestamp": None,
                "confirm": {},
            },
            id="ConfirmCreatedEvent",
        ),
        pytest.param(
            "UnknownEvent",
            {"eventType": "u"},
            {"schema": "proca:event:2", "eventType": "u", "timestamp": None},
            id="UnknownEvent",
        ),
        pytest.param(
            "ActionV1",
            {"actionType": "x", "createdAt": _T},
            {"actionType": "x", "fields": {}, "createdAt": _T, "testing": False, "donation": None},
            id="ActionV1",
        ),
        pytest.param(
            "ContactV1",
            {},
            {
                "ref": None,
                "firstName": None,
                "email": None,
                "area": None,
                "payload": None,
                "nonce": None,
                "publicKey": None,
                "signKey": None,
            },
            id="ContactV1",
        ),
        pytest.param("PrivacyV1", {}, {"communication": None, "givenAt": None}, id="PrivacyV1"),
    ],
)
def test_absent_keys_read_as_their_defaults(
    model: str, given: dict[str, Any], expected: dict[str, Any]
) -> None:
    from proca_sync.messages import schemas

    cls = getattr(schemas, model)
    assert cls.model_validate(given).model_dump(mode="json") == expected
    # and the defaults are not "sent": the wire form keeps only what came
    assert to_wire(cls.model_validate(given)) == given


def test_snake_case_names_are_accepted_in_code() -> None:
    from proca_sync.messages.schemas import Contact

    contact = Contact(contact_ref="r", first_name="Ada", dupe_rank=1)
    assert contact.record() == {"contactRef": "r", "firstName": "Ada", "dupeRank": 1}


def test_a_delivered_action_may_name_its_supporter_by_email_alone(load_fixture: Loader) -> None:
    document = orjson.loads(load_fixture("share_twitter.json"))
    document["contact"] = {"email": "x@example.org"}
    message = decode(orjson.dumps(document))
    assert isinstance(message, ActionMessage)
    assert message.contact.email == "x@example.org"
    document["contact"] = {"contactRef": "r", "email": None}
    assert isinstance(decode(orjson.dumps(document)), ActionMessage)


def test_the_models_validation_errors_say_what_is_wrong() -> None:
    """What a caller validating a model directly (``upgrade_v1``'s callers, crypto's
    merge) sees: pydantic's error with our type, template and context."""
    from pydantic import ValidationError

    from proca_sync.messages.schemas import Action

    with pytest.raises(ValidationError) as bad_time:
        Action.model_validate({"actionType": "x", "createdAt": "soon"})
    assert [(e["type"], e["msg"], e["loc"]) for e in bad_time.value.errors()] == [
        ("timestamp", "not an ISO 8601 timestamp", ("createdAt",))
    ]
    with pytest.raises(ValidationError) as missing:
        ActionMessage.model_validate({"stage": "deliver", "action": _ACTION})
    [error] = missing.value.errors()
    assert (error["type"], error["msg"], error["ctx"]) == (
        "missing",
        "field required: actionId",
        {"field": "actionId"},
    )


# ---- wire timestamps ------------------------------------------------------------------


@pytest.fixture
def new_york(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """A machine whose local time is not UTC: naive times must still read as UTC."""
    import time

    monkeypatch.setenv("TZ", "America/New_York")
    time.tzset()
    yield
    monkeypatch.undo()
    time.tzset()


@pytest.mark.parametrize(
    ("value", "utc"),
    [
        pytest.param("2024-01-01T10:00:00Z", "2024-01-01T10:00:00+00:00", id="Z"),
        pytest.param("2024-01-01T10:00:00z", "2024-01-01T10:00:00+00:00", id="lower-z"),
        pytest.param("2024-01-01T10:00:00.5Z", "2024-01-01T10:00:00.500000+00:00", id="fraction"),
        pytest.param("2024-01-01T12:00:00+02:00", "2024-01-01T10:00:00+00:00", id="offset"),
        pytest.param("2024-01-01T10:00:00", "2024-01-01T10:00:00+00:00", id="naive-is-utc"),
    ],
)
def test_parse_timestamp_gives_utc(new_york: None, value: str, utc: str) -> None:
    from proca_sync.messages.schemas import parse_timestamp

    parsed = parse_timestamp(value)
    assert parsed.isoformat() == utc
    assert parsed.utcoffset() is not None and parsed.utcoffset().total_seconds() == 0  # type: ignore[union-attr]
