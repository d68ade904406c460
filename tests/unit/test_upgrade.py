"""proca:action:1 → proca:action:2, lossless per messages.md §5.2."""

from __future__ import annotations

import copy
from typing import Any

import orjson
import pytest

from proca_sync import crypto
from proca_sync.errors import DecodeError, Reason
from proca_sync.messages import ActionMessage, Stage, decode, to_wire, upgrade_v1
from proca_sync.messages.schemas import ActionMessageV1
from tests.support.vector import (
    NONCE,
    PAYLOAD,
    PLAINTEXT,
    RECIPIENT_PRIVATE,
    RECIPIENT_PUBLIC,
    SENDER_PUBLIC,
)

# crypto.md §7 test vector (published keys, never used for real data)

REF = "1E4HalXr1WJkKnaeSyOgI8zTG8cKMu-vgFzWqeICtxY"

CLEAR_RECORD = {
    "firstName": "Bruce",
    "lastName": "Wayne",
    "email": "bruce@example.org",
    "phone": "+49 30 123456",
    "country": "DE",
    "postcode": "10115",
    "area": "DE",
    "address": {"region": None, "locality": "Berlin", "street": "Hauptstr.", "streetNumber": "1"},
}

CONTACT_ENCRYPTED = {
    "ref": REF,
    "firstName": "Sim",  # clear layer: the decrypted record must win over it
    "email": None,
    "payload": PAYLOAD,
    "nonce": NONCE,
    "publicKey": RECIPIENT_PUBLIC,
    "signKey": SENDER_PUBLIC,
}
CONTACT_CLEAR = {
    "ref": REF,
    "firstName": "bruce",
    "email": "old@example.org",
    "area": "DE",
    "payload": orjson.dumps(CLEAR_RECORD).decode(),
}
CONTACT_EMPTY = {
    "ref": REF,
    "firstName": "Bruce",
    "email": "bruce@example.org",
    "area": "DE",
    "payload": "",
}


def v1_message(contact: dict[str, Any], privacy: dict[str, Any] | None) -> dict[str, Any]:
    return {
        "schema": "proca:action:1",
        "stage": "deliver",
        "actionId": 4722132,
        "action": {
            "actionType": "donate",
            "fields": {"comment": "Count me in", "count": 3, "flag": True},
            "createdAt": "2024-10-14T11:02:24Z",
            "testing": True,
            "donation": {
                "amount": 1500,
                "currency": "EUR",
                "frequencyUnit": "monthly",
                "payload": {"provider": "stripe"},
            },
            "futureActionKey": "kept",
        },
        "actionPageId": 3120,
        "actionPage": {
            "locale": "de",
            "name": "example.org/petition/de",
            "thankYouTemplate": "petition_de",
            "thankYouTemplateRef": None,
        },
        "campaignId": 564,
        "campaign": {"name": "petition_x", "title": "Petition X", "externalId": 621987},
        "orgId": 766,
        "org": {"name": "example_org", "title": "Example Organisation"},
        "contact": copy.deepcopy(contact),
        "privacy": copy.deepcopy(privacy),
        "tracking": {
            "source": "newsletter",
            "medium": "email",
            "campaign": "oct",
            "content": "",
            "location": "https://example.org/petition",
        },
        "futureTopKey": {"nested": [1, 2]},
    }


CONSENT = {"communication": True, "givenAt": "2024-10-14T11:02:24Z"}

VARIANTS = [
    pytest.param(CONTACT_ENCRYPTED, id="encrypted"),
    pytest.param(CONTACT_CLEAR, id="clear-json-string"),
    pytest.param(CONTACT_EMPTY, id="empty-payload"),
]


def _upgrade(document: dict[str, Any]) -> ActionMessage:
    message = decode(orjson.dumps(document))
    assert isinstance(message, ActionMessage)
    return message


@pytest.mark.parametrize("contact", VARIANTS)
def test_v1_common_fields_are_copied(contact: dict[str, Any]) -> None:
    document = v1_message(contact, CONSENT)
    wire = to_wire(_upgrade(document))
    assert wire["schema"] == "proca:action:2"
    assert wire["stage"] == "deliver"
    assert wire["actionId"] == 4722132
    # §5.2: copied, not the library's constants 1 / {"", ""} / false
    assert wire["orgId"] == 766
    assert wire["org"] == {"name": "example_org", "title": "Example Organisation"}
    assert wire["action"]["testing"] is True
    assert wire["action"]["donation"] == document["action"]["donation"]
    assert wire["action"]["customFields"] == document["action"]["fields"]
    assert "fields" not in wire["action"]
    assert wire["action"]["actionType"] == "donate"
    assert wire["action"]["createdAt"] == "2024-10-14T11:02:24Z"
    for key in ("actionPageId", "actionPage", "campaignId", "campaign", "tracking"):
        assert wire[key] == document[key]


