"""Bytes → validated message, with a reason code for everything that cannot be decoded.

No I/O and no decryption here (that is :mod:`proca_sync.crypto`). Every failure is a
:class:`~proca_sync.errors.DecodeError`; nothing else escapes :func:`decode`.
"""

from __future__ import annotations

import re
from typing import Any, TypeVar

import orjson
from pydantic import BaseModel, ValidationError

from proca_sync.errors import DecodeError, Reason
from proca_sync.messages.schemas import (
    ACTION_V1,
    ACTION_V2,
    EVENT_V2,
    ActionMessage,
    ActionMessageV1,
    CampaignUpdatedEvent,
    ConfirmCreatedEvent,
    EmailStatusEvent,
    Message,
    UnknownEvent,
)
from proca_sync.messages.upgrade import upgrade_v1

__all__ = ["decode", "decode_document", "parse_json"]

M = TypeVar("M", bound=BaseModel)

_EVENTS: dict[str, type[EmailStatusEvent | CampaignUpdatedEvent | ConfirmCreatedEvent]] = {
    "email_status": EmailStatusEvent,
    "campaign_updated": CampaignUpdatedEvent,
    "confirm_created": ConfirmCreatedEvent,
}


# Only schema-looking values are echoed in errors: an arbitrary string may be personal data.
_SCHEMA_LABEL = re.compile(r"[a-z][a-z0-9_]*(:[a-z0-9_]+){1,3}")


def parse_json(body: bytes | str) -> dict[str, Any]:
    """Parse a message body; it must be one UTF-8 JSON object."""
    try:
        document = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        # orjson also rejects invalid UTF-8 here; say which without echoing the body.
        what = "not UTF-8" if "utf-8" in str(exc).lower() else "not valid JSON"
        raise DecodeError(f"body is {what}", reason=Reason.INVALID_JSON) from None
    if not isinstance(document, dict):
        raise DecodeError(
            f"body is a JSON {type(document).__name__}, not an object",
            reason=Reason.NOT_AN_OBJECT,
        )
    return document


def _invalid(exc: ValidationError, context: str = "") -> DecodeError:
    """A reason-coded error naming the field and the problem, never the input value."""
    first = exc.errors(include_url=False, include_input=False)[0]
    where = ".".join(str(part) for part in first["loc"]) or "message"
    if first["type"] == "missing":
        ctx = first.get("ctx") or {}
        field = ctx.get("field") if isinstance(ctx, dict) else None
        return DecodeError(f"{context}missing {field or where}", reason=Reason.MISSING_FIELD)
    return DecodeError(f"{context}{where}: {first['type']}", reason=Reason.INVALID_FIELD)


def _validate(model: type[M], document: dict[str, Any]) -> M:
    try:
        return model.model_validate(document)
    except ValidationError as exc:
        raise _invalid(exc) from None


def decode_document(document: dict[str, Any]) -> Message:
    """Validate a parsed body: dispatch on ``schema``, then ``eventType``; upgrade v1."""
    schema = document.get("schema")
    if schema == ACTION_V2:
        return _validate(ActionMessage, document)
    if schema == EVENT_V2:
        event_type = document.get("eventType")
        if not isinstance(event_type, str):
            raise DecodeError("missing eventType", reason=Reason.MISSING_FIELD)
        model = _EVENTS.get(event_type)
        if model is None:
            return _validate(UnknownEvent, document)
        return _validate(model, document)
    if schema == ACTION_V1:
        legacy = _validate(ActionMessageV1, document)
        try:
            return upgrade_v1(legacy)
        except ValidationError as exc:
            raise _invalid(exc, "v1 upgrade: ") from None
    if schema is None:
        raise DecodeError("no schema key", reason=Reason.UNKNOWN_SCHEMA)
    label = (
        schema
        if isinstance(schema, str) and len(schema) <= 40 and _SCHEMA_LABEL.fullmatch(schema)
        else type(schema).__name__
    )
    raise DecodeError(f"unknown schema {label!r}", reason=Reason.UNKNOWN_SCHEMA)


def decode(body: bytes | str) -> Message:
    """Decode one message body. Raises :class:`DecodeError` with a reason code."""
    return decode_document(parse_json(body))
