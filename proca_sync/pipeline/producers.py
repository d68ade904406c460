"""Build and publish messages exactly as the Proca server puts them on the wire.

Builders return plain JSON-ready dicts (spec: messages.md §2, §4, §6): camelCase keys,
``null`` rather than absent where the server writes ``null``, whole-second
``YYYY-MM-DDTHH:MM:SSZ`` timestamps for database values and microseconds for clock
values. They do no I/O. Exchange and routing-key names come from
:mod:`proca_sync.pipeline.topology`.

:class:`Publisher` sends bodies like the server: persistent, mandatory, no content type,
no headers of our own, with publisher confirms. :class:`NonceCounter` is the server's
nonce scheme (crypto.md §2): a random 192-bit start, incremented per encryption.
"""

from __future__ import annotations

import secrets
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Literal
from urllib.parse import quote

import aio_pika
import aiormq.abc
import orjson
from aio_pika.abc import AbstractChannel, AbstractConnection, AbstractExchange

from proca_sync.crypto import NONCE_BYTES, KeyPair, encrypt_record
from proca_sync.pipeline.topology import (
    EMAIL_STATUS_KEY,
    action_routing_key,
    campaign_updated_key,
    confirm_created_key,
    event_exchange,
    stage_exchange,
    system_routing_key,
)

__all__ = [
    "CampaignInfo",
    "Consent",
    "ContactData",
    "DonationData",
    "EmailStatus",
    "Encryption",
    "NonceCounter",
    "OrgInfo",
    "PageInfo",
    "PrivacyData",
    "Publisher",
    "Route",
    "StageName",
    "SystemEvent",
    "TrackingData",
    "action_route",
    "build_action",
    "build_action_v1",
    "build_campaign_updated",
    "build_confirm_created",
    "build_email_status_event",
    "build_system_message",
    "camelize",
    "clock_time",
    "db_time",
    "event_route",
]

EmailStatus = Literal["double_opt_in", "bounce", "blocked", "spam", "unsub", "inactive", "active"]
StageName = Literal["deliver", "supporter_confirm", "action_confirm"]
SystemEvent = Literal["join_campaign", "new_org", "new_user"]
CustomValue = str | bool | int | float | list[str] | list[int | float]

_NONCE_MODULUS = 1 << (8 * NONCE_BYTES)


# ---- timestamps and keys ----------------------------------------------------------------


def _utc(moment: datetime) -> datetime:
    if moment.tzinfo is None:
        raise ValueError("timestamps must be timezone-aware")
    return moment.astimezone(UTC)


def db_time(moment: datetime) -> str:
    """A database-derived timestamp: whole seconds, ``Z`` (``2022-11-20T23:21:54Z``)."""
    return _utc(moment).strftime("%Y-%m-%dT%H:%M:%SZ")


def clock_time(moment: datetime) -> str:
    """A clock-derived timestamp with microseconds (``2024-05-02T10:11:12.123456Z``)."""
    return _utc(moment).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def camelize(key: str) -> str:
    """The server's key camelCasing in events: ``my_field`` → ``myField``, ``Comment`` →
    ``comment`` (messages.md §6)."""
    head, *rest = key.split("_")
    joined = head + "".join(part[:1].upper() + part[1:] for part in rest)
    return joined[:1].lower() + joined[1:]


# ---- value objects (inputs of the builders) ---------------------------------------------


@dataclass(frozen=True)
class OrgInfo:
    id: int
    name: str
    title: str

    def wire(self) -> dict[str, Any]:
        return {"name": self.name, "title": self.title}


@dataclass(frozen=True)
class CampaignInfo:
    id: int
    name: str
    title: str
    external_id: int | None = None
    contact_schema: str = "basic"

    def wire(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "title": self.title,
            "externalId": self.external_id,
            "contactSchema": self.contact_schema,
        }


@dataclass(frozen=True)
class PageInfo:
    id: int
    name: str
    locale: str
    thank_you_template: str | None = None
    thank_you_template_ref: str | None = None
    supporter_confirm_template: str | None = None

    def wire(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "locale": self.locale,
            "thankYouTemplate": self.thank_you_template,
            "thankYouTemplateRef": self.thank_you_template_ref,
            "supporterConfirmTemplate": self.supporter_confirm_template,
        }


