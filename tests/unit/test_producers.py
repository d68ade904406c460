"""Producers build the wire format of messages.md, and the simulator's traffic is valid,
deterministic and its poison is refused."""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta
from typing import Any
from zoneinfo import ZoneInfo

import orjson
import pytest

from proca_sync.crypto import KeyPair, Keystore, b64decode, decrypt_message
from proca_sync.errors import DecryptError, PermanentError, Reason
from proca_sync.messages import (
    ActionMessage,
    CampaignUpdatedEvent,
    ConfirmCreatedEvent,
    EmailStatusEvent,
    decode,
    to_wire,
)
from proca_sync.pipeline import topology
from proca_sync.pipeline.producers import (
    CampaignInfo,
    Consent,
    ContactData,
    DonationData,
    Encryption,
    NonceCounter,
    OrgInfo,
    PageInfo,
    PrivacyData,
    TrackingData,
    action_route,
    build_action,
    build_action_v1,
    build_campaign_updated,
    build_confirm_created,
    build_email_status_event,
    build_system_message,
    camelize,
    clock_time,
    db_time,
    event_route,
)
from proca_sync.pipeline.simulate import (
    ACTION_KINDS,
    POISON_KINDS,
    Kind,
    derive_keypair,
    plan_traffic,
    summarize,
)

# crypto.md §7 (published test keys).
INSTANCE = KeyPair(
    public="jYUbBVfmt_VOWFBcB255mrABQjB4zKe9a8i746GXkhw",
    private="VQvhl-ULFUd0eeO3HuC-nhdyX47E6eHBxdvI4bfwdr0",
)
ORG_KEY = KeyPair(
    public="W59ljG1wEj4oh90f9nEqK4fV_izE2XkkC6BMJtu8H2s",
    private="TDz284HQ3MSNM14zIHCXJdhoUs4geSL-qyfMAqmNlBA",
)
VECTOR_NONCE = int.from_bytes(bytes(range(24)), "big")
VECTOR_PAYLOAD = (
    "Tgj-z5KqufDffDFDVVMsvS8peX70BQR2gqB0qczeQWZkcl-vLZHoWkXCVF-CjNJrYxd7H4vzA6rLPf9keiKZh5Oeso"
    "odLFUm9AObHf1RQodK3Eu4mhuyPL_rplK7B93cvsXjvt1HpEfjVa6_shpxXLcpFBV4x66P960Cu1C9AdCF3vZTKV7t"
    "lbwl"
)
SIMONE = {
    "firstName": "Simone",
    "lastName": "de Beauvoir",
    "email": "simone@example.org",
    "country": "FR",
    "postcode": "75001",
    "area": "FR",
}

T0 = datetime(2024, 10, 14, 11, 2, 24, tzinfo=UTC)
PAGE = PageInfo(3120, "example.org/petition/de", "de", "petition_de")
CAMPAIGN = CampaignInfo(564, "petition_x", "Petition X", 621987, "basic")
ORG = OrgInfo(766, "example_org", "Example Organisation")
REF = "1E4HalXr1WJkKnaeSyOgI8zTG8cKMu-vgFzWqeICtxY"
BRUCE = {
    "firstName": "Bruce",
    "lastName": "Wayne",
    "email": "bruce@example.org",
    "phone": "+49 30 123456",
    "country": "DE",
    "postcode": "10115",
    "area": "DE",
    "address": {"region": None, "locality": "Berlin", "street": "Hauptstr.", "streetNumber": "1"},
}
TRACKING = TrackingData("newsletter", "email", "oct", "", "https://example.org/petition")
CONSENT = PrivacyData(Consent(True, T0), with_consent=True)


def keystore() -> Keystore:
    return Keystore([ORG_KEY])


def encryption(start: int = VECTOR_NONCE) -> Encryption:
    return Encryption(ORG_KEY.public, INSTANCE, NonceCounter(start), 12, 1)


