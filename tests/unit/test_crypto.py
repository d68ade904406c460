"""personalInfo decryption and the key store (crypto.md)."""

from __future__ import annotations

import json
import os
import stat
from collections.abc import Callable
from pathlib import Path
from typing import Any

import orjson
import pytest
from nacl.public import Box, PrivateKey, PublicKey

from proca_sync.crypto import (
    KeyPair,
    Keystore,
    b64decode,
    b64encode,
    decrypt_message,
    decrypt_record,
    encrypt_record,
)
from proca_sync.errors import ConfigError, DecryptError, Reason
from proca_sync.messages import ActionMessage, EmailStatusEvent, decode, to_wire
from proca_sync.messages.schemas import PersonalInfo
from tests.support.vector import (
    NONCE,
    PAYLOAD,
    PLAINTEXT,
    RECIPIENT_PRIVATE,
    RECIPIENT_PUBLIC,
    SENDER_PRIVATE,
    SENDER_PUBLIC,
)

Loader = Callable[[str], bytes]

# ---- crypto.md §7 test vector ----------------------------------------------------------

SENDER = KeyPair(SENDER_PUBLIC, SENDER_PRIVATE)
OTHER = KeyPair.generate()  # a key pair nobody encrypted for


def vector_info() -> dict[str, Any]:
    return {
        "payload": PAYLOAD,
        "nonce": NONCE,
        "encryptKey": {"id": 12, "public": RECIPIENT_PUBLIC},
        "signKey": {"id": 1, "public": SENDER_PUBLIC},
    }


def vector_keystore() -> Keystore:
    return Keystore.from_json({RECIPIENT_PUBLIC: {"private": RECIPIENT_PRIVATE}})


def _pad(text: str) -> str:
    return text + "=" * (-len(text) % 4)


def test_vector_decrypts_to_expected_plaintext() -> None:
    info = PersonalInfo.model_validate(vector_info())
    assert len(b64decode(PAYLOAD)) == 138  # 122 bytes of JSON + 16-byte tag, no nonce prefix
    assert decrypt_record(info, vector_keystore()) == PLAINTEXT


def test_vector_key_pairs_are_consistent() -> None:
    assert b64encode(bytes(PrivateKey(b64decode(SENDER_PRIVATE)).public_key)) == SENDER_PUBLIC
    assert b64encode(bytes(OTHER.private_key().public_key)) == OTHER.public


def test_encrypt_record_reproduces_vector() -> None:
    info = encrypt_record(
        PLAINTEXT, recipient_public=RECIPIENT_PUBLIC, sender=SENDER, nonce=bytes(range(24))
    )
    assert info["payload"] == PAYLOAD
    assert info["nonce"] == NONCE
    assert info["encryptKey"]["public"] == RECIPIENT_PUBLIC
    assert info["signKey"]["public"] == SENDER_PUBLIC


# ---- key store file --------------------------------------------------------------------


def _write(tmp_path: Path, document: Any) -> Path:
    path = tmp_path / "keys.json"
    path.write_bytes(orjson.dumps(document))
    return path


@pytest.mark.parametrize(
    ("public", "private"),
    [
        pytest.param(RECIPIENT_PUBLIC, RECIPIENT_PRIVATE, id="unpadded"),
        pytest.param(_pad(RECIPIENT_PUBLIC), RECIPIENT_PRIVATE, id="padded-public"),
        pytest.param(RECIPIENT_PUBLIC, _pad(RECIPIENT_PRIVATE), id="padded-private"),
        pytest.param(_pad(RECIPIENT_PUBLIC), _pad(RECIPIENT_PRIVATE), id="padded-both"),
    ],
)
def test_load_accepts_padded_and_unpadded(tmp_path: Path, public: str, private: str) -> None:
    assert public.endswith("=") or private.endswith("=") or public == RECIPIENT_PUBLIC
    keystore = Keystore.load(_write(tmp_path, {public: {"private": private}}))
    assert len(keystore) == 1
    pair = keystore.get(RECIPIENT_PUBLIC)
    assert pair is not None
    assert pair.public == RECIPIENT_PUBLIC
    assert decrypt_record(PersonalInfo.model_validate(vector_info()), keystore) == PLAINTEXT


_MISMATCHED = {RECIPIENT_PUBLIC: {"private": SENDER_PRIVATE}}