@dataclass(frozen=True)
class ContactData:
    """One supporter as seen by the receiving org.

    ``record`` is the personal-data record of the campaign's contact schema (messages.md
    §3, null keys already omitted); ``first_name``/``email``/``area`` are the layer-1 values
    the server keeps in clear (``None`` when cleared or for high-security orgs).
    """

    contact_ref: str | None
    record: Mapping[str, Any] = field(default_factory=dict, repr=False)
    dupe_rank: int | None = 0
    first_name: str | None = field(default=None, repr=False)
    email: str | None = field(default=None, repr=False)
    area: str | None = None

    @classmethod
    def from_record(
        cls,
        contact_ref: str,
        record: Mapping[str, Any],
        *,
        dupe_rank: int | None = 0,
        keep_email: bool = True,
        high_security: bool = False,
    ) -> ContactData:
        """Derive layer 1 from the record as the server does (messages.md §2.7)."""
        first_name = None if high_security else record.get("firstName")
        email = None if high_security or not keep_email else record.get("email")
        return cls(
            contact_ref=contact_ref,
            record=dict(record),
            dupe_rank=dupe_rank,
            first_name=first_name,
            email=email,
            area=record.get("area"),
        )

    def layer1(self) -> dict[str, Any]:
        return {
            "contactRef": self.contact_ref,
            "dupeRank": self.dupe_rank,
            "firstName": self.first_name,
            "email": self.email,
            "area": self.area,
        }


@dataclass(frozen=True)
class Consent:
    """The receiving org's stored consent: ``opt_in`` ``None`` means "not asked"."""

    opt_in: bool | None
    given_at: datetime


@dataclass(frozen=True)
class PrivacyData:
    """``consent`` is ``None`` when the receiving org holds no contact record."""

    consent: Consent | None = None
    with_consent: bool = False
    email_status: EmailStatus | None = None
    email_status_changed: datetime | None = None

    def wire(self, *, with_consent: bool | None = None) -> dict[str, Any]:
        out: dict[str, Any] = {}
        if self.consent is not None:
            out["optIn"] = self.consent.opt_in
            out["givenAt"] = db_time(self.consent.given_at)
        out["withConsent"] = self.with_consent if with_consent is None else with_consent
        out["emailStatus"] = self.email_status
        changed = self.email_status_changed
        out["emailStatusChanged"] = None if changed is None else db_time(changed)
        return out


@dataclass(frozen=True)
class DonationData:
    amount: int
    currency: str = "EUR"
    frequency_unit: Literal["one_off", "weekly", "monthly", "daily"] = "one_off"
    payload: Mapping[str, Any] = field(default_factory=dict)
    schema: str | None = None

    def wire(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "amount": self.amount,
            "currency": self.currency,
            "frequencyUnit": self.frequency_unit,
            "payload": dict(self.payload),
        }
        if self.schema is not None:
            out["schema"] = self.schema
        return out


@dataclass(frozen=True)
class TrackingData:
    source: str = "unknown"
    medium: str = "unknown"
    campaign: str = "unknown"
    content: str = ""
    location: str = ""

    def wire(self) -> dict[str, Any]:
        return {
            "source": self.source,
            "medium": self.medium,
            "campaign": self.campaign,
            "content": self.content,
            "location": self.location,
        }


class NonceCounter:
    """24-byte nonces as the server makes them: random start, +1 (big-endian) per use.

    Unique per instance, not random-looking. Pass ``start`` for reproducible output.
    """

    def __init__(self, start: int | None = None) -> None:
        value = secrets.randbits(8 * NONCE_BYTES) if start is None else start
        self._value = value % _NONCE_MODULUS

    def __repr__(self) -> str:
        return "NonceCounter()"

    def next(self) -> bytes:
        nonce = self._value.to_bytes(NONCE_BYTES, "big")
        self._value = (self._value + 1) % _NONCE_MODULUS
        return nonce


@dataclass(frozen=True)
class Encryption:
    """How the server encrypts for one receiving org: instance key as sender (crypto.md §1)."""

    recipient_public: str
    sender: KeyPair
    nonces: NonceCounter = field(default_factory=NonceCounter, compare=False)
    recipient_key_id: int = 1
    sender_key_id: int = 1

    def seal(self, record: Mapping[str, Any]) -> dict[str, Any]:
        """The ``personalInfo`` object of ``record`` (new nonce each call)."""
        info = encrypt_record(
            record,
            recipient_public=self.recipient_public,
            sender=self.sender,
            nonce=self.nonces.next(),
        )
        info["encryptKey"]["id"] = self.recipient_key_id
        info["signKey"]["id"] = self.sender_key_id
        return info


