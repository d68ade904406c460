"""Property tests: decode / decrypt never fail with anything but their own error classes.

Whatever arrives on a queue — random bytes, a sample message with keys dropped or values
of the wrong type, a ``personalInfo`` block of garbage — ``decode`` returns a message or
raises :class:`DecodeError`, and ``decrypt_message`` returns a message or raises
:class:`DecryptError`. Any other exception would crash the consumer instead of parking the
message.
"""

from __future__ import annotations

import base64
import copy
from collections.abc import Callable
from typing import Any

import orjson
from hypothesis import given, settings
from hypothesis import strategies as st

from proca_sync.crypto import KeyPair, Keystore, b64encode, decrypt_message, encrypt_record
from proca_sync.errors import DecodeError, DecryptError
from proca_sync.messages import (
    ActionMessage,
    CampaignUpdatedEvent,
    ConfirmCreatedEvent,
    EmailStatusEvent,
    UnknownEvent,
    decode,
    to_wire,
)
from tests.support.vector import (
    NONCE,
    PAYLOAD,
    RECIPIENT_PRIVATE,
    RECIPIENT_PUBLIC,
    SENDER_PRIVATE,
    SENDER_PUBLIC,
)

Loader = Callable[[str], bytes]

FUZZ = settings(max_examples=200, deadline=None, database=None)

MESSAGE_TYPES = (
    ActionMessage,
    EmailStatusEvent,
    CampaignUpdatedEvent,
    ConfirmCreatedEvent,
    UnknownEvent,
)

# crypto.md §7 test vector
VECTOR_INFO = {
    "payload": PAYLOAD,
    "nonce": NONCE,
    "encryptKey": {"id": 12, "public": RECIPIENT_PUBLIC},
    "signKey": {"id": 1, "public": SENDER_PUBLIC},
}
SENDER = KeyPair(SENDER_PUBLIC, SENDER_PRIVATE)
OTHER = KeyPair.generate()
KEYSTORES = [
    None,
    Keystore(),
    Keystore.from_json({RECIPIENT_PUBLIC: {"private": RECIPIENT_PRIVATE}}),
    Keystore([OTHER]),
]

FIXTURES = [
    "petition_optin.json",
    "petition_optout.json",
    "petition_doubleoptin.json",
    "share_twitter.json",
    "event.json",
    "event_doubleoptin.json",
]

# Seeds that are not among the sample files: the other kinds of message (messages.md).
EXTRA_SEEDS: list[dict[str, Any]] = [
    {
        "schema": "proca:action:2",
        "stage": "system",
        "eventType": "join_campaign",
        "actionId": None,
        "action": {
            "actionType": "join_campaign",
            "customFields": {},
            "createdAt": "2024-05-02T10:11:12.123456Z",
            "testing": False,
        },
        "actionPageId": None,
        "actionPage": None,
        "campaignId": 564,
        "campaign": {"name": "petition_x", "title": "Petition X", "externalId": None},
        "orgId": 766,
        "org": {"name": "example_org", "title": "Example Organisation"},
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
    },
    {
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
            "config": {"a_b": 1},
            "org": {"name": "example_org", "title": "Example Organisation"},
        },
    },
    {
        "schema": "proca:event:2",
        "eventType": "confirm_created",
        "timestamp": "2024-09-30T16:17:36Z",
        "confirm": {"operation": "add_staffer", "code": "1234", "email": "", "objectId": ""},
    },
    {
        "schema": "proca:action:1",
        "stage": "deliver",
        "actionId": 17,
        "action": {
            "actionType": "register",
            "fields": {"x": 1},
            "createdAt": "2022-11-01T11:11:11Z",
            "testing": True,
            "donation": {"amount": 100, "currency": "EUR", "frequencyUnit": "one_off"},
        },
        "campaign": {"name": "test", "title": "Test", "externalId": None},
        "orgId": 766,
        "org": {"name": "o", "title": "O"},
        "contact": {
            "ref": "MDWJu2fbogTgTHgLTLl-OFvRII63xZE76i7w3qHfbbE",
            "firstName": "Simone",
            "email": "sync+3@proca.app",
            "area": "BE",
            "payload": '{"firstName": "Simone", "email": "sync+3@proca.app", "postcode": "1"}',
        },
        "privacy": {"communication": True, "givenAt": "2022-11-01T11:11:11Z"},
    },
    {
        "schema": "proca:action:1",
        "stage": "deliver",
        "actionId": 18,
        "action": {"actionType": "register", "fields": {}, "createdAt": "2022-11-01T11:11:11Z"},
        "campaign": {"name": "test", "title": "Test"},
        "contact": {
            "ref": "MDWJu2fbogTgTHgLTLl-OFvRII63xZE76i7w3qHfbbE",
            "firstName": None,
            "email": None,
            "payload": PAYLOAD,
            "nonce": NONCE,
            "publicKey": RECIPIENT_PUBLIC,
            "signKey": SENDER_PUBLIC,
        },
        "privacy": None,
    },
]

