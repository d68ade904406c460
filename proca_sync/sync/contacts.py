"""Contact identity and personal data: de-duplication and newest-wins merging.

A contact is a cluster of identities (contact refs and normalised e-mails): a message
whose ref *or* e-mail matches a stored contact belongs to it, and a message linking two
stored contacts merges them. Each personal field is a register holding a value and the
stamp of the data it came from; a value replaces the stored one only when its stamp (and,
on a tie, its canonical JSON) is greater. Every operation here is a join — commutative,
associative, idempotent — which is what makes the CRM independent of message order.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

import orjson

from proca_sync.messages.schemas import parse_timestamp
from proca_sync.sync.consent import is_subscribed
from proca_sync.sync.records import ContactFacts

__all__ = [
    "ContactState",
    "normalise_email",
    "stamp",
    "timestamp_key",
]


def normalise_email(email: str | None) -> str | None:
    """The e-mail as an identity key: trimmed and lower-cased; ``None`` when empty."""
    if email is None:
        return None
    key = email.strip().lower()
    return key or None


_WHOLE_SECONDS_UTC = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ")
_MICROSECONDS_UTC = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z")


def timestamp_key(value: str | None) -> str:
    """A fixed-width UTC form of a wire timestamp that sorts as time does."""
    if not value:
        return ""
    # The two forms the server emits are already UTC: only pad them (hot path).
    if _WHOLE_SECONDS_UTC.fullmatch(value):
        return value[:19] + ".000000Z"
    if _MICROSECONDS_UTC.fullmatch(value):
        return value
    return parse_timestamp(value).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def stamp(ts_key: str, rank: int, action_id: int | None) -> str:
    """Order of personal data: time of the data, then consent-bearing first, then id."""
    return f"{ts_key}|{rank}|{(action_id or 0):020d}"


def _canonical(value: Any) -> bytes:
    return orjson.dumps(value, option=orjson.OPT_SORT_KEYS)


def _newer(new_value: Any, new_stamp: str, old: tuple[Any, str] | None) -> bool:
    if old is None:
        return True
    old_value, old_stamp = old
    if new_stamp != old_stamp:
        return new_stamp > old_stamp
    return _canonical(new_value) > _canonical(old_value)


@dataclass(slots=True)
class ContactState:
    """Everything the CRM holds about one person, before deriving subscription."""

    refs: set[str] = field(default_factory=set)
    emails: set[str] = field(default_factory=set, repr=False)
    fields: dict[str, tuple[Any, str]] = field(default_factory=dict, repr=False)
    admitted: bool = False
    real: bool = False
    opted_in: bool = False
    opt_in_at: str | None = None
    status: str | None = None
    status_changed: str | None = None
    status_stamp: str = ""

    @property
    def subscribed(self) -> bool:
        return is_subscribed(opted_in=self.opted_in, email_status=self.status)

    def value(self, name: str) -> Any:
        entry = self.fields.get(name)
        return None if entry is None else entry[0]

    def absorb(self, facts: ContactFacts) -> None:
        """Merge one message's facts into this state (in place)."""
        self.refs |= facts.refs
        self.emails |= facts.emails
        for name, value in facts.fields.items():
            if _newer(value, facts.stamp, self.fields.get(name)):
                self.fields[name] = (value, facts.stamp)
        self.admitted = self.admitted or facts.admit
        self.real = self.real or facts.real
        consent = facts.consent
        if consent is not None and consent.opt_in:
            self.opted_in = True
            if consent.given_at and (self.opt_in_at is None or consent.given_at < self.opt_in_at):
                self.opt_in_at = consent.given_at
        status = facts.status
        if status is not None and status.stamp > self.status_stamp:
            self.status = status.status
            self.status_changed = status.changed_at
            self.status_stamp = status.stamp

    def join(self, other: ContactState) -> None:
        """Merge another stored contact into this one (in place)."""
        self.refs |= other.refs
        self.emails |= other.emails
        for name, (value, value_stamp) in other.fields.items():
            if _newer(value, value_stamp, self.fields.get(name)):
                self.fields[name] = (value, value_stamp)
        self.admitted = self.admitted or other.admitted
        self.real = self.real or other.real
        if other.opted_in:
            self.opted_in = True
            if other.opt_in_at and (self.opt_in_at is None or other.opt_in_at < self.opt_in_at):
                self.opt_in_at = other.opt_in_at
        if other.status_stamp > self.status_stamp:
            self.status = other.status
            self.status_changed = other.status_changed
            self.status_stamp = other.status_stamp