# ---- routes -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Route:
    exchange: str
    routing_key: str


def action_route(org: int, stage: StageName, action_type: str, campaign: str) -> Route:
    """Where the server publishes an action for receiving org ``org``."""
    return Route(stage_exchange(org, stage), action_routing_key(action_type, campaign))


def event_route(org: int, message: Mapping[str, Any]) -> Route:
    """Where the server publishes an event or system message built here for ``org``."""
    event_type = message.get("eventType")
    if message.get("schema") == "proca:action:2" and message.get("stage") == "system":
        return Route(event_exchange(org), system_routing_key(str(event_type)))
    if event_type == "email_status":
        return Route(event_exchange(org), EMAIL_STATUS_KEY)
    if event_type == "campaign_updated":
        return Route(event_exchange(org), campaign_updated_key())
    if event_type == "confirm_created":
        return Route(event_exchange(org), confirm_created_key(message["confirm"]["operation"]))
    raise ValueError(f"no route for event type {event_type!r}")


# ---- builders ---------------------------------------------------------------------------


def _personal(contact: ContactData, encryption: Encryption | None) -> dict[str, Any] | None:
    if encryption is None or not contact.record:
        return None
    return encryption.seal(contact.record)


def _contact_v2(contact: ContactData, personal_info: dict[str, Any] | None) -> dict[str, Any]:
    out = contact.layer1()
    if personal_info is None:
        out.update(contact.record)
    return out


def build_action(
    *,
    stage: StageName = "deliver",
    action_id: int,
    action_type: str,
    created_at: datetime,
    page: PageInfo,
    campaign: CampaignInfo,
    org: OrgInfo,
    contact: ContactData,
    privacy: PrivacyData,
    custom_fields: Mapping[str, CustomValue] | None = None,
    testing: bool = False,
    donation: DonationData | None = None,
    tracking: TrackingData | None = None,
    encryption: Encryption | None = None,
) -> dict[str, Any]:
    """An action message ``proca:action:2`` (messages.md §2) for one receiving org.

    ``org`` is the collecting (page-owning) org. With ``encryption`` and a non-empty
    record, ``contact`` is layer 1 only and the record travels in ``personalInfo``;
    otherwise the record is merged over layer 1 and ``personalInfo`` is ``null``.
    """
    action: dict[str, Any] = {
        "actionType": action_type,
        "customFields": dict(custom_fields or {}),
        "createdAt": db_time(created_at),
        "testing": testing,
    }
    if donation is not None:
        action["donation"] = donation.wire()
    personal_info = _personal(contact, encryption)
    return {
        "schema": "proca:action:2",
        "stage": stage,
        "actionId": action_id,
        "action": action,
        "actionPageId": page.id,
        "actionPage": page.wire(),
        "campaignId": campaign.id,
        "campaign": campaign.wire(),
        "orgId": org.id,
        "org": org.wire(),
        "contact": _contact_v2(contact, personal_info),
        "personalInfo": personal_info,
        "privacy": privacy.wire(),
        "tracking": None if tracking is None else tracking.wire(),
    }


def build_action_v1(
    *,
    stage: StageName = "deliver",
    action_id: int,
    action_type: str,
    created_at: datetime,
    page: PageInfo,
    campaign: CampaignInfo,
    org: OrgInfo,
    contact: ContactData,
    privacy: PrivacyData,
    custom_fields: Mapping[str, CustomValue] | None = None,
    testing: bool = False,
    donation: DonationData | None = None,
    tracking: TrackingData | None = None,
    encryption: Encryption | None = None,
) -> dict[str, Any]:
    """A deprecated ``proca:action:1`` message (messages.md §4), same inputs as v2.

    The contact variant follows the inputs: encrypted (``encryption`` and a record),
    clear (a record, ``payload`` is its JSON text) or "no contact" (``payload: ""``).
    """
    action: dict[str, Any] = {
        "actionType": action_type,
        "fields": dict(custom_fields or {}),
        "createdAt": db_time(created_at),
        "testing": testing,
    }
    if donation is not None:
        action["donation"] = donation.wire()
    v1_contact: dict[str, Any] = {
        "ref": contact.contact_ref,
        "firstName": contact.first_name,
        "email": contact.email,
    }
    personal_info = _personal(contact, encryption)
    if personal_info is not None:
        v1_contact["payload"] = personal_info["payload"]
        v1_contact["nonce"] = personal_info["nonce"]
        v1_contact["publicKey"] = personal_info["encryptKey"]["public"]
        v1_contact["signKey"] = personal_info["signKey"]["public"]
    else:
        v1_contact["area"] = contact.area
        v1_contact["payload"] = (
            orjson.dumps(dict(contact.record)).decode() if contact.record else ""
        )
    consent = privacy.consent
    v1_privacy = (
        {"communication": consent.opt_in, "givenAt": db_time(consent.given_at)}
        if consent is not None and privacy.with_consent
        else None
    )
    return {
        "schema": "proca:action:1",
        "stage": stage,
        "actionId": action_id,
        "action": action,
        "actionPageId": page.id,
        "actionPage": {
            "locale": page.locale,
            "name": page.name,
            "thankYouTemplate": page.thank_you_template,
            "thankYouTemplateRef": page.thank_you_template_ref,
        },
        "campaignId": campaign.id,
        "campaign": {
            "name": campaign.name,
            "title": campaign.title,
            "externalId": campaign.external_id,
        },
        "orgId": org.id,
        "org": org.wire(),
        "contact": v1_contact,
        "privacy": v1_privacy,
        "tracking": None if tracking is None else tracking.wire(),
    }


