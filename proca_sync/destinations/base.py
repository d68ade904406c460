"""What every destination connector implements, and the data it is handed.

A *destination* is a CRM or mailing tool kept in sync from the embedded CRM (the ledger).
It never sees queue messages: the pusher (:mod:`proca_sync.destinations.pusher`) reads
the ledger's change log after the destination's cursor, coalesces the changes per contact
(ten actions of one person → one contact upsert plus ten activities) and hands the
connector a :class:`Batch` holding the **merged current state** of each changed contact,
the activities it lacks, and the erasures to propagate. The remote result therefore does
not depend on the order messages arrived in, and pushing the same batch again changes
nothing.

The contract of :meth:`Destination.push` (one contract suite runs every connector):

* It returns a :class:`PushReport`. An item not named in ``report.failed`` was written
  (or already was). Contacts are written before the activities of the same batch, and
  every activity's contact is in the batch.
* A failure of the whole destination — unreachable, timeouts, 5xx or 429 after the
  client's own retries, authentication refused — raises
  :class:`~proca_sync.errors.TransientError` (``retry_after`` kept when the API said
  how long to wait). The pusher offers the whole batch again later; nothing is parked.
* An item the API refuses for good (an invalid address, a validation error) is a
  :class:`DestinationRejectedError` in ``report.failed`` under that item's key, with the
  API's own error code: the pusher parks it *for this destination* and the rest go on.
  An item that failed transiently while the others were written is a
  :class:`~proca_sync.errors.TransientError` there: it is offered again later.
* Pushing twice is harmless: an activity already recorded remotely is not recorded again
  (connectors derive a remote identifier from the action id, or look it up first where
  the API has no other way — their docs page states any bound on duplicates).

Personal data travels in the views (``repr=False`` on every personal field) and never in
error messages, log lines or item keys: keys are ledger ids.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal, Protocol, runtime_checkable

from pydantic import BaseModel, ConfigDict, Field

from proca_sync.errors import BackendRejectedError, ConfigError, ProcaSyncError
from proca_sync.sync.consent import NEGATIVE_STATUSES

__all__ = [
    "ActionView",
    "Batch",
    "CampaignView",
    "ContactView",
    "Destination",
    "DestinationConfig",
    "DestinationRejectedError",
    "Erasure",
    "ItemKey",
    "PushReport",
    "Subscription",
]

Subscription = Literal["subscribed", "unsubscribed", "not_opted_in"]
"""What the ledger says of mailing this person, as a destination needs it:

* ``subscribed`` — may be mailed (opted in, or confirmed by double opt-in);
* ``unsubscribed`` — must not be mailed: the newest e-mail status is an objection or a bad
  address (``unsub``, ``spam``, ``bounce``, ``blocked``, ``inactive``, or unknown);
* ``not_opted_in`` — never opted in, never objected: create or update the contact without
  subscribing it, and never unsubscribe someone the remote CRM already has as a subscriber.
