"""What the intake accepts (Proca's ``addActionContact`` / ``addAction`` inputs) and how a
submission becomes supporter, contact and action rows (processing.md §1, §6).

The pydantic models are the HTTP boundary; :func:`add_action_contact` and
:func:`add_action` store inside the caller's transaction and run the state machine at
once, so the action's first messages are in the outbox when the transaction commits.
Validation problems are :class:`IntakeProblem` values naming the field — never its value.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import datetime
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StringConstraints
from sqlalchemy import Connection, insert

from proca_sync.pipeline.processing import Processor, Row, recipients
from proca_sync.pipeline.state import (
    ActionStatus,
    SupporterStatus,
    actions,
    contacts,
    supporters,
)

__all__ = [
    "ActionContactIn",
    "ActionIn",
    "AddActionIn",
    "ContactIn",
    "IntakeProblem",
    "Stored",
    "add_action",
    "add_action_contact",
]

Word = Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9_-]+$", max_length=64)]
Short = Annotated[str, StringConstraints(max_length=255)]
CustomValue = bool | int | float | Short | list[Short] | list[int | float]
_EMAIL = re.compile(r"^[^@\s]+@[^@\s]+\.[^@\s]+$")
_COUNTRY = re.compile(r"^[A-Za-z]{2}$")


INSERT_SUPPORTER = insert(supporters)
INSERT_CONTACT = insert(contacts)
INSERT_ACTION = insert(actions)


class _In(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class DonationIn(_In):
    amount: int = Field(gt=0, le=10**12)
    currency: Annotated[str, StringConstraints(pattern=r"^[A-Za-z]{3}$")] = "EUR"
    frequencyUnit: Literal["one_off", "weekly", "monthly", "daily"] = "one_off"
    payload: dict[str, Any] = Field(default_factory=dict)


class ActionIn(_In):
    actionType: Word
    customFields: dict[Word, CustomValue] = Field(default_factory=dict, max_length=100)
    donation: DonationIn | None = None
    testing: bool = False


class AddressIn(_In):
    country: Short | None = None
    postcode: Short | None = None
    locality: Short | None = None
    region: Short | None = None
    street: Short | None = None
    streetNumber: Short | None = None


class ContactIn(_In):
    name: Short | None = None
    firstName: Short | None = None
    lastName: Short | None = None
    email: Short | None = None
    phone: Short | None = None
    birthDate: Short | None = None
    address: AddressIn | None = None


class ConsentIn(_In):
    optIn: bool | None = None
    leadOptIn: bool | None = None


class TrackingIn(_In):
    source: Short
    medium: Short
    campaign: Short
    content: Short = ""
    location: Short = ""


class ActionContactIn(_In):
    """``addActionContact``: an action with the supporter's contact data and consent."""

    actionPageId: int = Field(gt=0, lt=2**53)
    action: ActionIn
    contact: ContactIn
    privacy: ConsentIn
    tracking: TrackingIn | None = None


class AddActionIn(_In):
    """``addAction``: a follow-up action (share, …) of a known ``contactRef``."""

    actionPageId: int = Field(gt=0, lt=2**53)
    action: ActionIn
    tracking: TrackingIn | None = None


class IntakeProblem(Exception):
    """A submission that cannot be stored: ``field`` names the input, never its value."""

    def __init__(self, field: str, message: str, status: int = 422) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message
        self.status = status


@dataclass(frozen=True)
class Stored:
    action_id: int
    contact_ref: str
    outbox_rows: int


def basic_record(contact: ContactIn) -> dict[str, Any]:
    """The ``basic`` personal-data record (messages.md §3.1), null keys omitted."""
    first, last = contact.firstName, contact.lastName
    if first is None and contact.name:
        parts = contact.name.strip().split(None, 1)
        first = parts[0] if parts else None
        last = parts[1] if len(parts) > 1 else last
    if not first or not first.strip():
        raise IntakeProblem("contact.firstName", "a first name (or name) is required")
    if not contact.email:
        raise IntakeProblem("contact.email", "an e-mail address is required")
    email = contact.email.strip().lower()
    if not _EMAIL.fullmatch(email):
        raise IntakeProblem("contact.email", "not a valid e-mail address")
    record: dict[str, Any] = {"firstName": first.strip()}
    if last and last.strip():
        record["lastName"] = last.strip()
    record["email"] = email
    if contact.phone:
        record["phone"] = contact.phone
    address = contact.address
    if address is not None:
        if address.country:
            if not _COUNTRY.fullmatch(address.country):
                raise IntakeProblem("contact.address.country", "not an ISO 3166-1 alpha-2 code")
            record["country"] = address.country.upper()
        if address.postcode:
            record["postcode"] = address.postcode.upper()
        if "country" in record:
            record["area"] = record["country"]
        lines = (address.region, address.locality, address.street, address.streetNumber)
        if any(line is not None for line in lines):
            record["address"] = {
                "region": address.region,
                "locality": address.locality,
                "street": address.street,
                "streetNumber": address.streetNumber,
            }
    return record


