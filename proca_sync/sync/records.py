"""What one message contributes to the CRM: the facts every backend applies.

The engine (:mod:`proca_sync.sync.model`) turns a decoded, decrypted message into a
:class:`SyncRecord` looking at that message only. Every part of a record is a *fact* that
backends merge with a join (newest stamp wins, sets grow, flags only switch on), so the
state reached does not depend on the order in which records are applied, and applying a
record twice changes nothing.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

__all__ = [
    "ActionRecord",
    "CampaignFact",
    "ConsentFact",
    "ContactFacts",
    "IgnoreReason",
    "Ignored",
    "Mode",
    "StatusFact",
    "SyncRecord",
]


class Mode(StrEnum):
    """Which messages reach the CRM (sync.md §8, with its defects fixed)."""

    ALL = "all"
    CONTACT = "contact"
    OPT_IN = "opt-in"
    DOUBLE_OPT_IN = "double-opt-in"


class IgnoreReason(StrEnum):
    """Why a valid message was acknowledged without touching the CRM."""

    SYSTEM = "system_message"
    NOT_DELIVERED = "not_deliver_stage"
    CONFIRM_CREATED = "confirm_created"
    UNKNOWN_EVENT = "unknown_event"
    TESTING = "testing_skipped"
    MODE = "filtered_by_mode"


@dataclass(frozen=True, slots=True)
class Ignored:
    reason: IgnoreReason
    detail: str = ""


@dataclass(frozen=True, slots=True)
class ConsentFact:
    """A consent-bearing action (``withConsent: true``) and the answer it carried."""

    action_id: int
    opt_in: bool | None
    given_at: str | None


@dataclass(frozen=True, slots=True)
class StatusFact:
    """An e-mail status with the time it changed; ``stamp`` orders facts (newest wins)."""

    status: str | None
    changed_at: str | None
    stamp: str
    source: str


@dataclass(frozen=True, slots=True)
class ContactFacts:
    """Identity and personal data of the supporter a message is about.

    ``fields`` holds only present, non-empty values (a missing or null value never
    blanks stored data); they all share ``stamp``. ``admit`` says whether this message
    alone makes the contact visible in the CRM (an action that passed the mode filter, a
    double-opt-in event); other facts wait, hidden, until something admits the contact.
    """

    refs: frozenset[str]
    emails: frozenset[str]
    fields: dict[str, Any] = field(repr=False)
    stamp: str
    admit: bool
    real: bool
    consent: ConsentFact | None = None
    status: StatusFact | None = None

    @property
    def lane(self) -> str:
        """The ordering key: the first contact ref, else the e-mail."""
        if self.refs:
            return "ref:" + min(self.refs)
        return "email:" + min(self.emails)


@dataclass(frozen=True, slots=True)
class ActionRecord:
    """One action, keyed by ``action_id``. ``version`` orders differing copies."""

    action_id: int
    action_type: str
    campaign: str
    created_at: str
    testing: bool
    data: dict[str, Any] = field(repr=False)
    version: str = field(repr=False)


@dataclass(frozen=True, slots=True)
class CampaignFact:
    name: str
    data: dict[str, Any]
    stamp: str


@dataclass(frozen=True, slots=True)
class SyncRecord:
    """Everything one message asks the CRM to hold. ``key`` identifies the message."""

    key: str
    kind: str
    contact: ContactFacts | None = None
    action: ActionRecord | None = None
    campaign: CampaignFact | None = None

    @property
    def lane(self) -> str:
        if self.contact is not None:
            return self.contact.lane
        if self.campaign is not None:
            return "campaign:" + self.campaign.name
        return "key:" + self.key