def build_email_status_event(
    *,
    timestamp: datetime,
    contact: ContactData,
    privacy: PrivacyData,
    encryption: Encryption | None = None,
    action_id: int | None = None,
    action_type: str = "register",
    created_at: datetime | None = None,
    custom_fields: Mapping[str, CustomValue] | None = None,
    testing: bool = False,
    page: PageInfo | None = None,
    campaign: CampaignInfo | None = None,
    tracking: TrackingData | None = None,
) -> dict[str, Any]:
    """An ``email_status`` event (messages.md §6.1) for one receiving org.

    ``privacy`` carries the new status; ``withConsent`` is always ``false``. Custom field
    keys are camelCased like the server does in events; there is no ``orgId``/``org``/
    ``stage``. With ``action_id=None`` the older, supporter-only shape is produced.
    """
    personal_info = _personal(contact, encryption)
    out: dict[str, Any] = {
        "schema": "proca:event:2",
        "eventType": "email_status",
        "timestamp": db_time(timestamp),
        "supporter": {
            "contact": _contact_v2(contact, personal_info),
            "privacy": privacy.wire(with_consent=False),
            "personalInfo": personal_info,
        },
    }
    if action_id is None:
        return out
    if page is None or campaign is None or created_at is None:
        raise ValueError("an email_status event with an action needs page, campaign, created_at")
    out["actionId"] = action_id
    out["action"] = {
        "actionType": action_type,
        "customFields": {camelize(k): v for k, v in (custom_fields or {}).items()},
        "createdAt": db_time(created_at),
        "testing": testing,
    }
    out["actionPageId"] = page.id
    out["actionPage"] = page.wire()
    out["campaignId"] = campaign.id
    out["campaign"] = campaign.wire()
    out["tracking"] = None if tracking is None else tracking.wire()
    return out


