"""A minimal HTTP destination of our own, to validate the contract suite and the pusher
while the vendor connectors live on other branches: a tiny "CRM" API (batch contact
upsert by e-mail with per-item errors, idempotent activities keyed by an id, erasure),
its emulator and its driver. Used as ``type = "tests.support.emulators.toy:ToyDestination"``
(the ``module:Class`` form of the ``type`` key), so subprocesses can load it too.

The API, as a vendor would document it:

* ``Authorization: Bearer KEY``; 401 otherwise.
* ``POST /contacts/batch`` ``{"contacts": [{"email", "firstName", "lastName", "postcode",
  "country", "subscription"}]}`` (≤ 100) → 200 ``{"results": [{"email", "status": "ok" |
  "error", "code"}]}``; an address the account refuses gets ``code: "invalid_email"``.
  ``subscription`` ``not_opted_in`` never unsubscribes an existing subscriber.
* ``POST /activities/batch`` ``{"activities": [{"id", "email", "type", "campaign"}]}``
  (≤ 100) → per-item results; an id already recorded answers ``"duplicate"`` (idempotent).
* ``POST /erase`` ``{"emails": [...]}`` → 200.
* ``GET /ping`` → 200. A rate limit per second answered 429 with ``Retry-After``.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from typing import Any, ClassVar, Literal

from aiohttp import web

from proca_sync.destinations.base import (
    Batch,
    CampaignView,
    DestinationConfig,
    DestinationRejectedError,
    PushReport,
)
from proca_sync.destinations.http import ApiClient, RateLimiter
from proca_sync.errors import BackendUnavailableError, ConfigError
from tests.support.emulators.base import Driver, Emulator, WindowLimit

TOY_TYPE = "tests.support.emulators.toy:ToyDestination"


class ToyConfig(DestinationConfig):
    type: Literal["tests.support.emulators.toy:ToyDestination"]


class ToyDestination:
    Config: ClassVar[type[DestinationConfig]] = ToyConfig
    type: ClassVar[str] = TOY_TYPE
    supports_erasure = True
    concurrency = 4

    def __init__(self, name: str, config: ToyConfig) -> None:
        if not config.base_url:
            raise ConfigError(f"destination {name}: base_url is required")
        self.name = name
        self.max_batch = min(100, config.batch_size or 100)
        self.client = ApiClient(
            name=name,
            base_url=config.base_url,
            headers={"Authorization": f"Bearer {config.api_key()}"},
            limiter=RateLimiter(config.rate or 10.0, config.burst or 1),
            timeout=config.timeout,
            attempts=3,
            backoff=0.2,
            max_backoff=2.0,
        )

    @property
    def throttled(self) -> int:
        return self.client.stats.throttled

    async def open(self) -> None:
        await self.client.open()

    async def close(self) -> None:
        await self.client.close()

    async def ping(self) -> None:
        answer = await self.client.request("GET", "/ping")
        if not answer.ok:
            raise ConfigError(f"destination {self.name}: ping answered {answer.status}")

    async def _post(self, path: str, body: dict[str, Any]) -> Any:
        answer = await self.client.request("POST", path, json=body)
        if not answer.ok:
            raise BackendUnavailableError(f"{self.name}: POST {path} answered {answer.status}")
        return answer.body

    async def push(self, batch: Batch) -> PushReport:
        report = PushReport()
        refused: dict[str, str] = {}
        if batch.contacts:
            body = await self._post(
                "/contacts/batch",
                {
                    "contacts": [
                        {
                            "email": c.email,
                            "firstName": c.first_name,
                            "lastName": c.last_name,
                            "postcode": c.postcode,
                            "country": c.country,
                            "subscription": c.subscription,
                            # Campaign data projected on the contact (a campaign update
                            # re-pushes the campaign's contacts).
                            "tags": sorted(
                                {_title(batch.campaigns.get(n), n) for n in c.campaigns}
                            ),
                        }
                        for c in batch.contacts
                    ]
                },
            )
            for contact, result in zip(batch.contacts, body["results"], strict=True):
                if result["status"] != "ok":
                    refused[contact.email] = result["code"]
                    report.failed[contact.key] = DestinationRejectedError(
                        "contact refused", code=result["code"]
                    )
        emails = {c.contact_id: c.email for c in batch.contacts}
        activities = []
        for action in batch.actions:
            email = emails[action.contact_id]
            if email in refused:
                report.failed[action.key] = DestinationRejectedError(
                    "contact refused", code=refused[email]
                )
                continue
            activities.append(action)
        if activities:
            body = await self._post(
                "/activities/batch",
                {
                    "activities": [
                        {
                            "id": str(a.action_id),
                            "email": emails[a.contact_id],
                            "type": a.action_type,
                            "campaign": a.campaign,
                        }
                        for a in activities
                    ]
                },
            )
            for action, result in zip(activities, body["results"], strict=True):
                if result["status"] not in {"ok", "duplicate"}:
                    report.failed[action.key] = DestinationRejectedError(
                        "activity refused", code=result.get("code", "error")
                    )
        if batch.erasures:
            await self._post("/erase", {"emails": [e.email for e in batch.erasures]})
        report.requests = bool(batch.contacts) + bool(activities) + bool(batch.erasures)
        return report


class ToyEmulator(Emulator):
    """The toy API's server (see the module docstring)."""

    key = "toy-key-0123456789"

    def __post_init__(self) -> None:
        super().__post_init__()
        self.contacts: dict[str, dict[str, Any]] = {}
        self.activities: dict[str, dict[str, Any]] = {}
        self.created: Counter[str] = Counter()
        """Activities created per id (never above 1 for an idempotent client)."""
        self.refused: set[str] = set()
        self.erased = 0
        self._activity_email: dict[str, str] = {}
        self.hold = 0.0
        """Seconds a contacts or activities request holds its e-mails before answering."""
        self.busy: Counter[str] = Counter()
        self.overlaps = 0
        """Requests that named an e-mail another request in flight named."""

    async def _holding(self, emails: set[str]) -> None:
        """Hold ``emails`` for :attr:`hold` seconds, counting overlaps with other requests."""
        if not self.hold:
            return
        if any(self.busy[e] for e in emails):
            self.overlaps += 1
        self.busy.update(emails)
        try:
            await asyncio.sleep(self.hold)  # sleep-ok: the request's time in flight
        finally:
            self.busy.subtract(emails)

    def authorised(self, request: web.Request) -> bool:
        return request.headers.get("Authorization") == f"Bearer {self.key}"

    def routes(self, app: web.Application) -> None:
        app.router.add_get("/ping", self._ping)
        app.router.add_post("/contacts/batch", self._contacts)
        app.router.add_post("/activities/batch", self._activities)
        app.router.add_post("/erase", self._erase)

    async def _ping(self, request: web.Request) -> web.StreamResponse:
        return web.json_response({"ok": True})

    async def _contacts(self, request: web.Request) -> web.StreamResponse:
        items = (await request.json())["contacts"]
        if len(items) > 100:
            return web.json_response({"code": "too_many"}, status=400)
        await self._holding({item["email"] for item in items})
        results = []
        for item in items:
            email = item["email"]
            if email in self.refused:
                results.append({"email": email, "status": "error", "code": "invalid_email"})
                continue
            stored = self.contacts.get(email)
            record = {
                k: item[k] for k in ("firstName", "lastName", "postcode", "country", "tags")
            }
            subscription = item["subscription"]
            if subscription == "not_opted_in" and stored is not None:
                subscription = stored["subscription"]
            record["subscription"] = subscription
            self.contacts[email] = record
            results.append({"email": email, "status": "ok"})
        return web.json_response({"results": results})

    async def _activities(self, request: web.Request) -> web.StreamResponse:
        items = (await request.json())["activities"]
        await self._holding({item["email"] for item in items})
        results = []
        for item in items:
            if item["email"] not in self.contacts:
                results.append({"id": item["id"], "status": "error", "code": "no_contact"})
            elif item["id"] in self.activities:
                results.append({"id": item["id"], "status": "duplicate"})
            else:
                self.activities[item["id"]] = {"type": item["type"], "campaign": item["campaign"]}
                self._activity_email[item["id"]] = item["email"]
                self.created[item["id"]] += 1
                results.append({"id": item["id"], "status": "ok"})
        return web.json_response({"results": results})

    async def _erase(self, request: web.Request) -> web.StreamResponse:
        for email in (await request.json())["emails"]:
            if self.contacts.pop(email, None) is not None:
                self.erased += 1
            for key in [k for k, v in self._activity_email.items() if v == email]:
                del self.activities[key], self._activity_email[key]
        return web.json_response({"ok": True})


