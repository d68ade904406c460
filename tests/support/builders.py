"""Small builders of wire messages for tests: start from the shared fixtures' shape and
change what a scenario needs. All personal data here is fictitious."""

from __future__ import annotations

import copy
from typing import Any

import orjson

from proca_sync.crm.sql import SqlBackend
from proca_sync.crypto import KeyPair, encrypt_record
from proca_sync.engine import Engine
from proca_sync.sync.records import SyncRecord
from tests.support import vector

# The key pairs of the published test vector (crypto.md §7).
INSTANCE = KeyPair(public=vector.SENDER_PUBLIC, private=vector.SENDER_PRIVATE)
ORG = KeyPair(public=vector.RECIPIENT_PUBLIC, private=vector.RECIPIENT_PRIVATE)

_BASE_ACTION: dict[str, Any] = {
    "schema": "proca:action:2",
    "stage": "deliver",
    "actionId": 1,
    "action": {
        "actionType": "register",
        "customFields": {},
        "createdAt": "2024-01-01T10:00:00Z",
        "testing": False,
    },
    "actionPageId": 10,
    "actionPage": {
        "name": "example.org/petition/en",
        "locale": "en",
        "thankYouTemplate": None,
        "thankYouTemplateRef": None,
        "supporterConfirmTemplate": None,
    },
    "campaignId": 5,
    "campaign": {
        "name": "petition_x",
        "title": "Petition X",
        "externalId": None,
        "contactSchema": "basic",
    },
    "orgId": 7,
    "org": {"name": "example_org", "title": "Example Org"},
    "contact": {},
    "personalInfo": None,
    "privacy": {
        "optIn": True,
        "givenAt": "2024-01-01T10:00:00Z",
        "withConsent": True,
        "emailStatus": None,
        "emailStatusChanged": None,
    },
    "tracking": {
        "source": "unknown",
        "medium": "unknown",
        "campaign": "unknown",
        "content": "",
        "location": "",
    },
}

_NONCE = [0]


def _nonce() -> bytes:
    _NONCE[0] += 1
    return _NONCE[0].to_bytes(24, "big")


def action(
    action_id: int,
    *,
    ref: str,
    email: str | None,
    created: str,
    first_name: str = "Ada",
    record: dict[str, Any] | None = None,
    action_type: str = "register",
    campaign: str = "petition_x",
    with_consent: bool = True,
    opt_in: bool | None = True,
    given_at: str | None = None,
    email_status: str | None = None,
    status_changed: str | None = None,
    testing: bool = False,
    custom: dict[str, Any] | None = None,
    encrypt_for: KeyPair | None = None,
) -> dict[str, Any]:
    """A delivered action v2; ``record`` is the personal-data record (clear or encrypted)."""
    message = copy.deepcopy(_BASE_ACTION)
    message["actionId"] = action_id
    message["action"].update(
        {
            "actionType": action_type,
            "createdAt": created,
            "testing": testing,
            "customFields": custom or {},
        }
    )
    message["campaign"]["name"] = campaign
    message["campaign"]["title"] = campaign.replace("_", " ").title()
    layer1: dict[str, Any] = {
        "contactRef": ref,
        "dupeRank": 0,
        "firstName": first_name,
        "email": email,
        "area": None,
    }
    full = {"firstName": first_name, **({"email": email} if email else {}), **(record or {})}
    if encrypt_for is not None:
        message["contact"] = layer1
        message["personalInfo"] = encrypt_record(
            full, recipient_public=encrypt_for.public, sender=INSTANCE, nonce=_nonce()
        )
    else:
        message["contact"] = {**layer1, **full}
    message["privacy"] = {
        "optIn": opt_in,
        "givenAt": given_at or created,
        "withConsent": with_consent,
        "emailStatus": email_status,
        "emailStatusChanged": status_changed,
    }
    return message


def email_status(
    *,
    ref: str,
    email: str | None,
    status: str,
    changed: str,
    action_id: int | None = None,
    created: str | None = None,
    first_name: str | None = "Ada",
) -> dict[str, Any]:
    """An ``email_status`` event; with ``action_id``/``created`` in the current server shape."""
    event: dict[str, Any] = {
        "schema": "proca:event:2",
        "eventType": "email_status",
        "timestamp": changed,
        "supporter": {
            "contact": {
                "contactRef": ref,
                "dupeRank": 0,
                "firstName": first_name,
                "email": email,
                "area": None,
            },
            "privacy": {
                "optIn": True,
                "givenAt": created or changed,
                "withConsent": False,
                "emailStatus": status,
                "emailStatusChanged": changed,
            },
            "personalInfo": None,
        },
    }
    if action_id is not None:
        event["actionId"] = action_id
        event["action"] = {
            "actionType": "register",
            "customFields": {},
            "createdAt": created or changed,
            "testing": False,
        }
    return event


def campaign_updated(
    name: str, title: str, *, when: str, external_id: int | None = None
) -> dict[str, Any]:
    return {
        "schema": "proca:event:2",
        "eventType": "campaign_updated",
        "timestamp": when,
        "campaignId": 5,
        "orgId": 7,
        "campaign": {
            "id": 5,
            "name": name,
            "title": title,
            "externalId": external_id,
            "contactSchema": "basic",
            "config": {"lang_setting": "en"},
            "org": {"name": "example_org", "title": "Example Org"},
        },
    }


def dumps(message: dict[str, Any]) -> bytes:
    return orjson.dumps(message)


def records(bodies: list[bytes]) -> list[SyncRecord]:
    """The records the engine makes of ``bodies`` (each must be one to apply)."""
    engine = Engine(backend=SqlBackend("sqlite://"))
    out = []
    for body in bodies:
        prepared = engine.prepare(body)
        assert isinstance(prepared, SyncRecord)
        out.append(prepared)
    return out