"""

ItemKey = tuple[Literal["contact", "action", "erasure", "retired"], str]
"""``("contact", "<ledger contact id>")``, ``("action", "<action id>")``,
``("erasure", "<tombstone id>")``, ``("retired", "<ledger contact id>")``: how a report
names an item (no personal data)."""


class DestinationRejectedError(BackendRejectedError):
    """The destination's API refused one item for good; ``code`` is the API's error code."""

    def __init__(self, message: str, *, code: str) -> None:
        super().__init__(message)
        self.code = code


@dataclass(frozen=True, slots=True)
class CampaignView:
    """A campaign as the ledger knows it (for per-campaign lists, groups and tags)."""

    name: str
    title: str | None
    external_id: int | None


@dataclass(frozen=True, slots=True)
class ContactView:
    """The merged current state of one admitted contact, as of change ``version``.

    ``email`` is the contact's current address (normalised: trimmed, lower case) and is
    what every SaaS CRM matches on; contacts without one are not pushed. ``fields`` holds
    the other personal fields exactly as the ledger keeps them (``phone``, ``address``,
    ``locality``, …). ``campaigns`` lists the campaigns the person acted in.
    """

    contact_id: int
    version: int
    email: str = field(repr=False)
    first_name: str | None = field(repr=False)
    last_name: str | None = field(repr=False)
    postcode: str | None = field(repr=False)
    country: str | None = field(repr=False)
    fields: Mapping[str, Any] = field(repr=False)
    refs: tuple[str, ...]
    subscribed: bool
    opted_in: bool
    opt_in_at: str | None
    email_status: str | None
    email_status_changed: str | None
    testing: bool
    campaigns: tuple[str, ...]
    updated_at: str

    @property
    def key(self) -> ItemKey:
        return ("contact", str(self.contact_id))

    def field(self, source: str) -> Any:
        """A ledger field as the connectors' mapping tables name it: ``first_name``,
        ``last_name``, ``postcode``, ``country``, else a personal field (``fields.NAME``
        or plain ``NAME``)."""
        if source.startswith("fields."):
            return self.fields.get(source.removeprefix("fields."))
        if source in {"first_name", "last_name", "postcode", "country"}:
            return getattr(self, source)
        return self.fields.get(source)

    @property
    def subscription(self) -> Subscription:
        if self.subscribed:
            return "subscribed"
        if self.email_status in NEGATIVE_STATUSES or self.email_status not in {
            None,
            "active",
            "double_opt_in",
        }:
            return "unsubscribed"
        return "not_opted_in"


@dataclass(frozen=True, slots=True)
class ActionView:
    """One action of a contact in the batch, recorded once remotely (keyed by its id).

    ``data`` is the ledger's copy of the action (``customFields``, ``withConsent``,
    ``actionPage``, ``tracking``, ``donation`` when present).
    """

    action_id: int
    contact_id: int
    action_type: str
    campaign: str
    created_at: str
    testing: bool
    data: Mapping[str, Any] = field(repr=False)

    @property
    def key(self) -> ItemKey:
        return ("action", str(self.action_id))


@dataclass(frozen=True, slots=True)
class Erasure:
    """An address whose remote record must go: a contact erased from the ledger
    (``crm forget``), or — with ``retired`` — an address the ledger no longer pushes to.

    *Erasure* (``retired`` false): ``tombstone_id`` is the tombstone's id; the ledger
    keeps the address only until every destination that supports erasure has propagated
    it; ``refs`` are the contact refs it had. Connectors erase the person the way their
    docs page says (GDPR delete where the API has one).

    *Retirement* (``retired`` true): ``tombstone_id`` is the ledger id of the contact
    the address was pushed for — a contact merged away by deduplication, or a contact
    whose current address changed — and ``refs`` is empty (the refs live on in the
    merged contact). The person is still in the ledger under another address: the
    connector removes or archives the record of *this address* only, never with a
    permanent deletion that would stop the address from coming back later (Mailchimp's
    ``delete-permanent``, HubSpot's GDPR delete), and where the API cannot delete, does
    what its docs page says. The pusher sends a window's retirements in batches of their
    own, before the window's contact upserts, and then offers every action of the
    remaining contact again (connectors skip those the destination still has), so that
    activities an API removed with the retired record are recorded again.
    """

    tombstone_id: int
    email: str = field(repr=False)
    refs: tuple[str, ...]
    retired: bool = False

    @property
    def key(self) -> ItemKey:
        return ("retired" if self.retired else "erasure", str(self.tombstone_id))


@dataclass(frozen=True, slots=True)
class Batch:
    """What one push sends: contact upserts, then their new activities, then erasures
    (and retirements: :class:`Erasure` with ``retired``; a batch of retirements holds
    nothing else)."""

    contacts: Sequence[ContactView] = ()
    actions: Sequence[ActionView] = ()
    erasures: Sequence[Erasure] = ()
    campaigns: Mapping[str, CampaignView] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.contacts) + len(self.actions) + len(self.erasures)


@dataclass(slots=True)
class PushReport:
    """The outcome of one push: the items that were not written, and why."""

    failed: dict[ItemKey, ProcaSyncError] = field(default_factory=dict)
    requests: int = 0
    """HTTP requests the push made (for metrics and the benchmarks)."""


class DestinationConfig(BaseModel):
    """Keys every connector understands in its ``[destinations.NAME]`` table.

    Secrets are never in the file: ``api_key_env`` names an environment variable,
    ``api_key_file`` a file holding the key. Connectors subclass this with their own keys
    and a ``type`` literal.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    type: str
    base_url: str | None = None
    api_key_env: str | None = None
    api_key_file: Path | None = None
    rate: float | None = Field(default=None, gt=0, description="Requests per second.")
    burst: int | None = Field(default=None, ge=1)
    batch_size: int | None = Field(default=None, ge=1)
    timeout: float = Field(default=30.0, gt=0)
    include_testing: bool = False

    def api_key(self) -> str:
        """The API key from the named variable or file; :class:`ConfigError` if missing."""
        if self.api_key_env:
            value = os.environ.get(self.api_key_env, "").strip()
            if not value:
                raise ConfigError(f"environment variable {self.api_key_env} is not set")
            return value
        if self.api_key_file is not None:
            try:
                value = self.api_key_file.read_text(encoding="utf-8").strip()
            except OSError as exc:
                raise ConfigError(
                    f"cannot read api_key_file {self.api_key_file} ({type(exc).__name__})"
                ) from None
            if not value:
                raise ConfigError(f"api_key_file {self.api_key_file} is empty")
            return value
        raise ConfigError("set api_key_env or api_key_file (the key itself never goes here)")


@runtime_checkable
class Destination(Protocol):
    """A CRM kept in sync from the ledger. See the module docstring for the contract."""

    name: str
    """The configured name (``[destinations.NAME]``)."""
    type: ClassVar[str]
    """``brevo``, ``mailchimp``, ``civicrm``, ``jsonl``, …"""
    max_batch: int
    """At most this many contacts per :meth:`push` (actions of those contacts ride along)."""
    supports_erasure: bool

    async def open(self) -> None: ...

    async def close(self) -> None: ...

    async def ping(self) -> None:
        """Raise :class:`~proca_sync.errors.TransientError` while unusable, or
        :class:`~proca_sync.errors.ConfigError` when the configuration is wrong
        (refused key, unknown list)."""
        ...

    async def push(self, batch: Batch) -> PushReport: ...