BAD_STORES = [
    pytest.param([], id="top-level-array"),
    pytest.param("keys", id="top-level-string"),
    pytest.param(None, id="top-level-null"),
    pytest.param(42, id="top-level-number"),
    pytest.param({RECIPIENT_PUBLIC: RECIPIENT_PRIVATE}, id="entry-is-string"),
    pytest.param({RECIPIENT_PUBLIC: {}}, id="entry-without-private"),
    pytest.param({RECIPIENT_PUBLIC: {"private": 5}}, id="private-number"),
    pytest.param({RECIPIENT_PUBLIC: {"private": None}}, id="private-null"),
    pytest.param({RECIPIENT_PUBLIC: {"secret": RECIPIENT_PRIVATE}}, id="private-misnamed"),
    pytest.param(_MISMATCHED, id="private-does-not-derive-public"),
    pytest.param({SENDER_PUBLIC: {"private": RECIPIENT_PRIVATE}}, id="swapped-public"),
    pytest.param({RECIPIENT_PUBLIC: {"private": "!!not base64!!"}}, id="private-not-base64"),
    pytest.param({"@@@": {"private": RECIPIENT_PRIVATE}}, id="public-not-base64"),
    pytest.param({RECIPIENT_PUBLIC: {"private": RECIPIENT_PRIVATE[:20]}}, id="private-short"),
    pytest.param(
        {RECIPIENT_PUBLIC: {"private": RECIPIENT_PRIVATE}, OTHER.public: {"private": "x"}},
        id="one-good-one-bad",
    ),
]


@pytest.mark.parametrize("document", BAD_STORES)
def test_load_rejects(tmp_path: Path, document: Any) -> None:
    with pytest.raises(ConfigError) as info:
        Keystore.load(_write(tmp_path, document))
    assert RECIPIENT_PRIVATE not in str(info.value)
    assert SENDER_PRIVATE not in str(info.value)


@pytest.mark.parametrize(
    "content",
    [
        pytest.param(b"{", id="truncated"),
        pytest.param(b"", id="empty"),
        pytest.param(b"\xff\xfe", id="not-utf8"),
    ],
)
def test_load_rejects_unparsable_file(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "keys.json"
    path.write_bytes(content)
    with pytest.raises(ConfigError):
        Keystore.load(path)


def test_load_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError):
        Keystore.load(tmp_path / "absent.json")


def test_save_is_0600_and_round_trips(tmp_path: Path) -> None:
    other = KeyPair.generate()
    keystore = Keystore.from_json(
        {
            RECIPIENT_PUBLIC: {"private": RECIPIENT_PRIVATE, "expired": True},
            other.public: {"private": other.private},
        }
    )
    path = tmp_path / "keys.json"
    keystore.save(path)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    text = path.read_text(encoding="utf-8")
    assert json.loads(text) == {
        RECIPIENT_PUBLIC: {"private": RECIPIENT_PRIVATE, "expired": True},
        other.public: {"private": other.private},
    }
    assert text == json.dumps(json.loads(text), indent=2) + "\n"  # as @proca/crypto writes it
    reloaded = Keystore.load(path)
    assert reloaded.to_json() == keystore.to_json()
    assert [p.public for p in reloaded] == [RECIPIENT_PUBLIC, other.public]
    assert list(tmp_path.iterdir()) == [path]  # no temporary file left behind


def test_save_tightens_existing_file(tmp_path: Path) -> None:
    path = tmp_path / "keys.json"
    path.write_text("{}", encoding="utf-8")
    os.chmod(path, 0o644)
    vector_keystore().save(path)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert Keystore.load(path).to_json() == {RECIPIENT_PUBLIC: {"private": RECIPIENT_PRIVATE}}


def test_generate() -> None:
    first, second = KeyPair.generate(), KeyPair.generate()
    assert first.public != second.public
    assert first.private != second.private
    for pair in (first, second):
        assert len(pair.public) == 43
        assert len(pair.private) == 43
        assert "=" not in pair.public + pair.private
        assert bytes(pair.private_key().public_key) == b64decode(pair.public)
    keystore = Keystore([first])  # add() verifies the derivation
    info = encrypt_record(
        {"email": "x@example.org"}, recipient_public=first.public, sender=second, nonce=bytes(24)
    )
    assert decrypt_record(PersonalInfo.model_validate(info), keystore) == {"email": "x@example.org"}


