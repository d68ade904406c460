"""HubSpot CRM v3 as documented (developers.hubspot.com: contacts batch upsert, notes,
associations v4, communication preferences v4 statuses, GDPR delete, usage guidelines),
for the tests: the account's contacts, subscription statuses and notes.

Contract reproduced: ``Authorization: Bearer <token>``; error bodies
``{status: "error", message, correlationId, category, errors[], context}``; batch inputs
≤100 (400 above, 400 for an id twice); e-mails case-insensitive and unique; per-item
failures answered 207 multi-status with ``errors[]`` naming the inputs in ``context``;
``new`` on upsert results; v4 status writes can re-subscribe an opted-out person (the
connector must not); the rolling 10-second window answered 429 with
``X-HubSpot-RateLimit-*`` headers and a ``policyName`` (no Retry-After), the same headers
on every answer.
"""

from __future__ import annotations

import re
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

from tests.support.emulators.base import Driver, Emulator, WindowLimit
from tests.support.saas_views import subscription_of

EMAIL = re.compile(r"^[^@\s]+@[^@\s]+\.[^@\s]+$")
KNOWN_PROPERTIES = {
    "email",
    "firstname",
    "lastname",
    "zip",
    "country",
    "phone",
    "city",
    "address",
    "state",
    "company",
}
SYSTEM = {"hs_object_id", "createdate", "lastmodifieddate"}
MARKER = re.compile(r"\[proca:action:(\d+)\]")


def _error(category: str, message: str, status: int, **extra: Any) -> web.Response:
    return web.json_response(
        {
            "status": "error",
            "message": message,
            "correlationId": str(uuid.uuid4()),
            "category": category,
            **extra,
        },
        status=status,
    )


def _item_error(
    category: str, message: str, code: str, trace: str | None, ident: str
) -> dict[str, Any]:
    context: dict[str, list[str]] = {"ids": [ident]}
    if trace is not None:
        context["objectWriteTraceId"] = [trace]
    return {
        "status": "error",
        "category": category,
        "message": message,
        "errors": [{"message": message, "code": code}],
        "context": context,
    }