def build_campaign_updated(
    *,
    timestamp: datetime,
    campaign: CampaignInfo,
    org: OrgInfo,
    config: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """A ``campaign_updated`` event (messages.md §6.2); ``config`` keys pass verbatim."""
    detail = campaign.wire()
    return {
        "schema": "proca:event:2",
        "eventType": "campaign_updated",
        "timestamp": db_time(timestamp),
        "campaignId": campaign.id,
        "orgId": org.id,
        "campaign": {
            "id": campaign.id,
            **detail,
            "config": dict(config or {}),
            "org": org.wire(),
        },
    }


_TWITTER_KEYS = ("name", "screenName", "picture", "description", "url", "followersCount")


def build_confirm_created(
    *,
    timestamp: datetime,
    operation: str,
    code: str,
    subject_id: int,
    base_url: str,
    object_id: int | None = None,
    email: str | None = None,
    message: str = "",
    creator: Mapping[str, Any] | None = None,
    campaign: CampaignInfo | None = None,
    org: OrgInfo | None = None,
    twitter: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """A ``confirm_created`` event (messages.md §6.3).

    ``campaign`` is kept only for ``launch_page``; ``org`` for ``launch_page`` (with a
    ``twitter`` block whose missing values are ``null``) and ``add_staffer``.
    """
    query = ""
    if email:
        query = f"?email={quote(email, safe='@')}"
    elif object_id is not None:
        query = f"?id={object_id}"
    base = base_url.rstrip("/")
    confirm: dict[str, Any] = {
        "operation": operation,
        "code": code,
        "email": email or "",
        "message": message,
        "subjectId": subject_id,
        "objectId": "" if object_id is None else object_id,
        "creator": dict(creator or {}),
        "acceptLink": f"{base}/link/accept/{code}{query}",
        "rejectLink": f"{base}/link/reject/{code}{query}",
    }
    if operation == "launch_page" and campaign is not None:
        confirm["campaign"] = {"name": campaign.name, "title": campaign.title}
    if operation in ("launch_page", "add_staffer") and org is not None:
        confirm["org"] = org.wire()
        if operation == "launch_page":
            given = twitter or {}
            confirm["org"]["twitter"] = {key: given.get(key) for key in _TWITTER_KEYS}
    return {
        "schema": "proca:event:2",
        "eventType": "confirm_created",
        "timestamp": db_time(timestamp),
        "confirm": confirm,
    }


def build_system_message(
    *,
    event_type: SystemEvent,
    user_email: str,
    created_at: datetime,
    org: OrgInfo | None = None,
    campaign: CampaignInfo | None = None,
    page: PageInfo | None = None,
) -> dict[str, Any]:
    """A system "action-like" message (messages.md §6.5), stage ``system``.

    ``org`` is the joining org (``join_campaign``) or the new org (``new_org``), ``None``
    for ``new_user``; ``campaign``/``page`` only for ``join_campaign``.
    """
    with_campaign = event_type == "join_campaign"
    with_org = event_type != "new_user"
    return {
        "schema": "proca:action:2",
        "stage": "system",
        "eventType": event_type,
        "actionId": None,
        "action": {
            "actionType": event_type,
            "customFields": {},
            "createdAt": clock_time(created_at),
            "testing": False,
        },
        "actionPageId": page.id if with_campaign and page else None,
        "actionPage": page.wire() if with_campaign and page else None,
        "campaignId": campaign.id if with_campaign and campaign else None,
        "campaign": campaign.wire() if with_campaign and campaign else None,
        "orgId": org.id if with_org and org else None,
        "org": org.wire() if with_org and org else None,
        "contact": {
            "firstName": user_email.split("@", 1)[0],
            "email": user_email,
            "contactRef": None,
            "dupeRank": 0,
            "area": None,
        },
        "personalInfo": None,
        "privacy": {},
        "tracking": {},
    }


# ---- publishing -------------------------------------------------------------------------


class Publisher:
    """Publishes like the Proca server: persistent, ``mandatory``, no content type.

    Needs a channel with publisher confirms: :meth:`publish` returns once the broker has
    taken the message (raises :class:`aio_pika.exceptions.DeliveryError` on a nack).
    The one exchange name ``""`` is the default exchange (operator re-sends).
    One difference from the server remains: aiormq gives every message a random
    ``message_id`` (it matches broker returns with it).
    """

    def __init__(self, channel: AbstractChannel) -> None:
        if not channel.publisher_confirms:
            raise ValueError("Publisher needs a channel opened with publisher_confirms=True")
        self._channel = channel
        self._exchanges: dict[str, AbstractExchange] = {}
        self.unroutable = 0

    @classmethod
    async def open(cls, connection: AbstractConnection) -> Publisher:
        return cls(await connection.channel(publisher_confirms=True))

    @property
    def channel(self) -> AbstractChannel:
        return self._channel

    async def _exchange(self, name: str) -> AbstractExchange:
        if name == "":
            return self._channel.default_exchange
        exchange = self._exchanges.get(name)
        if exchange is None:
            exchange = await self._channel.get_exchange(name, ensure=False)
            self._exchanges[name] = exchange
        return exchange

    async def publish(self, exchange: str, routing_key: str, body: bytes) -> bool:
        """Publish one body; ``False`` if the broker returned it as unroutable.

        Like the server, an unroutable message is not an error (it is lost); the count is
        kept in :attr:`unroutable`.
        """
        message = aio_pika.Message(body, delivery_mode=aio_pika.DeliveryMode.PERSISTENT)
        target = await self._exchange(exchange)
        result = await target.publish(message, routing_key, mandatory=True)
        if isinstance(result, aiormq.abc.DeliveredMessage):
            self.unroutable += 1
            return False
        return True

    async def publish_json(self, route: Route, document: Mapping[str, Any]) -> bool:
        """Serialise with orjson and :meth:`publish` to ``route``."""
        return await self.publish(route.exchange, route.routing_key, orjson.dumps(dict(document)))
