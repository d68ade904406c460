"""Drive a pipeline's HTTP intake with simulated traffic (``simulate --via-intake``).

The simulator's supporter journeys (:func:`~proca_sync.pipeline.simulate.plan_traffic`)
are turned back into what a widget would have submitted: consent-bearing actions become
``POST /api/actions`` (``addActionContact``), follow-up actions become
``POST /api/actions/{contactRef}`` with the ref the intake answered for that person.
Events, v1 messages and poison have no intake form and are skipped (counted). All
submissions go to one action page; nothing personal is printed.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import orjson

from proca_sync.pipeline.simulate import Kind, Planned

__all__ = ["IntakeItem", "IntakeReport", "intake_items", "post_traffic"]

_CONTACT_KINDS = {
    Kind.ACTION,
    Kind.DUPLICATE,
    Kind.DONATION,
    Kind.TESTING,
    Kind.PARTNER,
    Kind.SUPPORTER_CONFIRM,
}


@dataclass(frozen=True)
class IntakeItem:
    kind: str
    person: str  # the simulator's contactRef: links follow-ups to their supporter
    body: dict[str, Any] = field(repr=False)
    follow_up: bool = False


@dataclass
class IntakeReport:
    counts: Counter[str] = field(default_factory=Counter)
    statuses: Counter[int] = field(default_factory=Counter)
    skipped: int = 0


def _contact(contact: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {
        key: contact[key]
        for key in ("firstName", "lastName", "email", "phone")
        if contact.get(key) is not None
    }
    address = dict(contact.get("address") or {})
    for key in ("country", "postcode"):
        if contact.get(key) is not None:
            address[key] = contact[key]
    if address:
        out["address"] = address
    return out


def intake_items(planned: Iterable[Planned], page: int) -> tuple[list[IntakeItem], int]:
    """What to submit for ``planned`` (clear-text traffic), and how many were skipped."""
    items: list[IntakeItem] = []
    skipped = 0
    for plan in planned:
        try:
            message = orjson.loads(plan.body)
        except orjson.JSONDecodeError:
            skipped += 1
            continue
        follow_up = plan.kind == Kind.FOLLOW_UP
        if not isinstance(message, dict) or (plan.kind not in _CONTACT_KINDS and not follow_up):
            skipped += 1
            continue
        if message.get("personalInfo") is not None:
            skipped += 1  # encrypted: the record is not at hand
            continue
        source = message["action"]
        action: dict[str, Any] = {
            "actionType": source["actionType"],
            "customFields": {k: v for k, v in source["customFields"].items() if v is not None},
            "testing": bool(source.get("testing")),
        }
        if "donation" in source:
            donation = source["donation"]
            action["donation"] = {
                k: donation[k] for k in ("amount", "currency", "frequencyUnit", "payload")
            }
        body: dict[str, Any] = {"actionPageId": page, "action": action}
        if message.get("tracking"):
            body["tracking"] = message["tracking"]
        if not follow_up:
            contact = _contact(message["contact"])
            if "email" not in contact or "firstName" not in contact:
                skipped += 1
                continue
            body["contact"] = contact
            body["privacy"] = {"optIn": message["privacy"].get("optIn")}
        items.append(
            IntakeItem(str(plan.kind), str(message["contact"]["contactRef"]), body, follow_up)
        )
    return items, skipped


async def post_traffic(
    base_url: str,
    items: list[IntakeItem],
    *,
    rate: float | None = None,
    concurrency: int = 8,
) -> IntakeReport:
    """Submit ``items`` in order (at most ``rate``/s); a follow-up waits for the answer
    to its supporter's submission. Statuses are counted, never raised."""
    report = IntakeReport()
    refs: dict[str, asyncio.Future[str | None]] = {}
    loop = asyncio.get_running_loop()
    gate = asyncio.Semaphore(concurrency)
    base = base_url.rstrip("/")
    started = loop.time()

    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as session:

        async def send(item: IntakeItem, own: asyncio.Future[str | None] | None) -> None:
            path = "/api/actions"
            if item.follow_up:
                # Wait outside the gate: the supporter's submission may still need a slot.
                ref = await refs[item.person] if item.person in refs else None
                if ref is None:
                    report.counts["follow_up_without_supporter"] += 1
                    return
                path = f"/api/actions/{ref}"
            answer = None
            async with gate:
                try:
                    async with session.post(base + path, json=item.body) as response:
                        report.statuses[response.status] += 1
                        if response.status == 200:
                            answer = await response.json(content_type=None)
                except (aiohttp.ClientError, TimeoutError):
                    report.statuses[0] += 1
            report.counts[item.kind] += 1
            if own is not None and not own.done():
                own.set_result(answer["contactRef"] if answer else None)

        tasks = []
        for index, item in enumerate(items):
            if rate is not None:
                delay = started + index / rate - loop.time()
                if delay > 0:
                    await asyncio.sleep(delay)
            own = None
            if not item.follow_up:
                own = loop.create_future()
                previous = refs.get(item.person)
                if previous is None or previous.done():
                    refs[item.person] = own
            tasks.append(asyncio.create_task(send(item, own)))
        await asyncio.gather(*tasks)
    return report