# ---- strategies ------------------------------------------------------------------------

SCALARS = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**63), max_value=2**64 - 1)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=20)
    | st.sampled_from(
        [
            "",
            "proca:action:1",
            "proca:action:2",
            "proca:event:2",
            "deliver",
            "system",
            "email_status",
            "campaign_updated",
            "confirm_created",
            "2024-09-30T16:17:36Z",
            "0001-01-01T00:00:00+01:00",
            "9999-12-31T23:59:59-14:00",
            "2024-13-45T99:99:99Z",
            "{}",
            '{"email": 5}',
            "[]",
            NONCE,
            RECIPIENT_PUBLIC,
        ]
    )
)

JSON = st.recursive(
    SCALARS,
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=10), children, max_size=4)
    ),
    max_leaves=8,
)

WIRE_KEYS = st.sampled_from(
    [
        "schema",
        "stage",
        "eventType",
        "actionId",
        "action",
        "contact",
        "privacy",
        "personalInfo",
        "supporter",
        "timestamp",
        "campaign",
        "payload",
        "nonce",
        "encryptKey",
        "signKey",
        "public",
        "donation",
        "customFields",
        "createdAt",
    ]
)

MUTATIONS = ["drop", "null", "replace", "insert"]


def _operation(byte: int, *, keep_below: int) -> str:
    """Keep (and recurse) most of the time, so that a few mutations reach deep fields."""
    return "keep" if byte < keep_below else MUTATIONS[byte % len(MUTATIONS)]


def _count(value: Any) -> int:
    if isinstance(value, dict):
        return 1 + sum(_count(child) for child in value.values())
    if isinstance(value, list):
        return 1 + sum(_count(child) for child in value)
    return 1


def _mutate(data: st.DataObject, seed: Any) -> Any:
    """Drop keys, null or replace values, insert keys: one operation byte per node."""
    size = _count(seed)
    ops = iter(data.draw(st.binary(min_size=size, max_size=size), label="operations"))

    def walk(value: Any, top: bool = False) -> Any:
        if isinstance(value, dict):
            out: dict[str, Any] = {}
            for key, child in value.items():
                # the schema is rarely touched: else most cases stop at unknown_schema
                keep_below = 250 if top and key == "schema" else 236
                operation = _operation(next(ops), keep_below=keep_below)
                if operation == "keep":
                    out[key] = walk(child)
                elif operation == "null":
                    out[key] = None
                elif operation == "replace":
                    out[key] = data.draw(JSON)
                elif operation == "insert":
                    out[key] = walk(child)
                    out[data.draw(WIRE_KEYS | st.text(max_size=8))] = data.draw(JSON)
            return out
        if isinstance(value, list):
            return [walk(child) for child in value if next(ops) < 236]
        return value

    return walk(seed, top=True)


def _check_decode(body: bytes | str) -> Any:
    try:
        message = decode(body)
    except DecodeError:
        return None
    assert isinstance(message, MESSAGE_TYPES)
    orjson.dumps(to_wire(message))  # a decoded message always re-encodes
    return message


# ---- decode ----------------------------------------------------------------------------