@dataclass
class HubSpotEmulator(Emulator):
    token: str = "pat-test-token"
    subscription_ids: frozenset[int] = frozenset({9001})
    daily_limit: int = 250_000
    contacts: dict[str, dict[str, Any]] = field(default_factory=dict)
    statuses: dict[tuple[str, int], str] = field(default_factory=dict)
    notes: dict[str, dict[str, Any]] = field(default_factory=dict)
    deleted: list[str] = field(default_factory=list)
    archived: list[str] = field(default_factory=list)
    refused: set[str] = field(default_factory=set)
    """Addresses this account refuses (``INVALID_EMAIL``), for the parking tests."""
    created: Counter[str] = field(default_factory=Counter)
    """Notes created per Proca action id (never above 1 for an idempotent client)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        self._ids = 1000
        self._daily = 0
        self._by_email: dict[str, str] = {}
        """Address → contact id (addresses never change once created)."""

    # ---- base hooks --------------------------------------------------------------------

    def authorised(self, request: web.Request) -> bool:
        return request.headers.get("Authorization") == f"Bearer {self.token}"

    def unauthorised(self) -> web.StreamResponse:
        return _error("INVALID_AUTHENTICATION", "Authentication credentials not found.", 401)

    def _rate_headers(self) -> dict[str, str]:
        headers = {
            "X-HubSpot-RateLimit-Daily": str(self.daily_limit),
            "X-HubSpot-RateLimit-Daily-Remaining": str(max(0, self.daily_limit - self._daily)),
        }
        if self.limit is not None:
            headers.update(
                {
                    "X-HubSpot-RateLimit-Interval-Milliseconds": str(int(self.limit.window * 1000)),
                    "X-HubSpot-RateLimit-Max": str(self.limit.limit),
                    "X-HubSpot-RateLimit-Remaining": str(self.limit.remaining),
                }
            )
        return headers

    def throttled(self, retry_after: float) -> web.StreamResponse:
        return web.json_response(
            {
                "status": "error",
                "message": "You have reached your ten_secondly_rolling limit.",
                "errorType": "RATE_LIMIT",
                "correlationId": str(uuid.uuid4()),
                "policyName": "TEN_SECONDLY_ROLLING",
                "requestId": str(uuid.uuid4()),
            },
            status=429,
            headers={**self._rate_headers(), "X-HubSpot-RateLimit-Remaining": "0"},
        )

    def _ok(self, body: Any, status: int = 200) -> web.Response:
        self._daily += 1
        return web.json_response(body, status=status, headers=self._rate_headers())

    def _next_id(self) -> str:
        self._ids += 1
        return str(self._ids)

    def routes(self, app: web.Application) -> None:
        app.router.add_get("/crm/v3/objects/contacts", self.list_contacts)
        app.router.add_post("/crm/v3/objects/contacts/batch/upsert", self.upsert)
        app.router.add_get("/crm/v3/objects/contacts/{id}", self.get_contact)
        app.router.add_post("/crm/v3/objects/notes/batch/archive", self.archive_notes)
        app.router.add_post("/crm/v3/objects/contacts/gdpr-delete", self.gdpr_delete)
        app.router.add_delete("/crm/v3/objects/contacts/{id}", self.archive_contact)
        app.router.add_post("/crm/v3/objects/notes/batch/create", self.create_notes)
        app.router.add_post("/crm/v3/objects/notes/batch/read", self.read_notes)
        app.router.add_post("/crm/v4/associations/contacts/notes/batch/read", self.read_assoc)
        app.router.add_post("/communication-preferences/v4/statuses/batch/read", self.read_status)
        app.router.add_post("/communication-preferences/v4/statuses/batch/write", self.write_status)

    # ---- helpers -----------------------------------------------------------------------

    def by_email(self, email: str) -> dict[str, Any] | None:
        # An index, not a scan of every contact: a 100,000-contact backfill looked each
        # address up in all the contacts before it (quadratic: the emulator, not the
        # connector, was the bound). A contact's address never changes once created.
        email = email.strip().lower()
        index = self._by_email
        if len(index) < len(self.contacts):  # contacts added some other way
            index.clear()
            index.update(
                {str(c["properties"].get("email")): cid for cid, c in self.contacts.items()}
            )
        cid = index.get(email)
        contact = None if cid is None else self.contacts.get(cid)
        if contact is None or contact["properties"].get("email") != email:
            index.pop(email, None)  # deleted (or never there)
            return None
        return contact

    async def _inputs(self, request: web.Request) -> list[Any] | web.Response:
        try:
            body = await request.json()
        except ValueError:
            return _error("VALIDATION_ERROR", "Invalid input JSON", 400)
        inputs = body.get("inputs") if isinstance(body, dict) else None
        if not isinstance(inputs, list) or not inputs:
            return _error("VALIDATION_ERROR", "inputs is required", 400)
        if len(inputs) > 100:
            return _error("VALIDATION_ERROR", "Batch input limit is 100 inputs", 400)
        return inputs

    def _batch(self, results: list[Any], errors: list[Any], ok: int = 200) -> web.Response:
        now = time.strftime("%Y-%m-%dT%H:%M:%S.000Z", time.gmtime())
        body: dict[str, Any] = {
            "status": "COMPLETE",
            "results": results,
            "requestedAt": now,
            "startedAt": now,
            "completedAt": now,
        }
        if errors:
            body["errors"] = errors
            body["numErrors"] = len(errors)
        return self._ok(body, 207 if errors else ok)

    # ---- routes ------------------------------------------------------------------------

    async def list_contacts(self, request: web.Request) -> web.StreamResponse:
        limit = int(request.query.get("limit", "10"))
        results = list(self.contacts.values())[:limit]
        return self._ok({"results": results})

    async def upsert(self, request: web.Request) -> web.StreamResponse:
        inputs = await self._inputs(request)
        if isinstance(inputs, web.Response):
            return inputs
        keys = [str(i.get("id", "")).strip().lower() for i in inputs]
        if len(set(keys)) != len(keys):
            return _error("VALIDATION_ERROR", "Duplicate IDs found in batch input", 400)
        results, errors = [], []
        for item in inputs:
            trace = item.get("objectWriteTraceId")
            ident = str(item.get("id", ""))
            email = ident.strip().lower()
            props = {k: v for k, v in (item.get("properties") or {}).items()}
            if item.get("idProperty") != "email":
                errors.append(
                    _item_error(
                        "VALIDATION_ERROR", "unknown idProperty", "INVALID_ID", trace, ident
                    )
                )
                continue
            unknown = sorted(set(props) - KNOWN_PROPERTIES)
            if unknown:
                errors.append(
                    _item_error(
                        "VALIDATION_ERROR",
                        f'Property "{unknown[0]}" does not exist',
                        "PROPERTY_DOESNT_EXIST",
                        trace,
                        ident,
                    )
                )
                continue
            if not EMAIL.match(email) or email in self.refused:
                errors.append(
                    _item_error(
                        "VALIDATION_ERROR",
                        "Email address is invalid",
                        "INVALID_EMAIL",
                        trace,
                        ident,
                    )
                )
                continue
            props["email"] = email
            now = time.strftime("%Y-%m-%dT%H:%M:%S.000Z", time.gmtime())
            contact = self.by_email(email)
            is_new = contact is None
            if contact is None:
                cid = self._next_id()
                contact = {
                    "id": cid,
                    "properties": {"hs_object_id": cid, "createdate": now},
                    "createdAt": now,
                    "archived": False,
                    "notes": [],
                }
                self.contacts[cid] = contact
                self._by_email[email.strip().lower()] = cid
            contact["properties"].update({k: str(v) for k, v in props.items()})
            contact["properties"]["lastmodifieddate"] = now
            contact["updatedAt"] = now
            result = {
                "id": contact["id"],
                "properties": dict(contact["properties"]),
                "createdAt": contact["createdAt"],
                "updatedAt": now,
                "archived": False,
                "new": is_new,
            }
            if trace is not None:
                result["objectWriteTraceId"] = trace
            results.append(result)
        return self._batch(results, errors)

    async def get_contact(self, request: web.Request) -> web.StreamResponse:
        ident = request.match_info["id"]
        if request.query.get("idProperty") == "email":
            contact = self.by_email(ident)
        else:
            contact = self.contacts.get(ident)
        if contact is None:
            return _error("OBJECT_NOT_FOUND", "resource not found", 404)
        return self._ok({k: v for k, v in contact.items() if k != "notes"})

    async def archive_notes(self, request: web.Request) -> web.StreamResponse:
        inputs = await self._inputs(request)
        if isinstance(inputs, web.Response):
            return inputs
        for item in inputs:
            self.notes.pop(str(item.get("id")), None)  # archiving an unknown id is a no-op
        self._daily += 1
        return web.Response(status=204, headers=self._rate_headers())

    async def gdpr_delete(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()
        ident = str(body.get("objectId", ""))
        if body.get("idProperty") == "email":
            contact = self.by_email(ident)
        else:
            contact = self.contacts.get(ident)
        if contact is None:
            return _error("OBJECT_NOT_FOUND", "resource not found", 404)
        email = contact["properties"].get("email", "")
        del self.contacts[contact["id"]]
        for key in [k for k in self.statuses if k[0] == email]:
            del self.statuses[key]
        for note in self.notes.values():
            note["contacts"].discard(contact["id"])
        self.deleted.append(email)
        self._daily += 1
        return web.Response(status=204, headers=self._rate_headers())

    async def archive_contact(self, request: web.Request) -> web.StreamResponse:
        """``DELETE /crm/v3/objects/contacts/{contactId}``: moved to the recycling bin
        (204). The address's subscription statuses stay: they belong to the address."""
        contact = self.contacts.pop(request.match_info["id"], None)
        if contact is not None:
            for note in self.notes.values():
                note["contacts"].discard(contact["id"])
            self.archived.append(contact["properties"].get("email", ""))
        self._daily += 1
        return web.Response(status=204, headers=self._rate_headers())

    async def create_notes(self, request: web.Request) -> web.StreamResponse:
        inputs = await self._inputs(request)
        if isinstance(inputs, web.Response):
            return inputs
        results, errors = [], []
        for item in inputs:
            trace = item.get("objectWriteTraceId")
            props = item.get("properties") or {}
            targets = []
            for assoc in item.get("associations") or ():
                types = assoc.get("types") or []
                if not any(t.get("associationTypeId") == 202 for t in types):
                    continue
                targets.append(str(assoc.get("to", {}).get("id")))
            if "hs_timestamp" not in props:
                errors.append(
                    _item_error(
                        "VALIDATION_ERROR",
                        "hs_timestamp is required",
                        "REQUIRED_PROPERTY",
                        trace,
                        str(trace),
                    )
                )
                continue
            if any(t not in self.contacts for t in targets):
                errors.append(
                    _item_error(
                        "VALIDATION_ERROR",
                        "association target not found",
                        "INVALID_ASSOCIATION",
                        trace,
                        str(trace),
                    )
                )
                continue
            nid = self._next_id()
            note = {"id": nid, "properties": dict(props), "contacts": set(targets)}
            for marker in MARKER.findall(str(props.get("hs_note_body", ""))):
                self.created[marker] += 1
            self.notes[nid] = note
            result: dict[str, Any] = {"id": nid, "properties": dict(props), "archived": False}
            if trace is not None:
                result["objectWriteTraceId"] = trace
            results.append(result)
        return self._batch(results, errors, ok=201)

    async def read_notes(self, request: web.Request) -> web.StreamResponse:
        inputs = await self._inputs(request)
        if isinstance(inputs, web.Response):
            return inputs
        results, errors = [], []
        for item in inputs:
            note = self.notes.get(str(item.get("id")))
            if note is None:
                errors.append(
                    _item_error(
                        "OBJECT_NOT_FOUND", "not found", "NOT_FOUND", None, str(item.get("id"))
                    )
                )
                continue
            results.append({"id": note["id"], "properties": dict(note["properties"])})
        return self._batch(results, errors)

    async def read_assoc(self, request: web.Request) -> web.StreamResponse:
        inputs = await self._inputs(request)
        if isinstance(inputs, web.Response):
            return inputs
        results, errors = [], []
        for item in inputs:
            cid = str(item.get("id"))
            if cid not in self.contacts:
                errors.append(_item_error("OBJECT_NOT_FOUND", "not found", "NOT_FOUND", None, cid))
                continue
            to = [
                {
                    "toObjectId": int(nid),
                    "associationTypes": [
                        {"category": "HUBSPOT_DEFINED", "typeId": 202, "label": None}
                    ],
                }
                for nid, note in self.notes.items()
                if cid in note["contacts"]
            ]
            results.append({"from": {"id": cid}, "to": to})
        return self._batch(results, errors)

    async def read_status(self, request: web.Request) -> web.StreamResponse:
        if request.query.get("channel") != "EMAIL":
            return _error("VALIDATION_ERROR", "channel is required", 400)
        inputs = await self._inputs(request)
        if isinstance(inputs, web.Response):
            return inputs
        results = []
        for raw in inputs:
            email = str(raw).strip().lower()
            results.append(
                {
                    "subscriberIdString": email,
                    "statuses": [
                        {
                            "channel": "EMAIL",
                            "subscriberIdString": email,
                            "subscriptionId": sid,
                            "status": self.statuses.get((email, sid), "NOT_SPECIFIED"),
                            "source": "API",
                        }
                        for sid in sorted(self.subscription_ids)
                    ],
                }
            )
        return self._batch(results, [])

    async def write_status(self, request: web.Request) -> web.StreamResponse:
        inputs = await self._inputs(request)
        if isinstance(inputs, web.Response):
            return inputs
        results, errors = [], []
        for item in inputs:
            email = str(item.get("subscriberIdString", "")).strip().lower()
            sid = item.get("subscriptionId")
            state = item.get("statusState")
            if sid not in self.subscription_ids:
                errors.append(
                    _item_error(
                        "VALIDATION_ERROR",
                        "unknown subscription",
                        "INVALID_SUBSCRIPTION",
                        None,
                        email,
                    )
                )
                continue
            if state not in {"SUBSCRIBED", "NOT_SUBSCRIBED", "NOT_SPECIFIED"}:
                errors.append(
                    _item_error(
                        "VALIDATION_ERROR", "invalid statusState", "INVALID_STATE", None, email
                    )
                )
                continue
            if state == "SUBSCRIBED" and not item.get("legalBasis"):
                errors.append(
                    _item_error(
                        "VALIDATION_ERROR",
                        "legalBasis is required",
                        "MISSING_LEGAL_BASIS",
                        None,
                        email,
                    )
                )
                continue
            self.statuses[(email, sid)] = state
            results.append(
                {
                    "channel": "EMAIL",
                    "subscriberIdString": email,
                    "subscriptionId": sid,
                    "status": state,
                }
            )
        return self._batch(results, errors)

    # ---- what tests read ---------------------------------------------------------------

    def notes_of(self, email: str) -> list[int]:
        contact = self.by_email(email)
        if contact is None:
            return []
        out = []
        for note in self.notes.values():
            if contact["id"] in note["contacts"]:
                out.extend(int(m) for m in MARKER.findall(note["properties"]["hs_note_body"]))
        return sorted(out)


