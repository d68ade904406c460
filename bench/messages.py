"""Benchmark traffic: ``proca:action:2`` deliver messages, in clear or encrypted.

Every message is a signature (``register``) with consent, built from one template made by
:func:`proca_sync.pipeline.producers.build_action` so the wire shape is the server's; only
the per-message parts (``actionId``, ``createdAt``, the contact, ``personalInfo``) are
patched in. Encryption is the server's (crypto.md §2: the instance key seals for the org
key, a counter nonce per message) with the shared key computed once, so that a million
messages can be made in well under a minute.

``repeat_share`` of the messages come from a contact seen shortly before (among the last
``window`` distinct contacts): they share a lane with an earlier message that may still be
in flight, which is what per-contact ordering has to handle.
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson
from nacl.public import Box, PublicKey

from proca_sync.crypto import KeyPair, Keystore, b64decode, b64encode
from proca_sync.pipeline.producers import (
    CampaignInfo,
    Consent,
    ContactData,
    NonceCounter,
    OrgInfo,
    PageInfo,
    PrivacyData,
    build_action,
    db_time,
)
from proca_sync.pipeline.simulate import derive_keypair

__all__ = ["FIRST_ACTION_ID", "MessageFactory", "action_id_of"]

FIRST_ACTION_ID = 5_000_000
BASE = datetime(2024, 10, 14, 9, 0, 0, tzinfo=UTC)
_BASE_SECONDS = int(BASE.timestamp())

_FIRST = ("Ada", "Bruno", "Clara", "Dario", "Elena", "Femi", "Greta", "Hugo", "Ines", "Jonas")
_LAST = ("Amsel", "Brandt", "Costa", "Dubois", "Eriksen", "Fischer", "Garcia", "Horvat")
_COUNTRIES = (("DE", "10115"), ("FR", "75011"), ("IT", "00184"), ("PL", "00-950"), ("NL", "1012"))


def action_id_of(index: int) -> int:
    """The ``actionId`` of the message published ``index``-th (publish order = id order)."""
    return FIRST_ACTION_ID + index


@dataclass
class MessageFactory:
    """Deterministic bodies for one benchmark case (same seed → same bytes)."""

    encrypted: bool
    seed: int = 0
    repeat_share: float = 0.3
    window: int = 100
    org_keys: KeyPair = field(init=False)
    instance_keys: KeyPair = field(init=False)

    def __post_init__(self) -> None:
        self.org_keys = derive_keypair(f"bench-org:{self.seed}")
        self.instance_keys = derive_keypair(f"bench-instance:{self.seed}")
        recipient = PublicKey(b64decode(self.org_keys.public))
        self._box = Box(self.instance_keys.private_key(), recipient)
        org = OrgInfo(4242, "bench_org", "Benchmark Organisation")
        self._template = build_action(
            action_id=FIRST_ACTION_ID,
            action_type="register",
            created_at=BASE,
            page=PageInfo(3120, "example.org/bees/en", "en", "thanks_en"),
            campaign=CampaignInfo(564, "save_the_bees", "Save the Bees", 621987, "basic"),
            org=org,
            contact=ContactData.from_record("x", {"firstName": "x", "email": "x@example.org"}),
            privacy=PrivacyData(Consent(True, BASE), True),
            custom_fields={"emailProvider": "example.org"},
        )

    def keystore(self) -> Keystore:
        return Keystore([self.org_keys])

    def write_keystore(self, path: Path) -> Path:
        """The org's key store (@proca/crypto format, mode 0600) for ``--keys`` and Node."""
        self.keystore().save(path)
        return path

    @staticmethod
    def _contact(number: int, rng: random.Random) -> tuple[str, dict[str, Any]]:
        email = f"supporter{number}@example.org"
        country, postcode = rng.choice(_COUNTRIES)
        record = {
            "firstName": rng.choice(_FIRST),
            "lastName": rng.choice(_LAST),
            "email": email,
            "country": country,
            "postcode": postcode,
            "area": country,
        }
        ref = b64encode(hashlib.sha256(f"bench:{email}".encode()).digest())
        return ref, record

    def bodies(self, n: int) -> Iterator[bytes]:
        """``n`` message bodies in publish order; message ``i`` has ``action_id_of(i)``."""
        rng = random.Random(self.seed)
        nonces = NonceCounter(int.from_bytes(hashlib.sha256(b"bench-nonce").digest()[:24], "big"))
        recent: list[tuple[str, dict[str, Any]]] = []
        contacts = 0
        template = self._template
        encrypt_public = self.org_keys.public
        sign_public = self.instance_keys.public
        for index in range(n):
            if recent and rng.random() < self.repeat_share:
                ref, record = rng.choice(recent)
            else:
                ref, record = self._contact(contacts, rng)
                contacts += 1
                recent.append((ref, record))
                if len(recent) > self.window:
                    recent.pop(0)
            moment = datetime.fromtimestamp(_BASE_SECONDS + index, UTC)
            layer1 = {
                "contactRef": ref,
                "dupeRank": 0,
                "firstName": record["firstName"],
                "email": record["email"],
                "area": record["area"],
            }
            personal_info = None
            if self.encrypted:
                nonce = nonces.next()
                sealed = self._box.encrypt(orjson.dumps(record), nonce).ciphertext
                personal_info = {
                    "payload": b64encode(sealed),
                    "nonce": b64encode(nonce),
                    "encryptKey": {"id": 1, "public": encrypt_public},
                    "signKey": {"id": 1, "public": sign_public},
                }
            else:
                layer1.update(record)
            document = {
                **template,
                "actionId": action_id_of(index),
                "action": {**template["action"], "createdAt": db_time(moment)},
                "contact": layer1,
                "personalInfo": personal_info,
            }
            yield orjson.dumps(document)