@FUZZ
@given(body=st.binary(max_size=400))
def test_decode_arbitrary_bytes(body: bytes) -> None:
    _check_decode(body)


@FUZZ
@given(body=st.text(st.characters(exclude_categories=()), max_size=200))  # lone surrogates too
def test_decode_arbitrary_text(body: str) -> None:
    _check_decode(body)


@FUZZ
@given(document=JSON)
def test_decode_arbitrary_json(document: Any) -> None:
    _check_decode(orjson.dumps(document))


@FUZZ
@given(
    document=st.fixed_dictionaries(
        {"schema": st.sampled_from(["proca:action:1", "proca:action:2", "proca:event:2"])},
        optional={
            "stage": SCALARS,
            "eventType": SCALARS,
            "actionId": SCALARS,
            "action": JSON,
            "contact": JSON,
            "campaign": JSON,
            "privacy": JSON,
            "supporter": JSON,
            "timestamp": SCALARS,
            "confirm": JSON,
        },
    )
)
def test_decode_random_objects_with_known_schema(document: dict[str, Any]) -> None:
    _check_decode(orjson.dumps(document))


@FUZZ
@given(data=st.data())
def test_decode_mutated_samples(load_fixture: Loader, data: st.DataObject) -> None:
    seeds = [orjson.loads(load_fixture(name)) for name in FIXTURES] + EXTRA_SEEDS
    seed = data.draw(st.sampled_from(seeds))
    document = _mutate(data, copy.deepcopy(seed))
    _check_decode(orjson.dumps(document))


@FUZZ
@given(data=st.data())
def test_truncated_samples(load_fixture: Loader, data: st.DataObject) -> None:
    body = load_fixture(data.draw(st.sampled_from(FIXTURES)))
    cut = data.draw(st.integers(0, len(body) - 1))
    tail = data.draw(st.binary(max_size=4))
    _check_decode(body[:cut] + tail)


RECORD_KEYS = st.sampled_from(
    ["contactRef", "dupeRank", "firstName", "lastName", "email", "area", "address", "country"]
) | st.text(max_size=12)
FLAT_JSON = (
    SCALARS
    | st.lists(SCALARS, max_size=3)
    | st.dictionaries(st.text(max_size=5) | RECORD_KEYS, SCALARS, max_size=3)
)
RECORDS = st.dictionaries(RECORD_KEYS, FLAT_JSON, max_size=6)


@FUZZ
@given(record=RECORDS | JSON, as_text=st.booleans())
def test_decode_v1_random_clear_payload(record: Any, as_text: bool) -> None:
    # v1 clear contacts carry their record as a JSON *string* that the upgrade parses
    document = copy.deepcopy(EXTRA_SEEDS[3])
    document["contact"]["payload"] = orjson.dumps(record).decode() if as_text else record
    _check_decode(orjson.dumps(document))


@FUZZ
@given(record=RECORDS, name=st.sampled_from(["petition_optin.json", "event_doubleoptin.json"]))
def test_decode_random_clear_contact(load_fixture: Loader, record: Any, name: str) -> None:
    document = orjson.loads(load_fixture(name))
    holder = document.get("supporter", document)
    holder["contact"].update(record)
    _check_decode(orjson.dumps(document))


TIMESTAMPS = (
    st.builds(
        lambda moment, suffix: moment.isoformat() + suffix,
        st.datetimes(),
        st.sampled_from(["", "Z", "z", "+00:00", "+01:00", "-01:00", "+14:00", "-23:59"]),
    )
    | st.text(max_size=40)
    | st.sampled_from(["0001-01-01T00:00:00+01:00", "9999-12-31T23:59:59-01:00", "2024-02-30"])
)