def roundtrips(document: dict[str, Any]) -> Any:
    """Serialise like the Publisher, decode, and check nothing is lost or added."""
    body = orjson.dumps(document)
    message = decode(body)
    assert to_wire(message) == orjson.loads(body)
    return message


def bruce_action(**overrides: Any) -> dict[str, Any]:
    arguments: dict[str, Any] = {
        "action_id": 4722132,
        "action_type": "register",
        "created_at": T0,
        "page": PAGE,
        "campaign": CAMPAIGN,
        "org": ORG,
        "contact": ContactData.from_record(REF, BRUCE),
        "privacy": CONSENT,
        "custom_fields": {"comment": "Count me in", "emailProvider": "example.org"},
        "tracking": TRACKING,
    }
    arguments.update(overrides)
    return build_action(**arguments)


# ---- timestamps, keys, nonces -----------------------------------------------------------


def test_timestamps() -> None:
    moment = datetime(2024, 5, 2, 10, 11, 12, 123456, tzinfo=UTC)
    assert db_time(moment) == "2024-05-02T10:11:12Z"
    assert clock_time(moment) == "2024-05-02T10:11:12.123456Z"
    shifted = moment.astimezone(ZoneInfo("Europe/Berlin"))
    assert db_time(shifted) == "2024-05-02T10:11:12Z"
    with pytest.raises(ValueError, match="timezone"):
        db_time(datetime(2024, 5, 2))


@pytest.mark.parametrize(
    ("key", "expected"),
    [
        ("my_field", "myField"),
        ("Comment", "comment"),
        ("emailProvider", "emailProvider"),
        ("utm_source_x", "utmSourceX"),
        ("plain", "plain"),
    ],
)
def test_camelize(key: str, expected: str) -> None:
    assert camelize(key) == expected


def test_nonce_counter_is_big_endian_and_wraps() -> None:
    counter = NonceCounter(VECTOR_NONCE)
    assert counter.next() == bytes(range(24))
    assert counter.next() == bytes(range(23)) + bytes([24])
    top = NonceCounter((1 << 192) - 1)
    assert top.next() == b"\xff" * 24
    assert top.next() == b"\x00" * 24
    assert NonceCounter(255).next()[-2:] == b"\x00\xff"
    assert NonceCounter().next() != NonceCounter().next()  # random starts


def test_encryption_reproduces_the_crypto_test_vector() -> None:
    info = encryption().seal(SIMONE)
    assert info == {
        "payload": VECTOR_PAYLOAD,
        "nonce": "AAECAwQFBgcICQoLDA0ODxAREhMUFRYX",
        "encryptKey": {"id": 12, "public": ORG_KEY.public},
        "signKey": {"id": 1, "public": INSTANCE.public},
    }


# ---- action v2 --------------------------------------------------------------------------


def test_clear_action_is_the_spec_example() -> None:
    """messages.md §2.11, key for key."""
    document = bruce_action()
    assert document == {
        "schema": "proca:action:2",
        "stage": "deliver",
        "actionId": 4722132,
        "action": {
            "actionType": "register",
            "customFields": {"comment": "Count me in", "emailProvider": "example.org"},
            "createdAt": "2024-10-14T11:02:24Z",
            "testing": False,
        },
        "actionPageId": 3120,
        "actionPage": {
            "name": "example.org/petition/de",
            "locale": "de",
            "thankYouTemplate": "petition_de",
            "thankYouTemplateRef": None,
            "supporterConfirmTemplate": None,
        },
        "campaignId": 564,
        "campaign": {
            "name": "petition_x",
            "title": "Petition X",
            "externalId": 621987,
            "contactSchema": "basic",
        },
        "orgId": 766,
        "org": {"name": "example_org", "title": "Example Organisation"},
        "contact": {"contactRef": REF, "dupeRank": 0, **BRUCE},
        "personalInfo": None,
        "privacy": {
            "optIn": True,
            "givenAt": "2024-10-14T11:02:24Z",
            "withConsent": True,
            "emailStatus": None,
            "emailStatusChanged": None,
        },
        "tracking": {
            "source": "newsletter",
            "medium": "email",
            "campaign": "oct",
            "content": "",
            "location": "https://example.org/petition",
        },
    }
    message = roundtrips(document)
    assert isinstance(message, ActionMessage)
    assert message.stage == "deliver"


