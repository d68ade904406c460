"""Pydantic models of every Proca wire message (spec: messages.md).

The models keep the wire's camelCase names as aliases, preserve unknown keys
(``extra="allow"``) and keep timestamps as the exact strings the server sent (checked,
not reformatted), so that :func:`to_wire` re-encodes a decoded message to the same JSON.
Personal fields are hidden from ``repr``: a model printed in a traceback shows ids only.
"""

from __future__ import annotations

from datetime import UTC, datetime
from enum import StrEnum
from typing import Annotated, Any, Final, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, Strict, model_validator
from pydantic.alias_generators import to_camel
from pydantic_core import PydanticCustomError

__all__ = [
    "ACTION_V1",
    "ACTION_V2",
    "EVENT_V2",
    "Action",
    "ActionMessage",
    "ActionMessageV1",
    "ActionPage",
    "Campaign",
    "CampaignUpdatedEvent",
    "ConfirmCreatedEvent",
    "Contact",
    "Donation",
    "EmailStatusEvent",
    "EventMessage",
    "KeyRef",
    "Message",
    "Org",
    "PersonalInfo",
    "Privacy",
    "Stage",
    "Supporter",
    "Timestamp",
    "Tracking",
    "UnknownEvent",
    "parse_timestamp",
    "to_wire",
]

ACTION_V1: Final = "proca:action:1"
ACTION_V2: Final = "proca:action:2"
EVENT_V2: Final = "proca:event:2"


def parse_timestamp(value: str) -> datetime:
    """Parse a wire timestamp (ISO 8601, ``Z`` or offset, with or without microseconds)."""
    parsed = datetime.fromisoformat(value.replace("Z", "+00:00").replace("z", "+00:00"))
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=UTC)
    return parsed.astimezone(UTC)


def _check_timestamp(value: str) -> str:
    try:
        parse_timestamp(value)
    except (ValueError, OverflowError):  # Overflow: year 1 / 9999 shifted out of range by UTC
        raise PydanticCustomError("timestamp", "not an ISO 8601 timestamp") from None
    return value


Timestamp = Annotated[str, AfterValidator(_check_timestamp)]
"""A wire timestamp kept verbatim; use :func:`parse_timestamp` to compare."""

# JSON types as sent: "123" is not an id and "yes" is not a boolean.
Id = Annotated[int, Strict()]
Flag = Annotated[bool, Strict()]


class Wire(BaseModel):
    """Base of all wire models: camelCase aliases, unknown keys kept."""

    model_config = ConfigDict(
        extra="allow",
        alias_generator=to_camel,
        populate_by_name=True,
        serialize_by_alias=True,
    )


class Stage(StrEnum):
    DELIVER = "deliver"
    SUPPORTER_CONFIRM = "supporter_confirm"
    ACTION_CONFIRM = "action_confirm"
    SYSTEM = "system"


CustomValue = str | bool | int | float | list[str] | list[int | float] | None


class Donation(Wire):
    amount: Id
    currency: str = "EUR"
    frequency_unit: str = "one_off"
    payload: dict[str, Any] = Field(default_factory=dict)
    schema_: str | None = Field(default=None, alias="schema")


class Action(Wire):
    action_type: str
    custom_fields: dict[str, CustomValue] = Field(default_factory=dict)
    created_at: Timestamp
    testing: Flag = False
    donation: Donation | None = None


class ActionPage(Wire):
    name: str
    locale: str | None = None
    thank_you_template: str | None = None
    thank_you_template_ref: str | None = None
    supporter_confirm_template: str | None = None


class Campaign(Wire):
    name: str
    title: str | None = None
    external_id: Id | None = None
    contact_schema: str = "basic"


class Org(Wire):
    name: str | None = None
    title: str | None = None


class Contact(Wire):
    """Layer 1 of the contact plus, for clear-text data, the whole personal record.

    Every key of the personal-data record (``lastName``, ``postcode``, ``address``, …)
    is kept as an extra field. ``repr`` shows the reference only.
    """

    contact_ref: str | None = None
    dupe_rank: Id | None = None
    first_name: str | None = Field(default=None, repr=False)
    email: str | None = Field(default=None, repr=False)
    area: str | None = None

    def __repr_args__(self) -> Any:
        return [("contact_ref", self.contact_ref)]

    def record(self) -> dict[str, Any]:
        """The contact as a plain dict with wire keys (personal data included)."""
        return self.model_dump(mode="json", exclude_unset=True)


class KeyRef(Wire):
    id: Id | None = None
    public: str


class PersonalInfo(Wire):
    """Encrypted personal data. Fields may be missing: crypto reports that, not decoding."""

    payload: str | None = None
    nonce: str | None = None
    encrypt_key: KeyRef | None = None
    sign_key: KeyRef | None = None