@pytest.mark.parametrize("contact", VARIANTS)
def test_v1_unknown_keys_are_carried_over(contact: dict[str, Any]) -> None:
    document = v1_message({**contact, "futureContactKey": 1}, {**CONSENT, "futurePrivacy": "x"})
    document["campaign"]["futureCampaignKey"] = [1]
    wire = to_wire(_upgrade(document))
    assert wire["futureTopKey"] == {"nested": [1, 2]}
    assert wire["action"]["futureActionKey"] == "kept"
    assert wire["contact"]["futureContactKey"] == 1
    assert wire["privacy"]["futurePrivacy"] == "x"
    assert wire["campaign"]["futureCampaignKey"] == [1]


def test_v1_encrypted_contact_moves_to_personal_info() -> None:
    message = _upgrade(v1_message(CONTACT_ENCRYPTED, CONSENT))
    wire = to_wire(message)
    assert wire["personalInfo"] == {
        "payload": PAYLOAD,
        "nonce": NONCE,
        "encryptKey": {"id": None, "public": RECIPIENT_PUBLIC},
        "signKey": {"id": None, "public": SENDER_PUBLIC},
    }
    # seeded from the clear v1 contact; no area (v1 encrypted contacts have none)
    assert wire["contact"] == {"contactRef": REF, "firstName": "Sim", "email": None}
    for v1_only in ("ref", "payload", "nonce", "publicKey", "signKey"):
        assert v1_only not in wire["contact"]


def test_v1_clear_payload_is_merged_over_seed() -> None:
    message = _upgrade(v1_message(CONTACT_CLEAR, CONSENT))
    wire = to_wire(message)
    assert wire["personalInfo"] is None
    assert wire["contact"] == {"contactRef": REF, **CLEAR_RECORD}
    assert message.contact.email == "bruce@example.org"  # payload wins over the seed
    assert message.contact.first_name == "Bruce"


def test_v1_empty_payload_keeps_clear_seed() -> None:
    message = _upgrade(v1_message(CONTACT_EMPTY, None))
    wire = to_wire(message)
    assert wire["personalInfo"] is None
    assert wire["contact"] == {
        "contactRef": REF,
        "firstName": "Bruce",
        "email": "bruce@example.org",
        "area": "DE",
    }


@pytest.mark.parametrize(
    ("privacy", "expected"),
    [
        pytest.param(
            None,
            {"withConsent": False, "emailStatus": None, "emailStatusChanged": None},
            id="null",
        ),
        pytest.param(
            {"communication": True, "givenAt": "2024-10-14T11:02:24Z"},
            {
                "optIn": True,
                "givenAt": "2024-10-14T11:02:24Z",
                "withConsent": True,
                "emailStatus": None,
                "emailStatusChanged": None,
            },
            id="communication-true",
        ),
        pytest.param(
            {"communication": False, "givenAt": "2024-10-14T11:02:24Z"},
            {
                "optIn": False,
                "givenAt": "2024-10-14T11:02:24Z",
                "withConsent": True,
                "emailStatus": None,
                "emailStatusChanged": None,
            },
            id="communication-false",
        ),
        pytest.param(
            {"communication": None, "givenAt": "2024-10-14T11:02:24Z"},
            {
                "optIn": None,
                "givenAt": "2024-10-14T11:02:24Z",
                "withConsent": True,
                "emailStatus": None,
                "emailStatusChanged": None,
            },
            id="communication-null",
        ),
    ],
)
def test_v1_privacy(privacy: dict[str, Any] | None, expected: dict[str, Any]) -> None:
    message = _upgrade(v1_message(CONTACT_EMPTY, privacy))
    assert to_wire(message)["privacy"] == expected
    assert message.privacy.opt_in is expected.get("optIn")
    assert message.privacy.with_consent is expected["withConsent"]


def test_v1_minimal_message_without_optional_keys() -> None:
    document = {
        "schema": "proca:action:1",
        "stage": "supporter_confirm",
        "actionId": 5,
        "action": {"actionType": "register", "createdAt": "2022-11-01T11:11:11Z"},
        "campaign": {"name": "c", "title": "C"},
        "contact": {"ref": REF, "payload": ""},
        "privacy": None,
    }
    message = _upgrade(document)
    assert message.stage is Stage.SUPPORTER_CONFIRM
    assert message.action.custom_fields == {}
    assert message.action.testing is False
    assert message.action.donation is None
    assert "donation" not in to_wire(message)["action"]


def test_upgrade_v1_directly() -> None:
    v1 = ActionMessageV1.model_validate(v1_message(CONTACT_CLEAR, CONSENT))
    upgraded = upgrade_v1(v1)
    assert to_wire(upgraded) == to_wire(_upgrade(v1_message(CONTACT_CLEAR, CONSENT)))


def test_v1_encrypted_decrypts_with_test_vector() -> None:
    keystore = crypto.Keystore.from_json({RECIPIENT_PUBLIC: {"private": RECIPIENT_PRIVATE}})
    message = decode(orjson.dumps(v1_message(CONTACT_ENCRYPTED, CONSENT)))
    decrypted = crypto.decrypt_message(message, keystore)
    assert isinstance(decrypted, ActionMessage)
    assert decrypted.contact.record() == {"contactRef": REF, **PLAINTEXT}
    assert decrypted.contact.first_name == "Simone"  # decrypted beats the clear seed "Sim"
    assert decrypted.contact.email == "simone@example.org"