SUBSCRIPTION = 9001


_STATE = {
    "subscribed": "SUBSCRIBED",
    "unsubscribed": "NOT_SUBSCRIBED",
    "not_opted_in": "NOT_SPECIFIED",
}


class HubSpotDriver(Driver):
    type = "hubspot"
    rate_limit = 10.0
    """The documented requests per second (100 per rolling 10 s, Free/Starter)."""
    key_env = "PROCA_TEST_HUBSPOT_TOKEN"
    key = "pat-na1-test-token"

    def make(self, *, latency: float = 0.0, rate_limited: bool = True) -> HubSpotEmulator:
        return HubSpotEmulator(
            latency=latency,
            limit=WindowLimit(100, 10.0) if rate_limited else None,
            token=self.key,
            subscription_ids=frozenset({SUBSCRIPTION}),
        )

    def config(self, emulator: Emulator) -> dict[str, Any]:
        return {
            "type": "hubspot",
            "base_url": emulator.url,
            "api_key_env": self.key_env,
            "subscription_id": SUBSCRIPTION,
        }

    def snapshot(self, emulator: Emulator) -> dict[str, Any]:
        assert isinstance(emulator, HubSpotEmulator)
        contacts = {}
        by_id = {}
        for contact in emulator.contacts.values():
            props = {k: v for k, v in contact["properties"].items() if k not in SYSTEM}
            email = props["email"]
            by_id[contact["id"]] = email
            contacts[email] = {
                "properties": props,
                "subscription": emulator.statuses.get((email, SUBSCRIPTION), "NOT_SPECIFIED"),
            }
        activities: dict[str, list[Any]] = {}
        for note in emulator.notes.values():
            for action_id in MARKER.findall(note["properties"]["hs_note_body"]):
                entry = [
                    sorted(by_id[c] for c in note["contacts"] if c in by_id),
                    note["properties"]["hs_timestamp"],
                ]
                activities.setdefault(action_id, []).append(entry)
        return {"contacts": contacts, "activities": activities}

    def expected(self, export: dict[str, Any], config: dict[str, Any]) -> dict[str, Any]:
        from proca_sync.destinations.hubspot import DEFAULT_PROPERTIES

        mapping = config.get("properties") or DEFAULT_PROPERTIES
        testing = bool(config.get("include_testing"))
        contacts: dict[str, Any] = {}
        activities: dict[str, list[Any]] = {}
        for c in export["contacts"]:
            if not c.get("email") or (c.get("testing") and not testing):
                continue
            direct = {
                k: c.get(k) for k in ("email", "firstName", "lastName", "postcode", "country")
            }
            props = {}
            for prop, source in mapping.items():
                value = direct[source] if source in direct else (c.get("fields") or {}).get(source)
                if value is not None and value != "":
                    props[prop] = str(value)
            props["email"] = c["email"]
            state = _STATE[subscription_of(c)] if config.get("subscription_id") else "NOT_SPECIFIED"
            contacts[c["email"]] = {"properties": props, "subscription": state}
            for a in c.get("actions") or ():
                if a.get("testing") and not testing:
                    continue
                activities[str(a["actionId"])] = [[[c["email"]], a["createdAt"]]]
        return {"contacts": contacts, "activities": activities}

    def refuse(self, emulator: Emulator, email: str) -> None:
        """Make the account refuse this address (the parking test)."""
        assert isinstance(emulator, HubSpotEmulator)
        emulator.call(lambda: emulator.refused.add(email.strip().lower()))


DRIVER = HubSpotDriver()