def test_encrypted_action_has_layer1_only_and_decrypts() -> None:
    document = bruce_action(encryption=encryption())
    assert document["contact"] == {
        "contactRef": REF,
        "dupeRank": 0,
        "firstName": "Bruce",
        "email": "bruce@example.org",
        "area": "DE",
    }
    info = document["personalInfo"]
    assert set(info) == {"payload", "nonce", "encryptKey", "signKey"}
    assert len(info["nonce"]) == 32 and "=" not in info["payload"]
    assert len(b64decode(info["payload"])) == len(orjson.dumps(BRUCE)) + 16
    message = roundtrips(document)
    clear = decrypt_message(message, keystore())
    assert isinstance(clear, ActionMessage)
    assert clear.contact.record() == {"contactRef": REF, "dupeRank": 0, **BRUCE}


def test_high_security_and_cleared_layer1() -> None:
    contact = ContactData.from_record(REF, BRUCE, high_security=True)
    document = bruce_action(contact=contact, encryption=encryption())
    assert document["contact"]["firstName"] is None
    assert document["contact"]["email"] is None
    cleared = ContactData.from_record(REF, BRUCE, keep_email=False)
    assert bruce_action(contact=cleared, encryption=encryption())["contact"]["email"] is None
    # In clear the record restores the e-mail (layer 2 wins).
    assert bruce_action(contact=cleared)["contact"]["email"] == "bruce@example.org"


def test_each_encryption_uses_a_new_nonce() -> None:
    enc = encryption()
    first = bruce_action(encryption=enc)["personalInfo"]
    second = bruce_action(encryption=enc)["personalInfo"]
    assert first["nonce"] != second["nonce"]
    assert first["payload"] != second["payload"]


def test_donation_stage_and_privacy_variants() -> None:
    donation = DonationData(2500, "EUR", "monthly", {"id": "pi_1"}, "stripe_payment_intent")
    changed = T0 + timedelta(minutes=5)
    document = bruce_action(
        stage="supporter_confirm",
        donation=donation,
        testing=True,
        tracking=None,
        privacy=PrivacyData(Consent(None, T0), False, "double_opt_in", changed),
    )
    assert document["stage"] == "supporter_confirm"
    assert document["action"]["donation"] == {
        "amount": 2500,
        "currency": "EUR",
        "frequencyUnit": "monthly",
        "payload": {"id": "pi_1"},
        "schema": "stripe_payment_intent",
    }
    assert document["action"]["testing"] is True
    assert document["tracking"] is None
    assert document["privacy"] == {
        "optIn": None,
        "givenAt": "2024-10-14T11:02:24Z",
        "withConsent": False,
        "emailStatus": "double_opt_in",
        "emailStatusChanged": "2024-10-14T11:07:24Z",
    }
    assert "schema" not in bruce_action(donation=DonationData(100))["action"]["donation"]
    assert "donation" not in bruce_action()["action"]
    roundtrips(document)


def test_privacy_without_contact_record() -> None:
    document = bruce_action(privacy=PrivacyData(None, False, "bounce", T0))
    assert document["privacy"] == {
        "withConsent": False,
        "emailStatus": "bounce",
        "emailStatusChanged": "2024-10-14T11:02:24Z",
    }
    roundtrips(document)


# ---- action v1 --------------------------------------------------------------------------


def v1(**overrides: Any) -> dict[str, Any]:
    arguments: dict[str, Any] = {
        "action_id": 4722132,
        "action_type": "register",
        "created_at": T0,
        "page": PAGE,
        "campaign": CAMPAIGN,
        "org": ORG,
        "contact": ContactData.from_record(REF, BRUCE),
        "privacy": CONSENT,
        "custom_fields": {"comment": "hi"},
    }
    arguments.update(overrides)
    return build_action_v1(**arguments)


