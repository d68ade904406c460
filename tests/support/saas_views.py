"""Builders of the views a destination is handed (``ContactView``, ``ActionView``…), for
the connector tests that push a :class:`Batch` straight into an emulator."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

from proca_sync.destinations.base import (
    ActionView,
    Batch,
    CampaignView,
    ContactView,
    Destination,
    Erasure,
    PushReport,
)
from proca_sync.sync.consent import NEGATIVE_STATUSES


def contact(
    cid: int,
    email: str,
    *,
    version: int = 1,
    first: str | None = "Ada",
    last: str | None = "Lovelace",
    postcode: str | None = "1000",
    country: str | None = "BE",
    phone: str | None = None,
    subscribed: bool = False,
    opted_in: bool | None = None,
    status: str | None = None,
    testing: bool = False,
    campaigns: tuple[str, ...] = ("save_bees",),
) -> ContactView:
    return ContactView(
        contact_id=cid,
        version=version,
        email=email,
        first_name=first,
        last_name=last,
        postcode=postcode,
        country=country,
        fields={"phone": phone} if phone else {},
        refs=(f"ref{cid}",),
        subscribed=subscribed,
        opted_in=subscribed if opted_in is None else opted_in,
        opt_in_at=None,
        email_status=status,
        email_status_changed=None,
        testing=testing,
        campaigns=campaigns,
        updated_at="2024-03-01T10:00:00Z",
    )


def action(
    aid: int,
    cid: int,
    *,
    action_type: str = "register",
    campaign: str = "save_bees",
    created: str = "2024-03-01T10:00:00Z",
    testing: bool = False,
) -> ActionView:
    return ActionView(
        action_id=aid,
        contact_id=cid,
        action_type=action_type,
        campaign=campaign,
        created_at=created,
        testing=testing,
        data={"actionPage": {"name": "example.org/bees/en"}, "customFields": {}},
    )


CAMPAIGNS = {
    "save_bees": CampaignView(name="save_bees", title="Save the bees", external_id=None),
    "stop_oil": CampaignView(name="stop_oil", title="Stop oil", external_id=7),
}


def batch(
    contacts: list[ContactView],
    actions: list[ActionView] | None = None,
    erasures: list[Erasure] | None = None,
) -> Batch:
    return Batch(
        contacts=contacts, actions=actions or [], erasures=erasures or [], campaigns=CAMPAIGNS
    )


async def push_until_done(
    destination: Destination,
    the_batch: Batch,
    *,
    deadline: float = 60.0,
    on_round: Callable[[int, PushReport | None], Any] | None = None,
) -> list[PushReport | None]:
    """Push, then push again what failed transiently (as the pusher does), until nothing
    fails or ``deadline`` seconds pass; returns each round's report (None: it raised)."""
    from proca_sync.destinations.base import DestinationRejectedError
    from proca_sync.errors import TransientError

    reports: list[PushReport | None] = []
    pending = the_batch
    end = time.monotonic() + deadline
    while time.monotonic() < end:
        try:
            report: PushReport | None = await destination.push(pending)
        except TransientError:
            report = None
        reports.append(report)
        if on_round is not None:
            on_round(len(reports), report)
        if report is not None:
            retry = {
                k for k, e in report.failed.items() if not isinstance(e, DestinationRejectedError)
            }
            if not retry:
                return reports
            pending = Batch(
                contacts=[
                    c
                    for c in pending.contacts
                    if c.key in retry
                    or any(a.contact_id == c.contact_id and a.key in retry for a in pending.actions)
                ],
                actions=[a for a in pending.actions if a.key in retry],
                erasures=[e for e in pending.erasures if e.key in retry],
                campaigns=pending.campaigns,
            )
        await asyncio.sleep(0.05)  # sleep-ok: the pusher's pause between rounds
    raise AssertionError("the push did not complete before the deadline")


def subscription_of(contact: dict[str, Any]) -> str:
    """``ContactView.subscription`` computed from a ``crm export`` contact."""
    if contact.get("subscribed"):
        return "subscribed"
    status = contact.get("emailStatus")
    if status in NEGATIVE_STATUSES or status not in {None, "active", "double_opt_in"}:
        return "unsubscribed"
    return "not_opted_in"