@pytest.mark.parametrize(
    "lookup",
    [
        pytest.param(RECIPIENT_PUBLIC, id="exact"),
        pytest.param(_pad(RECIPIENT_PUBLIC), id="padded"),
        pytest.param(f" {RECIPIENT_PUBLIC} ", id="whitespace"),
    ],
)
def test_lookup_normalises_padding(lookup: str) -> None:
    keystore = vector_keystore()
    pair = keystore.get(lookup)
    assert pair is not None
    assert pair.private == RECIPIENT_PRIVATE
    info = vector_info()
    info["encryptKey"]["public"] = lookup
    info["signKey"]["public"] = _pad(SENDER_PUBLIC)
    assert decrypt_record(PersonalInfo.model_validate(info), keystore) == PLAINTEXT


def test_lookup_miss() -> None:
    assert vector_keystore().get(OTHER.public) is None


def test_first_pair_wins() -> None:
    keystore = Keystore(
        [
            KeyPair(RECIPIENT_PUBLIC, RECIPIENT_PRIVATE, {"n": 1}),
            KeyPair(_pad(RECIPIENT_PUBLIC), RECIPIENT_PRIVATE, {"n": 2}),
        ]
    )
    assert len(keystore) == 1
    pair = keystore.get(RECIPIENT_PUBLIC)
    assert pair is not None
    assert pair.extra == {"n": 1}


def test_expired_and_extra_keys_are_still_used() -> None:
    active = KeyPair.generate()
    keystore = Keystore.from_json(
        {
            active.public: {"private": active.private, "active": True},
            RECIPIENT_PUBLIC: {
                "private": RECIPIENT_PRIVATE,
                "expired": True,
                "active": False,
                "expiredAt": "2023-01-01T00:00:00Z",
            },
        }
    )
    assert len(keystore) == 2
    assert decrypt_record(PersonalInfo.model_validate(vector_info()), keystore) == PLAINTEXT
    assert keystore.to_json()[RECIPIENT_PUBLIC]["expired"] is True


def test_repr_hides_private_keys() -> None:
    keystore = vector_keystore()
    pair = keystore.get(RECIPIENT_PUBLIC)
    assert pair is not None
    for text in (repr(pair), str(pair), repr(keystore), str(keystore), repr(list(keystore))):
        assert RECIPIENT_PRIVATE not in text
    generated = KeyPair.generate()
    assert generated.private not in repr(generated)
    assert generated.public in repr(generated)


# ---- failure reasons -------------------------------------------------------------------


def _set(path: str, value: Any) -> Callable[[dict[str, Any]], None]:
    def mutate(info: dict[str, Any]) -> None:
        *parents, last = path.split(".")
        node = info
        for part in parents:
            node = node[part]
        node[last] = value

    return mutate


def _drop(key: str) -> Callable[[dict[str, Any]], None]:
    def mutate(info: dict[str, Any]) -> None:
        del info[key]

    return mutate


def _flip(key: str, index: int) -> Callable[[dict[str, Any]], None]:
    def mutate(info: dict[str, Any]) -> None:
        raw = bytearray(b64decode(info[key]))
        raw[index] ^= 0x01
        info[key] = b64encode(bytes(raw))

    return mutate


def _raw_box(plaintext: bytes) -> Callable[[dict[str, Any]], None]:
    """Encrypt arbitrary bytes the way encrypt_record does, bypassing its JSON encoding."""

    def mutate(info: dict[str, Any]) -> None:
        box = Box(SENDER.private_key(), PublicKey(b64decode(RECIPIENT_PUBLIC)))
        nonce = bytes(range(100, 124))
        info["payload"] = b64encode(box.encrypt(plaintext, nonce).ciphertext)
        info["nonce"] = b64encode(nonce)

    return mutate


def _no_change(info: dict[str, Any]) -> None:
    return None