@pytest.mark.parametrize(
    ("contact", "reason"),
    [
        pytest.param(
            {**CONTACT_CLEAR, "payload": "{not json"}, Reason.INVALID_FIELD, id="payload-not-json"
        ),
        pytest.param(
            {**CONTACT_CLEAR, "payload": "[1, 2]"}, Reason.INVALID_FIELD, id="payload-array"
        ),
        pytest.param(
            {**CONTACT_CLEAR, "payload": '{"email": 5}'},
            Reason.INVALID_FIELD,
            id="payload-email-number",
        ),
        pytest.param(
            {**CONTACT_CLEAR, "payload": '{"dupeRank": "x"}'},
            Reason.INVALID_FIELD,
            id="payload-dupeRank-string",
        ),
        pytest.param({"payload": ""}, Reason.MISSING_FIELD, id="no-ref-no-email"),
        pytest.param({**CONTACT_CLEAR, "ref": 12}, Reason.INVALID_FIELD, id="ref-number"),
    ],
)
def test_v1_bad_contact_is_a_decode_error(contact: dict[str, Any], reason: Reason) -> None:
    with pytest.raises(DecodeError) as info:
        decode(orjson.dumps(v1_message(contact, CONSENT)))
    assert info.value.reason is reason
    assert "bruce@example.org" not in str(info.value)


@pytest.mark.parametrize(
    ("path", "value", "reason"),
    [
        pytest.param(("action",), None, Reason.INVALID_FIELD, id="null-action"),
        pytest.param(("actionId",), "abc", Reason.INVALID_FIELD, id="actionId-abc"),
        pytest.param(
            ("action", "createdAt"), "yesterday", Reason.INVALID_FIELD, id="createdAt-yesterday"
        ),
        pytest.param(
            ("privacy", "communication"),
            "yes please",
            Reason.INVALID_FIELD,
            id="communication-string",
        ),
        pytest.param(("stage",), "confirm", Reason.INVALID_FIELD, id="stage-confirm"),
    ],
)
def test_v1_bad_fields(path: tuple[str, ...], value: Any, reason: Reason) -> None:
    document = v1_message(CONTACT_EMPTY, CONSENT)
    node = document
    for part in path[:-1]:
        node = node[part]
    node[path[-1]] = value
    with pytest.raises(DecodeError) as info:
        decode(orjson.dumps(document))
    assert info.value.reason is reason


@pytest.mark.parametrize("key", ["action", "contact", "campaign", "actionId", "stage"])
def test_v1_missing_required_key(key: str) -> None:
    document = v1_message(CONTACT_EMPTY, CONSENT)
    del document[key]
    with pytest.raises(DecodeError) as info:
        decode(orjson.dumps(document))
    assert info.value.reason is Reason.MISSING_FIELD


def test_v1_null_donation_is_no_donation() -> None:
    document = v1_message(CONTACT_EMPTY, CONSENT)
    document["action"]["donation"] = None
    wire = to_wire(_upgrade(document))
    assert "donation" not in wire["action"]  # v2: the key is absent without a donation


def test_v1_contact_with_only_some_key_material_is_clear() -> None:
    """messages.md §5.1: encrypted means nonce, publicKey *and* signKey."""
    for partial in ({"nonce": NONCE}, {"nonce": NONCE, "publicKey": RECIPIENT_PUBLIC}):
        message = _upgrade(v1_message({**CONTACT_CLEAR, **partial}, CONSENT))
        assert message.personal_info is None
        assert message.contact.email == "bruce@example.org"  # the clear payload, merged


@pytest.mark.parametrize(
    ("payload", "text"),
    [
        pytest.param("{not json", "v1 contact.payload is not JSON", id="not-json"),
        pytest.param("[1, 2]", "v1 contact.payload is not an object", id="array"),
        pytest.param('"bruce@example.org"', "v1 contact.payload is not an object", id="string"),
    ],
)
def test_v1_payload_errors_say_what_is_wrong_without_the_payload(payload: str, text: str) -> None:
    with pytest.raises(DecodeError) as info:
        decode(orjson.dumps(v1_message({**CONTACT_CLEAR, "payload": payload}, CONSENT)))
    assert info.value.args == (text,)
    assert info.value.reason is Reason.INVALID_FIELD


def test_v1_upgrade_without_privacy_key() -> None:
    document = v1_message(CONTACT_EMPTY, None)
    del document["privacy"]
    wire = to_wire(_upgrade(document))
    assert wire["privacy"] == {
        "withConsent": False,
        "emailStatus": None,
        "emailStatusChanged": None,
    }
    assert "area" in wire["contact"]
    del document["contact"]["area"]
    assert "area" not in to_wire(_upgrade(document))["contact"]  # absent stays absent
