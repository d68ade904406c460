"""Brevo API v3, the contact endpoints a list sync uses, from Brevo's public reference
(developers.brevo.com: create/update/delete contact, lists, import, processes, events,
api-limits and limit-headers).

Contract reproduced:
* ``api-key`` header; 401 ``{code: "unauthorized", message}`` otherwise.
* Errors are ``{code, message}`` (``invalid_parameter``, ``missing_parameter``,
  ``duplicate_parameter``, ``document_not_found``, ``out_of_range``…).
* ``POST /contacts``: 201 ``{id}`` when created; with ``updateEnabled`` an existing e-mail
  (matched case-insensitively) is updated and answered 204, without it 400
  ``duplicate_parameter``; ``listIds`` are added (never removed); attributes the account
  does not define are ignored.
* ``POST /contacts/lists/{id}/contacts/remove``: ≤ 150 addresses, 201 with
  ``contacts.success/failure``; 400 ``invalid_parameter`` when none was in the list.
* ``POST /contacts/import``: 202 ``{processId}``, applied later in the background;
  ``GET /processes/{id}`` reports ``queued``/``in_process``/``completed``, with ``info``
  pointing at a report of the problem records when some were skipped (the key names of
  that report are not documented in our sources: ``info.import.invalid_emails`` here).
* ``DELETE /contacts/{identifier}``: 204, 404 when unknown.
* Rate limits (General tier): ``/v3/contacts/*`` 10 requests/s, ``/v3/events`` 10/s,
  everything else 100/hour; over it 429 with ``x-sib-ratelimit-limit``,
  ``x-sib-ratelimit-remaining`` and ``x-sib-ratelimit-reset`` (seconds), no Retry-After.
"""

from __future__ import annotations

import asyncio
import itertools
import math
import re
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import unquote

from aiohttp import web

from tests.support.emulators.base import Driver, Emulator, WindowLimit
from tests.support.emulators.export import pushed

EMAIL = re.compile(r"^[^@\s]+@[^@\s]+\.[^@\s]+$")


def error(status: int, code: str, message: str) -> web.Response:
    return web.json_response({"code": code, "message": message}, status=status)


