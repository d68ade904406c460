"""Lossless upgrade of legacy ``proca:action:1`` messages to ``proca:action:2``.

Follows messages.md §5.2 (not @proca/queue's lossy converter): ``orgId``, ``org``,
``testing`` and ``donation`` are copied, the v1 contact's clear ``firstName`` and ``email``
seed the v2 contact before the clear payload is merged, an empty payload means "no
data", a null v1 ``privacy`` becomes ``{withConsent: false, …}``, and unknown keys are
carried over at every level.
"""

from __future__ import annotations

from typing import Any

import orjson

from proca_sync.errors import DecodeError, Reason
from proca_sync.messages.schemas import ActionMessage, ActionMessageV1

__all__ = ["upgrade_v1"]

_V1_ACTION_KEYS = {"actionType", "fields", "createdAt", "testing", "donation"}
_V1_CONTACT_KEYS = {"ref", "firstName", "email", "area", "payload", "nonce", "publicKey", "signKey"}


def upgrade_v1(v1: ActionMessageV1) -> ActionMessage:
    """Convert a validated v1 message to v2.

    Raises :class:`DecodeError` (``invalid_field``) when a clear payload is not a JSON
    object, and pydantic's ``ValidationError`` when the merged result is not a valid v2
    message (:func:`~proca_sync.messages.decode.decode` turns it into a reason code).
    Encrypted payloads are moved to ``personalInfo`` untouched (key ids unknown: ``null``;
    lookup is by public key).
    """
    raw = v1.model_dump(mode="json", by_alias=True, exclude_unset=True)
    out: dict[str, Any] = {
        key: value
        for key, value in raw.items()
        if key not in {"schema", "action", "contact", "privacy"}
    }
    out["schema"] = "proca:action:2"

    action = raw["action"]
    new_action: dict[str, Any] = {k: v for k, v in action.items() if k not in _V1_ACTION_KEYS}
    new_action["actionType"] = action["actionType"]
    new_action["customFields"] = action.get("fields", {})
    new_action["createdAt"] = action["createdAt"]
    new_action["testing"] = action.get("testing", False)
    if "donation" in action and action["donation"] is not None:
        new_action["donation"] = action["donation"]
    out["action"] = new_action

    contact = raw["contact"]
    new_contact: dict[str, Any] = {
        k: v for k, v in contact.items() if k not in _V1_CONTACT_KEYS
    }
    new_contact["contactRef"] = contact.get("ref")
    new_contact["firstName"] = contact.get("firstName")
    new_contact["email"] = contact.get("email")
    if "area" in contact:
        new_contact["area"] = contact["area"]
    payload = contact.get("payload") or ""
    encrypted = all(contact.get(k) for k in ("nonce", "publicKey", "signKey"))
    if encrypted:
        out["personalInfo"] = {
            "payload": payload,
            "nonce": contact["nonce"],
            "encryptKey": {"id": None, "public": contact["publicKey"]},
            "signKey": {"id": None, "public": contact["signKey"]},
        }
    else:
        out["personalInfo"] = None
        if payload:
            try:
                record = orjson.loads(payload)
            except orjson.JSONDecodeError:
                raise DecodeError(
                    "v1 contact.payload is not JSON", reason=Reason.INVALID_FIELD
                ) from None
            if not isinstance(record, dict):
                raise DecodeError(
                    "v1 contact.payload is not an object", reason=Reason.INVALID_FIELD
                )
            new_contact.update(record)
    out["contact"] = new_contact

    privacy = raw.get("privacy")
    if privacy is None:
        out["privacy"] = {"withConsent": False, "emailStatus": None, "emailStatusChanged": None}
    else:
        new_privacy = {k: v for k, v in privacy.items() if k != "communication"}
        new_privacy["optIn"] = privacy.get("communication")
        new_privacy["withConsent"] = True
        new_privacy["emailStatus"] = None
        new_privacy["emailStatusChanged"] = None
        out["privacy"] = new_privacy
    # The clear payload was merged unchecked: the v2 shape may still fail (a payload
    # "email" that is not a string); decode() reports that like any invalid field.
    return ActionMessage.model_validate(out)