class Privacy(Wire):
    opt_in: Flag | None = None
    given_at: Timestamp | None = None
    with_consent: Flag = False
    email_status: str | None = None
    email_status_changed: Timestamp | None = None


class Tracking(Wire):
    source: str | None = None
    medium: str | None = None
    campaign: str | None = None
    content: str | None = None
    location: str | None = None


def _missing(field: str) -> PydanticCustomError:
    return PydanticCustomError("missing", "field required: {field}", {"field": field})


class ActionMessage(Wire):
    """An action message ``proca:action:2`` (also the result of upgrading v1)."""

    schema_: Literal["proca:action:2"] = Field(default=ACTION_V2, alias="schema")
    stage: Stage
    action_id: Id | None = None
    action: Action
    action_page_id: Id | None = None
    action_page: ActionPage | None = None
    campaign_id: Id | None = None
    campaign: Campaign | None = None
    org_id: Id | None = None
    org: Org | None = None
    contact: Contact = Field(default_factory=Contact)
    personal_info: PersonalInfo | None = None
    privacy: Privacy = Field(default_factory=Privacy)
    tracking: Tracking | None = None
    event_type: str | None = None

    @model_validator(mode="after")
    def _supporter_action_has_ids(self) -> ActionMessage:
        if self.stage is Stage.SYSTEM:
            return self
        if self.action_id is None:
            raise _missing("actionId")
        if self.campaign is None:
            raise _missing("campaign")
        if self.contact.contact_ref is None and self.contact.email is None:
            raise _missing("contact.contactRef")
        return self


class Supporter(Wire):
    contact: Contact
    privacy: Privacy = Field(default_factory=Privacy)
    personal_info: PersonalInfo | None = None


class EventMessage(Wire):
    schema_: Literal["proca:event:2"] = Field(default=EVENT_V2, alias="schema")
    event_type: str
    timestamp: Timestamp | None = None


class EmailStatusEvent(EventMessage):
    event_type: Literal["email_status"] = "email_status"
    timestamp: Timestamp
    supporter: Supporter
    action_id: Id | None = None
    action: Action | None = None
    action_page_id: Id | None = None
    action_page: ActionPage | None = None
    campaign_id: Id | None = None
    campaign: Campaign | None = None
    tracking: Tracking | None = None


class CampaignDetail(Campaign):
    id: Id | None = None
    config: dict[str, Any] = Field(default_factory=dict)
    org: Org | None = None


class CampaignUpdatedEvent(EventMessage):
    event_type: Literal["campaign_updated"] = "campaign_updated"
    campaign_id: Id | None = None
    org_id: Id | None = None
    campaign: CampaignDetail


class ConfirmCreatedEvent(EventMessage):
    event_type: Literal["confirm_created"] = "confirm_created"
    confirm: dict[str, Any] = Field(default_factory=dict, repr=False)


class UnknownEvent(EventMessage):
    """An event type this version does not know: kept whole, acknowledged, never a crash."""


# ---- legacy v1 (messages.md §4) -------------------------------------------------------


class ActionV1(Wire):
    action_type: str
    fields: dict[str, CustomValue] = Field(default_factory=dict)
    created_at: Timestamp
    testing: Flag = False
    donation: Donation | None = None


class ContactV1(Wire):
    ref: str | None = None
    first_name: str | None = Field(default=None, repr=False)
    email: str | None = Field(default=None, repr=False)
    area: str | None = None
    payload: str | None = Field(default=None, repr=False)
    nonce: str | None = None
    public_key: str | None = None
    sign_key: str | None = None

    def __repr_args__(self) -> Any:
        return [("ref", self.ref)]


class PrivacyV1(Wire):
    communication: Flag | None = None
    given_at: Timestamp | None = None


class ActionMessageV1(Wire):
    schema_: Literal["proca:action:1"] = Field(default=ACTION_V1, alias="schema")
    stage: Stage
    action_id: Id
    action: ActionV1
    action_page_id: Id | None = None
    action_page: ActionPage | None = None
    campaign_id: Id | None = None
    campaign: Campaign
    org_id: Id | None = None
    org: Org | None = None
    contact: ContactV1
    privacy: PrivacyV1 | None = None
    tracking: Tracking | None = None


Message = (
    ActionMessage | EmailStatusEvent | CampaignUpdatedEvent | ConfirmCreatedEvent | UnknownEvent
)


def to_wire(message: BaseModel) -> dict[str, Any]:
    """The JSON-ready dict of a decoded message: the keys it arrived with, wire names."""
    return message.model_dump(mode="json", by_alias=True, exclude_unset=True)