@dataclass
class BrevoEmulator(Emulator):
    key: str = "xkeysib-emulator"
    rate_limited: bool = True
    import_delay: float = 0.05
    lists: dict[int, str] = field(default_factory=lambda: {2: "Newsletter", 7: "Bees"})
    defined_attributes: set[str] = field(
        default_factory=lambda: {"FIRSTNAME", "LASTNAME", "SMS", "ZIP", "COUNTRY"}
    )
    contacts: dict[str, dict[str, Any]] = field(default_factory=dict)
    events: list[dict[str, Any]] = field(default_factory=list)
    reject: set[str] = field(default_factory=set)
    """Addresses Brevo refuses (400 invalid_parameter), besides malformed ones."""

    def __post_init__(self) -> None:
        super().__post_init__()
        self._ids = itertools.count(1)
        self._processes: dict[int, dict[str, Any]] = {}
        self._process_ids = itertools.count(50)
        self.contacts_limit = WindowLimit(10, 1.0)
        self.events_limit = WindowLimit(10, 1.0)
        self.other_limit = WindowLimit(100, 3600.0)

    # ---- contract --------------------------------------------------------------------

    def authorised(self, request: web.Request) -> bool:
        return request.headers.get("api-key") == self.key

    def unauthorised(self) -> web.StreamResponse:
        return error(401, "unauthorized", "Key not found")

    def limit_for(self, request: web.Request) -> WindowLimit | None:
        if not self.rate_limited:
            return None
        if request.path.startswith("/v3/contacts"):
            return self.contacts_limit
        if request.path.startswith("/v3/events"):
            return self.events_limit
        return self.other_limit

    def throttled(self, retry_after: float) -> web.StreamResponse:
        return web.json_response(
            {"code": "too_many_requests", "message": "The rate limit is exceeded"},
            status=429,
            headers={
                "x-sib-ratelimit-limit": "10",
                "x-sib-ratelimit-remaining": "0",
                "x-sib-ratelimit-reset": str(max(1, math.ceil(retry_after))),
            },
        )

    def failed(self, fault: Any) -> web.StreamResponse:
        return error(fault.status or 500, "internal_error", "Internal server error")

    def routes(self, app: web.Application) -> None:
        app.router.add_get("/v3/account", self.account)
        app.router.add_post("/v3/contacts", self.create_contact)
        app.router.add_post("/v3/contacts/import", self.import_contacts)
        app.router.add_get("/v3/contacts/lists/{list_id}", self.get_list)
        app.router.add_post("/v3/contacts/lists/{list_id}/contacts/remove", self.remove_from_list)
        app.router.add_delete("/v3/contacts/{identifier}", self.delete_contact)
        app.router.add_get("/v3/processes", self.list_processes)
        app.router.add_get("/v3/processes/{process_id}", self.get_process)
        app.router.add_post("/v3/events", self.create_event)

    async def account(self, request: web.Request) -> web.StreamResponse:
        return web.json_response({"companyName": "Emulated", "plan": [{"type": "free"}]})

    def _valid(self, email: str) -> bool:
        return bool(EMAIL.match(email)) and email.lower() not in self.reject

    def _apply(
        self,
        email: str,
        attributes: dict[str, Any],
        list_ids: list[int],
        blacklisted: bool | None,
    ) -> bool:
        """Create or update; ``True`` when created."""
        key = email.strip().lower()
        contact = self.contacts.get(key)
        created = contact is None
        if contact is None:
            contact = {"id": next(self._ids), "email": key, "attributes": {}, "listIds": set()}
            contact["emailBlacklisted"] = False
            self.contacts[key] = contact
        for name, value in attributes.items():
            if name in self.defined_attributes:
                contact["attributes"][name] = value
        contact["listIds"].update(list_ids)
        if blacklisted is not None:
            contact["emailBlacklisted"] = bool(blacklisted)
        return created

    async def create_contact(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()
        email = str(body.get("email") or "")
        if not email:
            return error(400, "missing_parameter", "email is missing")
        if not self._valid(email):
            return error(400, "invalid_parameter", "Invalid email address")
        list_ids = [int(i) for i in body.get("listIds") or []]
        if any(i not in self.lists for i in list_ids):
            return error(404, "document_not_found", "List ID does not exist")
        exists = email.strip().lower() in self.contacts
        if exists and not body.get("updateEnabled"):
            return error(400, "duplicate_parameter", "Contact already exist")
        created = self._apply(
            email, body.get("attributes") or {}, list_ids, body.get("emailBlacklisted")
        )
        if created:
            return web.json_response({"id": self.contacts[email.strip().lower()]["id"]}, status=201)
        return web.Response(status=204)

    async def get_list(self, request: web.Request) -> web.StreamResponse:
        list_id = int(request.match_info["list_id"])
        if list_id not in self.lists:
            return error(404, "document_not_found", "List ID does not exist")
        members = sum(1 for c in self.contacts.values() if list_id in c["listIds"])
        return web.json_response(
            {"id": list_id, "name": self.lists[list_id], "totalSubscribers": members}
        )

    async def remove_from_list(self, request: web.Request) -> web.StreamResponse:
        list_id = int(request.match_info["list_id"])
        if list_id not in self.lists:
            return error(404, "document_not_found", "List ID does not exist")
        body = await request.json()
        emails = [str(e).strip().lower() for e in body.get("emails") or []]
        if len(emails) > 150:
            return error(400, "out_of_range", "At most 150 emails per call")
        success, failure = [], []
        for email in emails:
            contact = self.contacts.get(email)
            if contact is not None and list_id in contact["listIds"]:
                contact["listIds"].discard(list_id)
                success.append(email)
            else:
                failure.append(email)
        if not success:
            return error(
                400, "invalid_parameter", "Contact already removed from list and/or does not exist"
            )
        return web.json_response({"contacts": {"success": success, "failure": failure}}, status=201)

    async def delete_contact(self, request: web.Request) -> web.StreamResponse:
        identifier = unquote(request.match_info["identifier"]).strip().lower()
        if self.contacts.pop(identifier, None) is None:
            return error(404, "document_not_found", "Contact does not exist")
        return web.Response(status=204)

    async def import_contacts(self, request: web.Request) -> web.StreamResponse:
        raw = await request.read()
        if len(raw) > 10 * 1024 * 1024:
            return error(400, "out_of_range", "The body is larger than 10 MB")
        body = await request.json()
        rows = body.get("jsonBody")
        if not isinstance(rows, list):
            return error(400, "missing_parameter", "fileUrl, fileBody or jsonBody is missing")
        list_ids = [int(i) for i in body.get("listIds") or []]
        if not list_ids and not body.get("newList"):
            return error(400, "missing_parameter", "listIds or newList is missing")
        if any(i not in self.lists for i in list_ids):
            return error(400, "invalid_parameter", "listIds contains an unknown list")
        pid = next(self._process_ids)
        self._processes[pid] = {"status": "queued", "info": None}
        asyncio.get_running_loop().call_later(
            self.import_delay, self._run_import, pid, rows, list_ids, body
        )
        return web.json_response({"processId": pid}, status=202)

    def _run_import(
        self, pid: int, rows: list[dict[str, Any]], list_ids: list[int], body: dict[str, Any]
    ) -> None:
        invalid = 0
        update = body.get("updateExistingContacts", True)
        for row in rows:
            email = str(row.get("email") or "")
            if not self._valid(email):
                invalid += 1
                continue
            if email.strip().lower() in self.contacts and not update:
                continue
            self._apply(
                email,
                row.get("attributes") or {},
                list_ids,
                bool(body.get("emailBlacklist")) or None,
            )
        info = None
        if invalid:
            info = {"import": {"invalid_emails": f"{self.url}/reports/{pid}-invalid.csv"}}
        self._processes[pid] = {"status": "completed", "info": info}

    async def get_process(self, request: web.Request) -> web.StreamResponse:
        pid = int(request.match_info["process_id"])
        process = self._processes.get(pid)
        if process is None:
            return error(404, "document_not_found", "Process does not exist")
        answer = {"id": pid, "name": "import_contacts", "status": process["status"]}
        if process["info"]:
            answer["info"] = process["info"]
        return web.json_response(answer)

    async def list_processes(self, request: web.Request) -> web.StreamResponse:
        limit = min(50, int(request.query.get("limit", "10")))
        offset = int(request.query.get("offset", "0"))
        ids = sorted(self._processes, reverse=request.query.get("sort", "desc") == "desc")
        rows = []
        for pid in ids[offset : offset + limit]:
            process = self._processes[pid]
            row = {"id": pid, "name": "import_contacts", "status": process["status"]}
            if process["info"]:
                row["info"] = process["info"]
            rows.append(row)
        return web.json_response({"processes": rows, "count": len(self._processes)})

    async def create_event(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()
        name = str(body.get("event_name") or "")
        if not re.fullmatch(r"[A-Za-z0-9_-]{1,255}", name):
            return error(400, "invalid_parameter", "event_name is invalid")
        if not body.get("identifiers"):
            return error(400, "missing_parameter", "identifiers is missing")
        self.events.append(body)
        return web.Response(status=204)

    # ---- observation -----------------------------------------------------------------

    def state(self) -> dict[str, dict[str, Any]]:
        out = {}
        for email, contact in self.contacts.items():
            events = [
                int(e["event_properties"]["action_id"])
                for e in self.events
                if (e.get("identifiers") or {}).get("email_id", "").lower() == email
            ]
            out[email] = {
                "attributes": dict(sorted(contact["attributes"].items())),
                "lists": sorted(contact["listIds"]),
                "blocklisted": contact["emailBlacklisted"],
                "events": sorted(events),
            }
        return out


class BrevoDriver(Driver):
    type = "brevo"
    rate_limit = 10.0
    """The documented requests per second on ``/v3/contacts`` (General tier)."""
    key_env = "PROCA_TEST_BREVO_KEY"
    key = "xkeysib-emulator"

    def make(self, *, latency: float = 0.0, rate_limited: bool = True) -> BrevoEmulator:
        return BrevoEmulator(latency=latency, rate_limited=rate_limited, key=self.key)

    def config(self, emulator: Emulator) -> dict[str, Any]:
        return {
            "type": "brevo",
            "base_url": f"{emulator.url}/v3",
            "api_key_env": self.key_env,
            "list_ids": [2],
            "poll_interval": 0.05,
        }

    def snapshot(self, emulator: Emulator) -> dict[str, Any]:
        assert isinstance(emulator, BrevoEmulator)
        state: dict[str, Any] = emulator.call(emulator.state)
        return state

    def expected(self, export: dict[str, Any], config: dict[str, Any]) -> dict[str, Any]:
        mapping = config.get("attributes") or {"first_name": "FIRSTNAME", "last_name": "LASTNAME"}
        per_campaign = config.get("campaign_lists") or {}
        out = {}
        for contact, actions in pushed(export, config):
            attributes = {}
            for source, name in mapping.items():
                value = (
                    contact.fields.get(source.removeprefix("fields."))
                    if source.startswith("fields.")
                    else getattr(contact, source, None)
                )
                if value not in (None, ""):
                    attributes[name] = value
            lists: set[int] = set()
            if contact.subscription == "subscribed":
                lists = set(config.get("list_ids") or [])
                lists |= {per_campaign[c] for c in contact.campaigns if c in per_campaign}
            out[contact.email] = {
                "attributes": dict(sorted(attributes.items())),
                "lists": sorted(lists),
                "blocklisted": contact.subscription == "unsubscribed"
                and config.get("blocklist", True),
                "events": sorted(a.action_id for a in actions) if config.get("events") else [],
            }
        return out


DRIVER = BrevoDriver()
