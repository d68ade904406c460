"""Decryption of ``personalInfo`` and the @proca/crypto key store (spec: crypto.md).

NaCl ``crypto_box`` (X25519 + XSalsa20-Poly1305): the recipient is the receiving org
(``encryptKey``, whose private key is in our key store), the sender is the Proca instance
org (``signKey``). Ciphertext is tag-first without the nonce; all binary values are
base64url, padded or not.

Nothing here logs or puts plaintext into an error message. Every failure is a
:class:`~proca_sync.errors.DecryptError` with its own reason code; a bad key-store file is
a :class:`~proca_sync.errors.ConfigError`.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import json
import os
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson
from nacl.exceptions import CryptoError
from nacl.public import Box, PrivateKey, PublicKey
from pydantic import ValidationError

from proca_sync.errors import ConfigError, DecryptError, Reason
from proca_sync.messages.schemas import (
    ActionMessage,
    Contact,
    EmailStatusEvent,
    Message,
    PersonalInfo,
)

__all__ = [
    "KeyPair",
    "Keystore",
    "b64decode",
    "b64encode",
    "decrypt_message",
    "decrypt_record",
    "encrypt_record",
]

KEY_BYTES = 32
NONCE_BYTES = 24


def b64encode(data: bytes) -> str:
    """base64url without padding, as Proca writes it."""
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def b64decode(text: str) -> bytes:
    """base64url, padded or not (standard ``+/`` also accepted, as @proca/crypto does)."""
    stripped = text.strip().rstrip("=")
    padded = stripped + "=" * (-len(stripped) % 4)
    return base64.b64decode(padded, altchars=b"-_", validate=True)


def _normalise(public: str) -> str:
    return public.strip().rstrip("=")


@dataclass(frozen=True)
class KeyPair:
    """One X25519 key pair. The private half never appears in ``repr``."""

    public: str
    private: str = field(repr=False)
    extra: Mapping[str, Any] = field(default_factory=dict, repr=False)

    @classmethod
    def generate(cls) -> KeyPair:
        key = PrivateKey.generate()
        return cls(public=b64encode(bytes(key.public_key)), private=b64encode(bytes(key)))

    def private_key(self) -> PrivateKey:
        return PrivateKey(b64decode(self.private))


class Keystore:
    """Private keys of the receiving org(s), looked up by public key.

    Expired and inactive keys are kept and used: retried and re-sent messages carry
    ciphertext made with the key that was active when the action was taken.
    """

    def __init__(self, pairs: list[KeyPair] | None = None) -> None:
        self._pairs: dict[str, KeyPair] = {}
        self._boxes: dict[tuple[str, str], Box] = {}
        for pair in pairs or []:
            self.add(pair)

    def __len__(self) -> int:
        return len(self._pairs)

    def __iter__(self) -> Iterator[KeyPair]:
        return iter(self._pairs.values())

    def __repr__(self) -> str:
        return f"Keystore({len(self)} keys)"

    def add(self, pair: KeyPair) -> None:
        """Add a pair after checking that the private key derives the public key.

        Raises :class:`ConfigError` when it does not or when either is not a 32-byte key.
        The first pair for a public key wins (as in @proca/crypto).
        """
        public = _normalise(pair.public)
        try:
            private_bytes = b64decode(pair.private)
            public_bytes = b64decode(public)
        except (binascii.Error, ValueError):
            raise ConfigError(f"key {public[:8]}…: not base64url") from None
        if len(private_bytes) != KEY_BYTES or len(public_bytes) != KEY_BYTES:
            raise ConfigError(f"key {public[:8]}…: keys must be {KEY_BYTES} bytes")
        derived = bytes(PrivateKey(private_bytes).public_key)
        if derived != public_bytes:
            raise ConfigError(f"key {public[:8]}…: private key does not match its public key")
        self._pairs.setdefault(public, KeyPair(public, pair.private, pair.extra))

    def get(self, public: str) -> KeyPair | None:
        return self._pairs.get(_normalise(public))

    def box(self, recipient_public: str, sender_public: str) -> Box:
        """The (cached) box for one recipient key and one sender key."""
        cache_key = (_normalise(recipient_public), _normalise(sender_public))
        box = self._boxes.get(cache_key)
        if box is None:
            pair = self._pairs.get(cache_key[0])
            if pair is None:
                raise DecryptError(
                    f"no private key for encryptKey {cache_key[0][:8]}…",
                    reason=Reason.UNKNOWN_KEY,
                )
            try:
                sender = PublicKey(b64decode(sender_public))
            except (binascii.Error, ValueError, TypeError):
                raise DecryptError(
                    "signKey.public is not a 32-byte base64url key",
                    reason=Reason.MALFORMED_CIPHERTEXT,
                ) from None
            try:
                box = Box(pair.private_key(), sender)
            except CryptoError:  # libsodium refuses low-order points (e.g. all zeros)
                raise DecryptError(
                    "signKey.public is not a usable X25519 key",
                    reason=Reason.MALFORMED_CIPHERTEXT,
                ) from None
            self._boxes[cache_key] = box
        return box

    # ---- file format ------------------------------------------------------------------

    @classmethod
    def from_json(cls, document: Any) -> Keystore:
        """Build from the @proca/crypto JSON shape ``{public: {"private": …}}``."""
        if not isinstance(document, dict):
            raise ConfigError("key store: top level must be a JSON object")
        pairs = []
        for public, value in document.items():
            if not isinstance(value, dict) or not isinstance(value.get("private"), str):
                raise ConfigError(f"key store: entry {str(public)[:8]}… has no string 'private'")
            extra = {k: v for k, v in value.items() if k != "private"}
            pairs.append(KeyPair(str(public), value["private"], extra))
        return cls(pairs)

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> Keystore:
        """Read a key-store file. Raises :class:`ConfigError` if unreadable or invalid."""
        try:
            raw = Path(path).read_bytes()
        except OSError as exc:
            raise ConfigError(f"key store {path}: {exc.strerror}") from None
        try:
            document = orjson.loads(raw)
        except orjson.JSONDecodeError:
            raise ConfigError(f"key store {path}: not valid JSON") from None
        return cls.from_json(document)

    def to_json(self) -> dict[str, dict[str, Any]]:
        return {p.public: {"private": p.private, **p.extra} for p in self._pairs.values()}

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write pretty JSON with mode 0600, created that way (never world-readable)."""
        target = Path(path)
        text = json.dumps(self.to_json(), indent=2) + "\n"
        tmp = target.with_name(f".{target.name}.tmp")
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(tmp, 0o600)
        os.replace(tmp, target)