@FUZZ
@given(data=st.data())
def test_decode_random_timestamps(load_fixture: Loader, data: st.DataObject) -> None:
    name, path = data.draw(
        st.sampled_from(
            [
                ("petition_optin.json", ("action", "createdAt")),
                ("petition_doubleoptin.json", ("privacy", "emailStatusChanged")),
                ("share_twitter.json", ("privacy", "givenAt")),
                ("event.json", ("timestamp",)),
                ("event_doubleoptin.json", ("supporter", "privacy", "givenAt")),
            ]
        )
    )
    document = orjson.loads(load_fixture(name))
    node = document
    for part in path[:-1]:
        node = node[part]
    node[path[-1]] = data.draw(TIMESTAMPS)
    _check_decode(orjson.dumps(document))


# ---- decrypt ---------------------------------------------------------------------------

B64_TEXT = (
    st.binary(max_size=200).map(b64encode)
    | st.binary(max_size=200).map(lambda raw: base64.urlsafe_b64encode(raw).decode())
    | st.text(max_size=60)
)
PUBLIC_KEYS = (
    st.sampled_from(
        [
            RECIPIENT_PUBLIC,
            RECIPIENT_PUBLIC + "=",
            SENDER_PUBLIC,
            OTHER.public,
            b64encode(bytes(32)),  # low-order point
            b64encode(b"\x01" + bytes(31)),  # low-order point
            b64encode(bytes(31)),
            "",
        ]
    )
    | st.binary(min_size=30, max_size=34).map(b64encode)
    | st.text(max_size=50)
)
KEY_REFS = (
    st.fixed_dictionaries(
        {"public": PUBLIC_KEYS},
        optional={"id": st.none() | st.integers(min_value=-(2**63), max_value=2**63 - 1)},
    )
    | JSON
)
MISSING = object()


def _part(valid: Any, broken: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    """Mostly the test-vector value, else a broken one or the key left out."""
    return st.one_of(st.just(valid), st.just(valid), broken, st.just(MISSING))


PERSONAL_INFO = st.fixed_dictionaries(
    {
        "payload": _part(PAYLOAD, B64_TEXT | JSON),
        "nonce": _part(NONCE, B64_TEXT | JSON),
        "encryptKey": _part(VECTOR_INFO["encryptKey"], KEY_REFS),
        "signKey": _part(
            VECTOR_INFO["signKey"], KEY_REFS | st.builds(lambda key: {"public": key}, PUBLIC_KEYS)
        ),
        "extra": _part(MISSING, JSON),
    }
).map(lambda info: {k: v for k, v in info.items() if v is not MISSING}) | JSON.filter(
    lambda value: isinstance(value, dict)
)


def _check_decrypt(document: dict[str, Any], keystore: Keystore | None) -> None:
    message = _check_decode(orjson.dumps(document))
    if message is None:
        return
    try:
        result = decrypt_message(message, keystore)
    except DecryptError:
        return
    assert type(result) is type(message)
    orjson.dumps(to_wire(result))


@FUZZ
@given(
    info=PERSONAL_INFO,
    keystore=st.sampled_from([*KEYSTORES, KEYSTORES[2], KEYSTORES[2]]),
    where=st.sampled_from(["petition_optin.json", "event_doubleoptin.json", "event.json"]),
)
def test_decrypt_random_personal_info(
    load_fixture: Loader,
    info: dict[str, Any],
    keystore: Keystore | None,
    where: str,
) -> None:
    document = orjson.loads(load_fixture(where))
    holder = document.get("supporter", document)
    holder["personalInfo"] = copy.deepcopy(info)
    _check_decrypt(document, keystore)


@FUZZ
@given(
    record=RECORDS,
    keystore=st.sampled_from(KEYSTORES),
    where=st.sampled_from(["share_twitter.json", "event_doubleoptin.json"]),
    nonce=st.binary(min_size=24, max_size=24),
)
def test_decrypt_random_records(
    load_fixture: Loader,
    record: dict[str, Any],
    keystore: Keystore | None,
    where: str,
    nonce: bytes,
) -> None:
    # a well-formed box around an arbitrary JSON object: merging it must not crash either
    document = orjson.loads(load_fixture(where))
    holder = document.get("supporter", document)
    holder["personalInfo"] = encrypt_record(
        record, recipient_public=RECIPIENT_PUBLIC, sender=SENDER, nonce=nonce
    )
    _check_decrypt(document, keystore)