def _page(conn: Connection, processor: Processor, page_id: int) -> tuple[Row, Row]:
    page = processor.catalog.page(conn, page_id)
    if page is None:
        raise IntakeProblem("actionPageId", "no such action page")
    return page, processor.catalog.campaigns[int(page["campaign_id"])]


def _action_values(action: ActionIn, tracking: TrackingIn | None) -> dict[str, Any]:
    donation = None
    if action.donation is not None:
        donation = {
            "amount": action.donation.amount,
            "currency": action.donation.currency.upper(),
            "frequencyUnit": action.donation.frequencyUnit,
            "payload": action.donation.payload,
        }
    return {
        "action_type": action.actionType,
        "custom_fields": dict(action.customFields),
        "donation": donation,
        "tracking": None if tracking is None else tracking.model_dump(),
        "testing": action.testing,
    }


def add_action_contact(
    conn: Connection, processor: Processor, submission: ActionContactIn, now: datetime
) -> Stored:
    """Store a petition-form submission and process it (in the caller's transaction)."""
    page, campaign = _page(conn, processor, submission.actionPageId)
    if campaign["contact_schema"] != "basic":
        raise IntakeProblem("actionPageId", "this intake only takes the basic contact schema")
    record = basic_record(submission.contact)
    ref = processor.contact_ref(str(record["email"]))
    owner_org = int(page["org_id"])
    high_security = bool(processor.catalog.orgs[owner_org]["high_security"])
    supporter: Row = {
        "contact_ref": ref,
        "campaign_id": campaign["id"],
        "page_id": page["id"],
        "org_id": owner_org,
        "status": str(SupporterStatus.NEW),
        "email_status": None,
        "email_status_changed": None,
        "dupe_rank": None,
        "first_name": None if high_security else record["firstName"],
        "email": None if high_security else record["email"],
        "area": record.get("area"),
        "created_at": now,
    }
    supporter["id"] = int(
        conn.execute(INSERT_SUPPORTER, supporter).inserted_primary_key[0]  # type: ignore[index]
    )
    rows: list[Row] = []
    for recipient in recipients(
        page_org=owner_org,
        lead_org=int(campaign["org_id"]),
        page_delivery=bool(page["delivery"]),
        force_delivery=bool(campaign["force_delivery"]),
        opt_in=submission.privacy.optIn,
        lead_opt_in=submission.privacy.leadOptIn,
    ):
        sealed = processor.seal_for(conn, recipient.org_id, record)
        rows.append(
            {
                "supporter_id": supporter["id"],
                "org_id": recipient.org_id,
                "record": None if sealed is not None else record,
                "personal_info": sealed,
                "opt_in": recipient.opt_in,
                "delivery": recipient.delivery,
                "created_at": now,
            }
        )
    conn.execute(INSERT_CONTACT, rows)
    action: Row = {
        **_action_values(submission.action, submission.tracking),
        "with_consent": True,
        "contact_ref": ref,
        "supporter_id": supporter["id"],
        "page_id": page["id"],
        "campaign_id": campaign["id"],
        "status": str(ActionStatus.NEW),
        "created_at": now,
    }
    action["id"] = int(
        conn.execute(INSERT_ACTION, action).inserted_primary_key[0]  # type: ignore[index]
    )
    ctx = processor.context(conn, action, supporter)
    ctx.contacts = rows
    written = processor.process(conn, action["id"], now, ctx=ctx)
    for waiting in processor.link_waiting(conn, supporter["id"], ref, owner_org):
        written += processor.process(conn, waiting, now)
    return Stored(action["id"], ref, written)


def add_action(
    conn: Connection, processor: Processor, ref: str, submission: AddActionIn, now: datetime
) -> Stored:
    """Store a follow-up action of ``ref``; it waits unlinked when no supporter exists yet."""
    page, campaign = _page(conn, processor, submission.actionPageId)
    supporter_id = processor.latest_supporter(conn, ref, int(page["org_id"]))
    action_id = conn.execute(
        insert(actions).values(
            **_action_values(submission.action, submission.tracking),
            with_consent=False,
            contact_ref=ref,
            supporter_id=supporter_id,
            page_id=page["id"],
            campaign_id=campaign["id"],
            status=str(ActionStatus.NEW),
            created_at=now,
        )
    ).inserted_primary_key[0]  # type: ignore[index]
    if supporter_id is None:
        processor.note_unlinked()
    written = processor.process(conn, int(action_id), now)
    return Stored(int(action_id), ref, written)