def decrypt_record(info: PersonalInfo, keystore: Keystore | None) -> dict[str, Any]:
    """Decrypt one ``personalInfo`` block into the personal-data record it carries.

    Raises :class:`DecryptError` with ``no_keystore`` (no keys configured),
    ``malformed_ciphertext`` (missing field, bad base64, wrong nonce size),
    ``unknown_key`` (no private key for ``encryptKey.public``), ``decrypt_failed``
    (MAC check failed: tampered, wrong sender) or ``invalid_plaintext``.
    """
    if info.payload is None or info.nonce is None or info.encrypt_key is None:
        raise DecryptError(
            "personalInfo lacks payload, nonce or encryptKey", reason=Reason.MALFORMED_CIPHERTEXT
        )
    if info.sign_key is None:
        raise DecryptError("personalInfo lacks signKey", reason=Reason.MALFORMED_CIPHERTEXT)
    if keystore is None or len(keystore) == 0:
        raise DecryptError(
            "message is encrypted and no key store is set", reason=Reason.NO_KEYSTORE
        )
    box = keystore.box(info.encrypt_key.public, info.sign_key.public)
    try:
        nonce = b64decode(info.nonce)
        ciphertext = b64decode(info.payload)
    except (binascii.Error, ValueError):
        raise DecryptError(
            "payload or nonce is not base64url", reason=Reason.MALFORMED_CIPHERTEXT
        ) from None
    if len(nonce) != NONCE_BYTES:
        raise DecryptError(
            f"nonce is {len(nonce)} bytes, not {NONCE_BYTES}", reason=Reason.MALFORMED_CIPHERTEXT
        )
    try:
        plaintext = box.decrypt(ciphertext, nonce)
    except CryptoError:
        raise DecryptError(
            "ciphertext failed authentication (tampered or wrong key)",
            reason=Reason.DECRYPT_FAILED,
        ) from None
    try:
        record = orjson.loads(plaintext)
    except orjson.JSONDecodeError:
        raise DecryptError("plaintext is not JSON", reason=Reason.INVALID_PLAINTEXT) from None
    if not isinstance(record, dict):
        raise DecryptError("plaintext is not a JSON object", reason=Reason.INVALID_PLAINTEXT)
    return record


def encrypt_record(
    record: Mapping[str, Any], *, recipient_public: str, sender: KeyPair, nonce: bytes
) -> dict[str, Any]:
    """Encrypt a personal-data record the way the Proca server does (wire dict).

    Used by the producers and tests; ``nonce`` must be unique per sender key.
    """
    box = Box(sender.private_key(), PublicKey(b64decode(recipient_public)))
    plaintext = orjson.dumps(dict(record))
    ciphertext = box.encrypt(plaintext, nonce).ciphertext
    return {
        "payload": b64encode(ciphertext),
        "nonce": b64encode(nonce),
        "encryptKey": {"id": None, "public": _normalise(recipient_public)},
        "signKey": {"id": None, "public": _normalise(sender.public)},
    }


def _merge_contact(contact: Contact, record: dict[str, Any]) -> Contact:
    merged = contact.record()
    merged.update(record)
    try:
        return Contact.model_validate(merged)
    except ValidationError:
        raise DecryptError(
            "decrypted record has fields of the wrong type", reason=Reason.INVALID_PLAINTEXT
        ) from None


def decrypt_message(message: Message, keystore: Keystore | None) -> Message:
    """Return the message with every ``personalInfo`` decrypted and merged into its contact.

    Covers action messages and ``email_status`` events (``supporter.personalInfo``). The
    decrypted values win over the clear layer-1 values. ``personalInfo`` itself is left
    in place, so the result still re-encodes to what was received plus the merged fields.
    A message without encrypted data is returned unchanged.
    """
    if isinstance(message, ActionMessage) and message.personal_info is not None:
        record = decrypt_record(message.personal_info, keystore)
        contact = _merge_contact(message.contact, record)
        return message.model_copy(update={"contact": contact})
    if isinstance(message, EmailStatusEvent) and message.supporter.personal_info is not None:
        record = decrypt_record(message.supporter.personal_info, keystore)
        contact = _merge_contact(message.supporter.contact, record)
        supporter = message.supporter.model_copy(update={"contact": contact})
        return message.model_copy(update={"supporter": supporter})
    return message