FAILURES = [
    pytest.param(_no_change, None, Reason.NO_KEYSTORE, id="no-keystore"),
    pytest.param(_no_change, Keystore(), Reason.NO_KEYSTORE, id="empty-keystore"),
    pytest.param(
        _set("encryptKey.public", OTHER.public), ..., Reason.UNKNOWN_KEY, id="unknown-encryptKey"
    ),
    pytest.param(
        _set("encryptKey.public", "not-a-key"), ..., Reason.UNKNOWN_KEY, id="garbage-encryptKey"
    ),
    pytest.param(_flip("payload", 0), ..., Reason.DECRYPT_FAILED, id="tampered-tag"),
    pytest.param(_flip("payload", 60), ..., Reason.DECRYPT_FAILED, id="tampered-body"),
    pytest.param(_flip("payload", 137), ..., Reason.DECRYPT_FAILED, id="tampered-last-byte"),
    pytest.param(_flip("nonce", 5), ..., Reason.DECRYPT_FAILED, id="tampered-nonce"),
    pytest.param(_set("payload", PAYLOAD[:-4]), ..., Reason.DECRYPT_FAILED, id="truncated"),
    pytest.param(_set("payload", ""), ..., Reason.DECRYPT_FAILED, id="empty-payload"),
    pytest.param(
        _set("signKey.public", OTHER.public), ..., Reason.DECRYPT_FAILED, id="wrong-sender-key"
    ),
    pytest.param(
        _set("signKey.public", RECIPIENT_PUBLIC),
        ...,
        Reason.DECRYPT_FAILED,
        id="sender-is-recipient",
    ),
    pytest.param(_drop("nonce"), ..., Reason.MALFORMED_CIPHERTEXT, id="missing-nonce"),
    pytest.param(_set("nonce", None), ..., Reason.MALFORMED_CIPHERTEXT, id="null-nonce"),
    pytest.param(_drop("signKey"), ..., Reason.MALFORMED_CIPHERTEXT, id="missing-signKey"),
    pytest.param(_drop("encryptKey"), ..., Reason.MALFORMED_CIPHERTEXT, id="missing-encryptKey"),
    pytest.param(_drop("payload"), ..., Reason.MALFORMED_CIPHERTEXT, id="missing-payload"),
    pytest.param(
        _drop("signKey"), None, Reason.MALFORMED_CIPHERTEXT, id="missing-signKey-no-keystore"
    ),
    pytest.param(
        _set("payload", "!!!not base64!!!"),
        ...,
        Reason.MALFORMED_CIPHERTEXT,
        id="payload-bad-base64",
    ),
    pytest.param(_set("nonce", "%%%%"), ..., Reason.MALFORMED_CIPHERTEXT, id="nonce-bad-base64"),
    pytest.param(
        _set("nonce", b64encode(bytes(23))), ..., Reason.MALFORMED_CIPHERTEXT, id="nonce-23-bytes"
    ),
    pytest.param(
        _set("nonce", b64encode(bytes(32))), ..., Reason.MALFORMED_CIPHERTEXT, id="nonce-32-bytes"
    ),
    pytest.param(
        _set("signKey.public", "***"), ..., Reason.MALFORMED_CIPHERTEXT, id="signKey-bad-base64"
    ),
    pytest.param(
        _set("signKey.public", b64encode(bytes(31))),
        ...,
        Reason.MALFORMED_CIPHERTEXT,
        id="signKey-31-bytes",
    ),
    pytest.param(
        _set("signKey.public", b64encode(bytes(32))),
        ...,
        Reason.MALFORMED_CIPHERTEXT,
        id="signKey-low-order-point",
    ),
    pytest.param(
        _raw_box(b"not json at all"), ..., Reason.INVALID_PLAINTEXT, id="plaintext-not-json"
    ),
    pytest.param(_raw_box(b'["an", "array"]'), ..., Reason.INVALID_PLAINTEXT, id="plaintext-array"),
    pytest.param(
        _raw_box(b'{"email": "\xff"}'), ..., Reason.INVALID_PLAINTEXT, id="plaintext-not-utf8"
    ),
    pytest.param(_raw_box(b""), ..., Reason.INVALID_PLAINTEXT, id="plaintext-empty"),
]


@pytest.mark.parametrize(("mutate", "keystore", "reason"), FAILURES)
def test_decrypt_failure_reasons(
    mutate: Callable[[dict[str, Any]], None], keystore: Any, reason: Reason
) -> None:
    info = vector_info()
    mutate(info)
    store = vector_keystore() if keystore is ... else keystore
    with pytest.raises(DecryptError) as exc:
        decrypt_record(PersonalInfo.model_validate(info), store)
    assert exc.value.reason is reason
    text = str(exc.value) + repr(exc.value)
    for secret in (RECIPIENT_PRIVATE, "simone@example.org", "Simone", "not json at all"):
        assert secret not in text


@pytest.mark.parametrize(
    "record",
    [
        pytest.param({"email": 5}, id="email-number"),
        pytest.param({"contactRef": ["x"]}, id="contactRef-list"),
        pytest.param({"dupeRank": "first"}, id="dupeRank-string"),
    ],
)
def test_decrypted_record_of_wrong_types(load_fixture: Loader, record: dict[str, Any]) -> None:
    document = orjson.loads(load_fixture("share_twitter.json"))
    document["personalInfo"] = encrypt_record(
        record, recipient_public=RECIPIENT_PUBLIC, sender=SENDER, nonce=bytes(range(1, 25))
    )
    with pytest.raises(DecryptError) as exc:
        decrypt_message(decode(orjson.dumps(document)), vector_keystore())
    assert exc.value.reason is Reason.INVALID_PLAINTEXT
    assert exc.value.args == ("decrypted record has fields of the wrong type",)