def test_v1_clear() -> None:
    document = v1()
    assert document["schema"] == "proca:action:1"
    assert document["action"] == {
        "actionType": "register",
        "fields": {"comment": "hi"},
        "createdAt": "2024-10-14T11:02:24Z",
        "testing": False,
    }
    assert "supporterConfirmTemplate" not in document["actionPage"]
    assert "contactSchema" not in document["campaign"]
    contact = document["contact"]
    assert set(contact) == {"ref", "firstName", "email", "area", "payload"}
    assert orjson.loads(contact["payload"]) == BRUCE
    assert document["privacy"] == {"communication": True, "givenAt": "2024-10-14T11:02:24Z"}
    message = decode(orjson.dumps(document))
    assert isinstance(message, ActionMessage)
    assert message.contact.record()["lastName"] == "Wayne"
    assert message.org_id == 766


def test_v1_encrypted() -> None:
    document = v1(encryption=encryption())
    contact = document["contact"]
    assert set(contact) == {"ref", "firstName", "email", "payload", "nonce", "publicKey", "signKey"}
    assert contact["publicKey"] == ORG_KEY.public and contact["signKey"] == INSTANCE.public
    clear = decrypt_message(decode(orjson.dumps(document)), keystore())
    assert isinstance(clear, ActionMessage)
    assert clear.contact.record()["postcode"] == "10115"


def test_v1_without_contact_and_without_consent() -> None:
    document = v1(
        contact=ContactData(REF, {}, 0, None, None, "DE"),
        privacy=PrivacyData(Consent(True, T0), with_consent=False),
    )
    assert document["contact"]["payload"] == ""
    assert document["privacy"] is None
    message = decode(orjson.dumps(document))
    assert isinstance(message, ActionMessage)
    assert message.privacy.with_consent is False


# ---- events -----------------------------------------------------------------------------


def email_status(**overrides: Any) -> dict[str, Any]:
    arguments: dict[str, Any] = {
        "timestamp": T0 + timedelta(minutes=3),
        "contact": ContactData.from_record(REF, BRUCE, keep_email=False),
        "privacy": PrivacyData(Consent(True, T0), True, "double_opt_in", T0 + timedelta(minutes=3)),
        "action_id": 4722132,
        "created_at": T0,
        "custom_fields": {"email_provider": "example.org", "Comment": "x"},
        "page": PAGE,
        "campaign": CAMPAIGN,
        "tracking": TrackingData(),
    }
    arguments.update(overrides)
    return build_email_status_event(**arguments)


def test_email_status_event() -> None:
    document = email_status()
    assert not {"orgId", "org", "stage"} & set(document)
    assert document["eventType"] == "email_status"
    assert document["timestamp"] == "2024-10-14T11:05:24Z"
    assert document["supporter"]["privacy"] == {
        "optIn": True,
        "givenAt": "2024-10-14T11:02:24Z",
        "withConsent": False,  # always, even if the input said otherwise
        "emailStatus": "double_opt_in",
        "emailStatusChanged": "2024-10-14T11:05:24Z",
    }
    assert document["action"]["customFields"] == {"emailProvider": "example.org", "comment": "x"}
    assert "donation" not in document["action"]
    assert document["tracking"] == {
        "source": "unknown",
        "medium": "unknown",
        "campaign": "unknown",
        "content": "",
        "location": "",
    }
    message = roundtrips(document)
    assert isinstance(message, EmailStatusEvent)
    route = event_route(320, document)
    assert (route.exchange, route.routing_key) == ("org.320.event", "supporter.email_status")


def test_encrypted_email_status_event_decrypts() -> None:
    document = email_status(encryption=encryption())
    assert document["supporter"]["contact"]["email"] is None
    message = decrypt_message(roundtrips(document), keystore())
    assert isinstance(message, EmailStatusEvent)
    assert message.supporter.contact.email == "bruce@example.org"


