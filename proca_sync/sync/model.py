"""The sync engine: one decoded, decrypted message → the record the CRM must hold.

Pure: the decision looks at the message alone (never at stored state), so it is the same
whatever arrived before; backends merge records with the joins of
:mod:`proca_sync.sync.contacts`. Rules (sync.md, consumer.md):

* ``stage: system`` messages, confirm stages, ``confirm_created`` and unknown event
  types are acknowledged and ignored;
* ``testing`` actions are stored and flagged, or dropped with ``skip_testing``;
* modes (sync.md §8, fixed): ``all`` syncs every delivered action; ``contact`` only
  consent-bearing ones; ``opt-in`` actions whose supporter opted in (follow-ups
  included: their ``optIn`` repeats the stored consent) or confirmed by double opt-in;
  ``double-opt-in`` actions whose address is confirmed. Nothing is ever "nacked" for
  being outside the mode;
* ``email_status`` events are always recorded; a ``double_opt_in`` event makes an
  unknown contact visible, any other status waits for the contact to appear (a bounce
  for a supporter never delivered stays invisible);
* ``campaign_updated`` replaces the campaign record (it outranks the campaign snapshot
  carried by actions).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any

from proca_sync.errors import DecodeError, Reason
from proca_sync.messages.schemas import (
    ActionMessage,
    CampaignUpdatedEvent,
    ConfirmCreatedEvent,
    Contact,
    EmailStatusEvent,
    Message,
    Privacy,
    Stage,
)
from proca_sync.sync.consent import DOUBLE_OPT_IN, status_stamp
from proca_sync.sync.contacts import normalise_email, stamp, timestamp_key
from proca_sync.sync.records import (
    ActionRecord,
    CampaignFact,
    ConsentFact,
    ContactFacts,
    Ignored,
    IgnoreReason,
    Mode,
    StatusFact,
    SyncRecord,
)

__all__ = ["COLUMN_FIELDS", "Options", "body_digest", "model_message"]

_NOT_PERSONAL_FIELDS = frozenset({"contactRef", "dupeRank"})
COLUMN_FIELDS = frozenset({"email", "firstName", "lastName", "postcode", "country"})
"""Fields a CRM keeps in columns of their own: a list or an object there is not data any
CRM can store, whatever the retries (the other fields are kept as JSON, as sent)."""


@dataclass(frozen=True, slots=True)
class Options:
    mode: Mode = Mode.ALL
    skip_testing: bool = False


def body_digest(body: bytes) -> str:
    """A short digest of the message bytes: identical redeliveries share it."""
    return hashlib.blake2b(body, digest_size=12).hexdigest()


def _personal_fields(record: dict[str, Any]) -> dict[str, Any]:
    fields = {
        key: value
        for key, value in record.items()
        if key not in _NOT_PERSONAL_FIELDS and value is not None and value != ""
    }
    for name in COLUMN_FIELDS.intersection(fields):
        if isinstance(fields[name], list | dict):
            kind = type(fields[name]).__name__
            raise DecodeError(f"contact.{name} is a {kind}", reason=Reason.INVALID_FIELD)
    if "email" in fields:
        # Proca trims and lower-cases e-mails (basic schema); keep one spelling.
        email = normalise_email(str(fields["email"]))
        if email is None:
            del fields["email"]
        else:
            fields["email"] = email
    return fields


def _status_fact(privacy: Privacy, source: str) -> StatusFact | None:
    if privacy.email_status is None and privacy.email_status_changed is None:
        return None
    changed_key = timestamp_key(privacy.email_status_changed)
    return StatusFact(
        status=privacy.email_status,
        changed_at=privacy.email_status_changed,
        stamp=status_stamp(privacy.email_status, changed_key),
        source=source,
    )


def _identities(contact: Contact) -> tuple[frozenset[str], frozenset[str]]:
    refs = frozenset({contact.contact_ref} if contact.contact_ref else ())
    email = normalise_email(contact.email)
    emails = frozenset({email} if email else ())
    return refs, emails


def _admitted_by_mode(message: ActionMessage, mode: Mode) -> bool:
    privacy = message.privacy
    if mode is Mode.ALL:
        return True
    if mode is Mode.CONTACT:
        return privacy.with_consent
    if mode is Mode.OPT_IN:
        return privacy.opt_in is True or privacy.email_status == DOUBLE_OPT_IN
    return privacy.email_status == DOUBLE_OPT_IN


def _model_action(message: ActionMessage, options: Options, digest: str) -> SyncRecord | Ignored:
    if message.stage is Stage.SYSTEM:
        return Ignored(IgnoreReason.SYSTEM, message.event_type or "")
    if message.stage is not Stage.DELIVER:
        return Ignored(IgnoreReason.NOT_DELIVERED, message.stage.value)
    action = message.action
    if action.testing and options.skip_testing:
        return Ignored(IgnoreReason.TESTING)
    if not _admitted_by_mode(message, options.mode):
        return Ignored(IgnoreReason.MODE, options.mode.value)

    # Both guaranteed by ActionMessage's validator for delivered actions.
    assert message.action_id is not None
    assert message.campaign is not None
    action_id = message.action_id
    privacy = message.privacy
    created_key = timestamp_key(action.created_at)
    # Follow-up actions carry the supporter record of the original submission: their
    # data is as old as that record (givenAt), not as new as the follow-up itself.
    data_key = created_key
    if not privacy.with_consent and privacy.given_at:
        data_key = min(created_key, timestamp_key(privacy.given_at))
    # One serialisation of the parts kept as data (the hot path of every action).
    wire = message.model_dump(
        mode="json",
        exclude_unset=True,
        include={"action", "action_page", "tracking", "campaign", "contact"},
    )
    refs, emails = _identities(message.contact)
    if not refs and not emails:
        # Nothing to find the supporter by, now or on any retry (personalInfo, when
        # there was one, is already decrypted and merged here).
        raise DecodeError("action without contactRef or e-mail", reason=Reason.MISSING_FIELD)
    consent = None
    if privacy.with_consent:
        consent = ConsentFact(action_id, privacy.opt_in, privacy.given_at)
    contact = ContactFacts(
        refs=refs,
        emails=emails,
        fields=_personal_fields(wire["contact"]),
        stamp=stamp(data_key, 1 if privacy.with_consent else 0, action_id),
        admit=True,
        real=not action.testing,
        consent=consent,
        status=_status_fact(privacy, f"action:{action_id}"),
    )
    data = {
        "actionId": action_id,
        "actionType": action.action_type,
        "campaign": message.campaign.name,
        "createdAt": action.created_at,
        "customFields": wire["action"].get("customFields", {}),
        "testing": action.testing,
        "withConsent": privacy.with_consent,
        "optIn": privacy.opt_in,
        "dupeRank": message.contact.dupe_rank,
        "donation": wire["action"].get("donation"),
        "actionPage": wire.get("actionPage"),
        "actionPageId": message.action_page_id,
        "orgId": message.org_id,
        "tracking": wire.get("tracking"),
    }
    record = ActionRecord(
        action_id=action_id,
        action_type=action.action_type,
        campaign=message.campaign.name,
        created_at=action.created_at,
        testing=action.testing,
        data=data,
        version=f"{created_key}|{digest}",
    )
    campaign = wire["campaign"]
    campaign["campaignId"] = message.campaign_id
    return SyncRecord(
        key=f"action:{action_id}:{digest}",
        kind="action",
        contact=contact,
        action=record,
        campaign=CampaignFact(
            message.campaign.name, campaign, f"0|{created_key}|{action_id:020d}|{digest}"
        ),
    )


def _model_email_status(event: EmailStatusEvent, digest: str) -> SyncRecord:
    supporter = event.supporter
    refs, emails = _identities(supporter.contact)
    if not refs and not emails:
        raise DecodeError(
            "email_status event without contactRef or e-mail", reason=Reason.MISSING_FIELD
        )
    privacy = supporter.privacy
    if event.action is not None:
        data_key = timestamp_key(event.action.created_at)
    else:
        data_key = timestamp_key(privacy.given_at or event.timestamp)
    status = _status_fact(privacy, "event")
    contact = ContactFacts(
        refs=refs,
        emails=emails,
        fields=_personal_fields(supporter.contact.record()),
        stamp=stamp(data_key, 0, event.action_id),
        admit=privacy.email_status == DOUBLE_OPT_IN,
        real=not (event.action is not None and event.action.testing),
        consent=None,
        status=status,
    )
    campaign = None
    if event.campaign is not None:
        data = event.campaign.model_dump(mode="json", exclude_unset=True)
        data["campaignId"] = event.campaign_id
        campaign = CampaignFact(event.campaign.name, data, f"0|{data_key}|0|{digest}")
    # Identical events (repeated double-opt-in clicks, redeliveries) share the digest;
    # events that differ in any byte are distinct facts, merged by their stamps.
    return SyncRecord(
        key=f"email_status:{digest}",
        kind="email_status",
        contact=contact,
        campaign=campaign,
    )


def _model_campaign(event: CampaignUpdatedEvent, digest: str) -> SyncRecord:
    campaign = event.campaign.model_dump(mode="json", exclude_unset=True)
    campaign.setdefault("campaignId", event.campaign_id)
    when = timestamp_key(event.timestamp)
    return SyncRecord(
        key=f"campaign:{event.campaign.name}:{digest}",
        kind="campaign",
        campaign=CampaignFact(event.campaign.name, campaign, f"1|{when}|{digest}"),
    )


def model_message(message: Message, options: Options, *, digest: str) -> SyncRecord | Ignored:
    """Decide what the CRM must hold after this message (or why it is ignored).

    ``message`` must already be decrypted. ``digest`` is :func:`body_digest` of the raw
    body and makes the record key stable across redeliveries. Raises
    :class:`~proca_sync.errors.DecodeError` for an event that names no contact.
    """
    if isinstance(message, ActionMessage):
        return _model_action(message, options, digest)
    if isinstance(message, EmailStatusEvent):
        return _model_email_status(message, digest)
    if isinstance(message, CampaignUpdatedEvent):
        return _model_campaign(message, digest)
    if isinstance(message, ConfirmCreatedEvent):
        return Ignored(IgnoreReason.CONFIRM_CREATED)
    return Ignored(IgnoreReason.UNKNOWN_EVENT, message.event_type)