# ---- decrypt_message merges over the clear contact -------------------------------------

LAYER1 = {
    "contactRef": "MDWJu2fbogTgTHgLTLl-OFvRII63xZE76i7w3qHfbbE",
    "dupeRank": 2,
    "firstName": "S.",
    "email": None,
    "area": "BE",
}


def test_decrypt_message_action(load_fixture: Loader) -> None:
    document = orjson.loads(load_fixture("petition_optin.json"))
    document["contact"] = dict(LAYER1)
    document["personalInfo"] = vector_info()
    message = decode(orjson.dumps(document))
    decrypted = decrypt_message(message, vector_keystore())
    assert isinstance(decrypted, ActionMessage)
    assert decrypted.contact.record() == {**LAYER1, **PLAINTEXT}
    assert decrypted.contact.first_name == "Simone"  # decrypted beats clear "S."
    assert decrypted.contact.area == "FR"
    assert decrypted.contact.dupe_rank == 2  # clear-only keys survive
    assert decrypted.personal_info == message.personal_info
    assert decrypted.action_id == message.action_id
    # the input message is left as it was
    assert message.contact.email is None
    assert to_wire(message) == document


@pytest.mark.parametrize(
    "name", ["event.json", "event_doubleoptin.json"], ids=["event_minimal", "event_doubleoptin"]
)
def test_decrypt_message_email_status(load_fixture: Loader, name: str) -> None:
    document = orjson.loads(load_fixture(name))
    document["supporter"]["contact"] = dict(LAYER1)
    document["supporter"]["personalInfo"] = vector_info()
    message = decode(orjson.dumps(document))
    decrypted = decrypt_message(message, vector_keystore())
    assert isinstance(decrypted, EmailStatusEvent)
    assert decrypted.supporter.contact.record() == {**LAYER1, **PLAINTEXT}
    assert decrypted.supporter.contact.email == "simone@example.org"
    assert decrypted.supporter.privacy == message.supporter.privacy
    assert message.supporter.contact.email is None


@pytest.mark.parametrize(
    "name",
    ["event.json", "petition_optin.json", "share_twitter.json"],
    ids=["event", "petition_optin", "share_twitter"],
)
@pytest.mark.parametrize("keystore", [None, "vector"], ids=["no-keystore", "keystore"])
def test_clear_messages_pass_unchanged(
    load_fixture: Loader, name: str, keystore: str | None
) -> None:
    message = decode(load_fixture(name))
    store = vector_keystore() if keystore else None
    result = decrypt_message(message, store)
    assert to_wire(result) == orjson.loads(load_fixture(name))


def test_decrypt_message_failure_is_decrypt_error(load_fixture: Loader) -> None:
    document = orjson.loads(load_fixture("event_doubleoptin.json"))
    document["supporter"]["personalInfo"] = vector_info()
    message = decode(orjson.dumps(document))
    with pytest.raises(DecryptError) as exc:
        decrypt_message(message, None)
    assert exc.value.reason is Reason.NO_KEYSTORE
    with pytest.raises(DecryptError) as exc:
        decrypt_message(message, Keystore([OTHER]))
    assert exc.value.reason is Reason.UNKNOWN_KEY


# ---- what the errors say (operators read them; never a private key nor plaintext) -------

P8 = RECIPIENT_PUBLIC[:8]


@pytest.mark.parametrize(
    ("document", "message"),
    [
        pytest.param([], "key store: top level must be a JSON object", id="top-level"),
        pytest.param({RECIPIENT_PUBLIC: {}}, f"key store: entry {P8}… has no string 'private'",
                     id="no-private"),
        pytest.param({RECIPIENT_PUBLIC: {"private": "!!not base64!!"}},
                     f"key {P8}…: not base64url", id="not-base64"),
        pytest.param({RECIPIENT_PUBLIC: {"private": RECIPIENT_PRIVATE[:20]}},
                     f"key {P8}…: keys must be 32 bytes", id="short"),
        pytest.param(_MISMATCHED, f"key {P8}…: private key does not match its public key",
                     id="mismatch"),
    ],
)
def test_key_store_errors_name_the_key_and_the_problem(document: Any, message: str) -> None:
    with pytest.raises(ConfigError) as info:
        Keystore.from_json(document)
    assert str(info.value) == message