class ToyDriver(Driver):
    type = TOY_TYPE
    key_env = "TOY_API_KEY"
    key = ToyEmulator.key
    rate_limit = 50.0

    def make(self, *, latency: float = 0.0, rate_limited: bool = True) -> Emulator:
        return ToyEmulator(latency=latency, limit=WindowLimit(50, 1.0) if rate_limited else None)

    def config(self, emulator: Emulator) -> dict[str, Any]:
        return {
            "type": TOY_TYPE,
            "base_url": emulator.url,
            "api_key_env": self.key_env,
            "rate": 40.0,
            "timeout": 2.0,
        }

    def snapshot(self, emulator: Emulator) -> dict[str, Any]:
        assert isinstance(emulator, ToyEmulator)
        return {"contacts": dict(emulator.contacts), "activities": dict(emulator.activities)}

    def expected(self, export: dict[str, Any], config: dict[str, Any]) -> dict[str, Any]:
        include_testing = bool(config.get("include_testing"))
        titles = {c["name"]: c["title"] or c["name"] for c in export["campaigns"]}
        contacts: dict[str, dict[str, Any]] = {}
        activities: dict[str, dict[str, Any]] = {}
        for contact in export["contacts"]:
            if not contact["email"] or (contact["testing"] and not include_testing):
                continue
            contacts[contact["email"]] = {
                "firstName": contact["firstName"],
                "lastName": contact["lastName"],
                "postcode": contact["postcode"],
                "country": contact["country"],
                "subscription": subscription(contact),
                "tags": sorted(
                    {titles.get(a["campaign"], a["campaign"]) for a in contact["actions"]}
                ),
            }
            for action in contact["actions"]:
                if action["testing"] and not include_testing:
                    continue
                activities[str(action["actionId"])] = {
                    "type": action["actionType"],
                    "campaign": action["campaign"],
                }
        return {"contacts": contacts, "activities": activities}


def _title(campaign: CampaignView | None, name: str) -> str:
    return (campaign.title if campaign is not None else None) or name


def subscription(contact: dict[str, Any]) -> str:
    """``ContactView.subscription`` from an exported contact."""
    from proca_sync.sync.consent import NEGATIVE_STATUSES

    if contact["subscribed"]:
        return "subscribed"
    status = contact["emailStatus"]
    if status in NEGATIVE_STATUSES or status not in {None, "active", "double_opt_in"}:
        return "unsubscribed"
    return "not_opted_in"


DRIVER = ToyDriver()