def test_old_email_status_shape() -> None:
    document = email_status(action_id=None)
    assert set(document) == {"schema", "eventType", "timestamp", "supporter"}
    roundtrips(document)


def test_campaign_updated() -> None:
    config = {"some_key": {"Nested_Key": 1}, "locales": {"de_AT": {}}}
    document = build_campaign_updated(timestamp=T0, campaign=CAMPAIGN, org=ORG, config=config)
    assert document == {
        "schema": "proca:event:2",
        "eventType": "campaign_updated",
        "timestamp": "2024-10-14T11:02:24Z",
        "campaignId": 564,
        "orgId": 766,
        "campaign": {
            "id": 564,
            "name": "petition_x",
            "title": "Petition X",
            "externalId": 621987,
            "contactSchema": "basic",
            "config": config,
            "org": {"name": "example_org", "title": "Example Organisation"},
        },
    }
    assert isinstance(roundtrips(document), CampaignUpdatedEvent)
    route = event_route(766, document)
    assert (route.exchange, route.routing_key) == ("org.766.event", "system.campaign_updated")


def test_confirm_created_variants() -> None:
    launch = build_confirm_created(
        timestamp=T0,
        operation="launch_page",
        code="01234567",
        subject_id=3120,
        base_url="https://proca.example.org/",
        campaign=CAMPAIGN,
        org=ORG,
        twitter={"screenName": "example"},
    )
    confirm = launch["confirm"]
    assert confirm["acceptLink"] == "https://proca.example.org/link/accept/01234567"
    assert confirm["rejectLink"] == "https://proca.example.org/link/reject/01234567"
    assert confirm["objectId"] == "" and confirm["email"] == "" and confirm["creator"] == {}
    assert confirm["campaign"] == {"name": "petition_x", "title": "Petition X"}
    assert confirm["org"]["twitter"] == {
        "name": None,
        "screenName": "example",
        "picture": None,
        "description": None,
        "url": None,
        "followersCount": None,
    }
    assert isinstance(roundtrips(launch), ConfirmCreatedEvent)
    route = event_route(766, launch)
    assert route.routing_key == "confirm_created.launch_page"

    staffer = build_confirm_created(
        timestamp=T0,
        operation="add_staffer",
        code="7",
        subject_id=766,
        base_url="https://proca.example.org",
        email="new+staff@example.org",
        org=ORG,
        campaign=CAMPAIGN,
        creator={"email": "boss@example.org", "jobTitle": "Director"},
    )["confirm"]
    assert staffer["acceptLink"].endswith("/link/accept/7?email=new%2Bstaff@example.org")
    assert staffer["org"] == {"name": "example_org", "title": "Example Organisation"}
    assert "campaign" not in staffer

    partner = build_confirm_created(
        timestamp=T0,
        operation="add_partner",
        code="9",
        subject_id=564,
        object_id=42,
        base_url="https://proca.example.org",
        org=ORG,
    )["confirm"]
    assert partner["rejectLink"].endswith("/link/reject/9?id=42")
    assert partner["objectId"] == 42
    assert "org" not in partner and "campaign" not in partner


@pytest.mark.parametrize("event_type", ["join_campaign", "new_org", "new_user"])
def test_system_messages(event_type: Any) -> None:
    document = build_system_message(
        event_type=event_type,
        user_email="staff@example.org",
        created_at=datetime(2024, 5, 2, 10, 11, 12, 123456, tzinfo=UTC),
        org=ORG,
        campaign=CAMPAIGN,
        page=PAGE,
    )
    assert document["stage"] == "system" and document["actionId"] is None
    assert document["privacy"] == {} and document["tracking"] == {}
    assert document["action"]["createdAt"] == "2024-05-02T10:11:12.123456Z"
    assert document["contact"]["firstName"] == "staff"
    assert (document["campaignId"] is not None) == (event_type == "join_campaign")
    assert (document["orgId"] is None) == (event_type == "new_user")
    message = roundtrips(document)
    assert isinstance(message, ActionMessage)
    route = event_route(766, document)
    assert (route.exchange, route.routing_key) == ("org.766.event", f"system.{event_type}")