def test_key_store_file_errors_name_the_file(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere.json"
    with pytest.raises(ConfigError) as info:
        Keystore.load(missing)
    assert str(info.value) == f"key store {missing}: No such file or directory"
    broken = tmp_path / "broken.json"
    broken.write_bytes(b"{")
    with pytest.raises(ConfigError) as info:
        Keystore.load(broken)
    assert str(info.value) == f"key store {broken}: not valid JSON"


def test_extra_fields_of_an_entry_are_kept_without_the_private_key() -> None:
    store = Keystore.from_json(
        {RECIPIENT_PUBLIC: {"private": RECIPIENT_PRIVATE, "expired": True, "note": "2023"}}
    )
    pair = store.get(RECIPIENT_PUBLIC)
    assert pair is not None and dict(pair.extra) == {"expired": True, "note": "2023"}
    assert store.to_json() == {
        RECIPIENT_PUBLIC: {"private": RECIPIENT_PRIVATE, "expired": True, "note": "2023"}
    }


@pytest.mark.parametrize(
    ("mutate", "keystore", "message"),
    [
        pytest.param(_no_change, None, "message is encrypted and no key store is set",
                     id="no-keystore"),
        pytest.param(_set("encryptKey.public", OTHER.public), ...,
                     f"no private key for encryptKey {OTHER.public[:8]}…", id="unknown-key"),
        pytest.param(_flip("payload", 0), ...,
                     "ciphertext failed authentication (tampered or wrong key)", id="tampered"),
        pytest.param(_drop("nonce"), ..., "personalInfo lacks payload, nonce or encryptKey",
                     id="no-nonce"),
        pytest.param(_drop("signKey"), ..., "personalInfo lacks signKey", id="no-signKey"),
        pytest.param(_set("payload", "!!!not base64!!!"), ...,
                     "payload or nonce is not base64url", id="bad-base64"),
        pytest.param(_set("nonce", b64encode(bytes(23))), ..., "nonce is 23 bytes, not 24",
                     id="short-nonce"),
        pytest.param(_set("signKey.public", "***"), ...,
                     "signKey.public is not a 32-byte base64url key", id="bad-signKey"),
        pytest.param(_set("signKey.public", b64encode(bytes(32))), ...,
                     "signKey.public is not a usable X25519 key", id="low-order-signKey"),
        pytest.param(_raw_box(b"not json"), ..., "plaintext is not JSON", id="not-json"),
        pytest.param(_raw_box(b"[1]"), ..., "plaintext is not a JSON object", id="array"),
    ],
)
def test_decrypt_errors_say_what_failed(
    mutate: Callable[[dict[str, Any]], None], keystore: Any, message: str
) -> None:
    info = vector_info()
    mutate(info)
    store = vector_keystore() if keystore is ... else keystore
    with pytest.raises(DecryptError) as exc:
        decrypt_record(PersonalInfo.model_validate(info), store)
    assert exc.value.args == (message,)


def test_a_key_store_shows_only_its_size() -> None:
    assert repr(vector_keystore()) == "Keystore(1 keys)"
    assert repr(Keystore()) == "Keystore(0 keys)"


def test_one_key_store_decrypts_again_with_its_cached_box() -> None:
    keystore = vector_keystore()
    info = PersonalInfo.model_validate(vector_info())
    assert decrypt_record(info, keystore) == PLAINTEXT
    assert decrypt_record(info, keystore) == PLAINTEXT  # the box now comes from the cache



@pytest.mark.parametrize("text", ["QUJD", "QUJD=", "QUJD==", " QUJD\n", "QUI", "QUI=", " QUI== "])
def test_b64decode_takes_any_trailing_padding_and_surrounding_space(text: str) -> None:
    assert b64decode(text) in (b"ABC", b"AB")
    assert b64decode(text) == (b"ABC" if "QUJD" in text else b"AB")


def test_a_key_with_a_stray_character_is_refused_not_repaired() -> None:
    """Characters outside base64url are an error, not skipped: a damaged key file is
    reported, even when what is left would decode to the right key."""
    damaged = RECIPIENT_PRIVATE[:10] + "*#*#" + RECIPIENT_PRIVATE[10:]  # 4: padding stays right
    with pytest.raises(ConfigError, match="not base64url"):
        Keystore.from_json({RECIPIENT_PUBLIC: {"private": damaged}})
