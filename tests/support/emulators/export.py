"""Reading a ``crm export`` document the way the pusher hands it to a connector, so that a
driver's ``expected()`` applies the same rules (subscription tri-state, testing filter)
as the connector it describes."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from proca_sync.destinations.base import ActionView, ContactView


def contact_view(contact: dict[str, Any], contact_id: int = 0) -> ContactView:
    """The :class:`ContactView` the pusher would build for one exported contact."""
    actions = contact.get("actions") or []
    return ContactView(
        contact_id=contact_id,
        version=0,
        email=(contact.get("email") or "").strip().lower(),
        first_name=contact.get("firstName"),
        last_name=contact.get("lastName"),
        postcode=contact.get("postcode"),
        country=contact.get("country"),
        fields=contact.get("fields") or {},
        refs=tuple(contact.get("contactRefs") or ()),
        subscribed=bool(contact.get("subscribed")),
        opted_in=bool(contact.get("optIn")),
        opt_in_at=contact.get("optInAt"),
        email_status=contact.get("emailStatus"),
        email_status_changed=contact.get("emailStatusChanged"),
        testing=bool(contact.get("testing")),
        campaigns=tuple(sorted({a["campaign"] for a in actions if a.get("campaign")})),
        updated_at="",
    )


def pushed(
    export: dict[str, Any], config: dict[str, Any]
) -> Iterator[tuple[ContactView, list[ActionView]]]:
    """The contacts (with their actions) a destination receives: admitted contacts with an
    e-mail, testing ones only when ``include_testing`` is set."""
    include_testing = bool(config.get("include_testing", False))
    for n, contact in enumerate(export.get("contacts", []), start=1):
        if not contact.get("email"):
            continue
        view = contact_view(contact, n)
        if view.testing and not include_testing:
            continue
        actions = [
            ActionView(
                action_id=int(a["actionId"]),
                contact_id=n,
                action_type=a.get("actionType") or "",
                campaign=a.get("campaign") or "",
                created_at=a.get("createdAt") or "",
                testing=bool(a.get("testing")),
                data={},
            )
            for a in contact.get("actions") or []
            if include_testing or not a.get("testing")
        ]
        yield view, actions


def contact(
    contact_id: int,
    email: str,
    *,
    subscribed: bool = True,
    email_status: str | None = None,
    first_name: str | None = "Ada",
    last_name: str | None = "Lovelace",
    postcode: str | None = "1000",
    country: str | None = "BE",
    campaigns: tuple[str, ...] = ("save-bees",),
    testing: bool = False,
    fields: dict[str, Any] | None = None,
) -> ContactView:
    """A merged contact as the pusher hands it (for tests that push batches directly)."""
    return ContactView(
        contact_id=contact_id,
        version=1,
        email=email,
        first_name=first_name,
        last_name=last_name,
        postcode=postcode,
        country=country,
        fields=fields or {},
        refs=(f"ref{contact_id}",),
        subscribed=subscribed,
        opted_in=subscribed,
        opt_in_at=None,
        email_status=email_status,
        email_status_changed=None,
        testing=testing,
        campaigns=campaigns,
        updated_at="2026-12-01T10:00:00Z",
    )


def action(
    action_id: int,
    contact_id: int,
    *,
    campaign: str = "save-bees",
    action_type: str = "petition",
    testing: bool = False,
) -> ActionView:
    return ActionView(
        action_id=action_id,
        contact_id=contact_id,
        action_type=action_type,
        campaign=campaign,
        created_at="2026-12-01T10:00:00Z",
        testing=testing,
        data={"customFields": {"comment": "hi"}},
    )