def test_action_routes() -> None:
    route = action_route(320, "deliver", "register", "fur_free_europe")
    assert (route.exchange, route.routing_key) == ("org.320.deliver", "register.fur_free_europe")
    route = action_route(320, "supporter_confirm", "share", "x")
    assert route.exchange == "org.320.confirm.supporter"


# ---- simulator --------------------------------------------------------------------------

SIM_ORG = 320
SIM_KEY = derive_keypair("unit-test-org")
EMAIL = re.compile(r"[A-Za-z0-9._%+-]+@([A-Za-z0-9.-]+)")
ALLOWED_DOMAINS = {"example.org", "example.com", "example.net", "mail.example.org"}


@pytest.fixture(scope="module")
def traffic() -> list[Any]:
    return plan_traffic(SIM_ORG, actions=400, seed=11, keys=SIM_KEY, poison=2)


def test_simulation_is_deterministic() -> None:
    first = plan_traffic(SIM_ORG, actions=80, seed=5, keys=SIM_KEY, poison=1)
    second = plan_traffic(SIM_ORG, actions=80, seed=5, keys=SIM_KEY, poison=1)
    assert first == second
    other = plan_traffic(SIM_ORG, actions=80, seed=6, keys=SIM_KEY, poison=1)
    assert [p.body for p in first] != [p.body for p in other]
    clear = plan_traffic(SIM_ORG, actions=80, seed=5)
    assert clear == plan_traffic(SIM_ORG, actions=80, seed=5)


def test_simulation_counts(traffic: list[Any]) -> None:
    counts = summarize(traffic)
    assert sum(counts.get(kind, 0) for kind in ACTION_KINDS) == 400
    for kind in POISON_KINDS:
        assert counts[f"poison.{kind}"] == 2
    for kind in Kind:
        assert counts.get(kind.value, 0) > 0, kind
    assert all(isinstance(key, str) and type(key) is str for key in counts)


def test_simulated_messages_are_valid_and_decrypt(traffic: list[Any]) -> None:
    store = Keystore([SIM_KEY])
    encrypted = clear = 0
    for item in traffic:
        if item.kind.startswith("poison."):
            continue
        document = orjson.loads(item.body)
        message = decode(item.body)
        if document["schema"] != "proca:action:1":
            assert to_wire(message) == document, item.kind
        opened = decrypt_message(message, store)
        if isinstance(opened, ActionMessage) and opened.stage != "system":
            if opened.personal_info is not None:
                encrypted += 1
            else:
                clear += 1
            assert opened.contact.record().get("email"), item.kind
    assert encrypted > 0 and clear > 0


def test_simulated_routes_come_from_the_topology(traffic: list[Any]) -> None:
    exchanges = {x.name for x in topology.plan_topology(SIM_ORG, topology.OrgFlags()).exchanges}
    for item in traffic:
        assert item.exchange in exchanges - {"org.320.fail", "org.320.retry"}
        if item.kind.startswith("poison."):
            continue
        document = orjson.loads(item.body)
        if document["schema"].startswith("proca:action") and document["stage"] != "system":
            assert item.exchange == topology.stage_exchange(SIM_ORG, document["stage"])
            assert item.routing_key == topology.action_routing_key(
                document["action"]["actionType"], document["campaign"]["name"]
            )
        else:
            assert item.exchange == "org.320.event"


def test_simulated_journeys_are_realistic(traffic: list[Any]) -> None:
    store = Keystore([SIM_KEY])
    by_kind: dict[str, list[Any]] = {}
    for item in traffic:
        if not item.kind.startswith("poison."):
            by_kind.setdefault(item.kind, []).append(decrypt_message(decode(item.body), store))
    assert all(m.privacy.with_consent is False for m in by_kind["follow_up"])
    assert {m.action.action_type for m in by_kind["follow_up"]} == {"share_open", "share_close"}
    assert all((m.contact.dupe_rank or 0) > 0 for m in by_kind["duplicate"])
    assert all(m.action.testing for m in by_kind["testing"])
    assert not any(m.action.testing for m in by_kind["action"])
    assert all(m.org_id != SIM_ORG for m in by_kind["partner"])
    assert all(m.action.donation is not None for m in by_kind["donation"])
    assert all(m.stage == "supporter_confirm" for m in by_kind["supporter_confirm"])
    statuses = {m.supporter.privacy.email_status for m in by_kind["email_status"]}
    assert "double_opt_in" in statuses and statuses & {"bounce", "spam", "unsub"}
    for event in by_kind["email_status"]:
        assert event.supporter.privacy.with_consent is False
        assert event.timestamp >= event.action.created_at  # same format: string order works
    # One person, two campaigns: the same contactRef with newer data in the second.
    refs: dict[str, set[str]] = {}
    for message in by_kind["action"]:
        refs.setdefault(message.contact.contact_ref, set()).add(message.campaign.name)
    assert any(len(campaigns) == 2 for campaigns in refs.values())


def test_simulation_uses_invented_addresses_only(traffic: list[Any]) -> None:
    store = Keystore([SIM_KEY])
    for item in traffic:
        text = item.body.decode("utf-8", "replace")
        if not item.kind.startswith("poison."):
            message = decrypt_message(decode(item.body), store)
            text += orjson.dumps(to_wire(message)).decode()
        for domain in EMAIL.findall(text):
            assert domain in ALLOWED_DOMAINS, domain


@pytest.mark.parametrize("kind", POISON_KINDS)
def test_every_poison_kind_is_refused(kind: str, traffic: list[Any]) -> None:
    bodies = [item.body for item in traffic if item.kind == f"poison.{kind}"]
    assert len(bodies) == 2
    for body in bodies:
        with pytest.raises(PermanentError):
            decrypt_message(decode(body), Keystore([SIM_KEY]))


@pytest.mark.parametrize(
    ("kind", "reason"),
    [
        ("truncated_json", Reason.INVALID_JSON),
        ("non_utf8", Reason.INVALID_JSON),
        ("json_array", Reason.NOT_AN_OBJECT),
        ("unknown_schema", Reason.UNKNOWN_SCHEMA),
        ("missing_action", Reason.MISSING_FIELD),
        ("wrong_types", Reason.INVALID_FIELD),
        ("unknown_key", Reason.UNKNOWN_KEY),
        ("tampered_mac", Reason.DECRYPT_FAILED),
        ("missing_nonce", Reason.MALFORMED_CIPHERTEXT),
        ("null_action_id", Reason.MISSING_FIELD),
    ],
)
def test_poison_fails_for_its_own_reason(kind: str, reason: Reason, traffic: list[Any]) -> None:
    body = next(item.body for item in traffic if item.kind == f"poison.{kind}")
    with pytest.raises(PermanentError) as caught:
        decrypt_message(decode(body), Keystore([SIM_KEY]))
    assert caught.value.reason is reason


def test_poison_without_org_key_is_still_refused() -> None:
    planned = plan_traffic(SIM_ORG, actions=5, seed=3, poison=1)
    poison = [p for p in planned if p.kind.startswith("poison.")]
    assert len(poison) == len(POISON_KINDS)
    for item in poison:
        with pytest.raises(PermanentError):
            decrypt_message(decode(item.body), None)
    body = next(p.body for p in poison if p.kind == "poison.tampered_mac")
    with pytest.raises(DecryptError) as caught:
        decrypt_message(decode(body), None)
    assert caught.value.reason is Reason.NO_KEYSTORE


def test_plan_rejects_negative_sizes() -> None:
    with pytest.raises(ValueError, match=">= 0"):
        plan_traffic(SIM_ORG, actions=-1)
