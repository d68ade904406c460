"""Action Network (OSDI API v2) as documented (actionnetwork.org/docs/v2: entry point,
people, person signup helper, tags, taggings, forms, petitions, record submission and
signature helpers, OData filters, considerations), for the tests.

Contract reproduced: ``OSDI-API-Token`` header; HAL+JSON with absolute ``href``s pointing
back at the emulator (``_links``, ``_embedded`` collections of at most 25); the signup
helper matches people by e-mail — a new person is subscribed unless ``unsubscribed`` is
sent, an existing person's status changes only when a status is sent (and then it is
set, even unsubscribed → subscribed: the API does not protect an opt-out, the connector
must); ``add_tags`` naming a tag that does not exist is ignored; identifiers are kept;
the record helpers accept an inline person or a ``_links["osdi:person"]`` and do not
deduplicate submissions or signatures; ``filter=field eq 'value'`` on ``email_address``,
``identifier`` and ``name``; errors ``{"error": "…"}``; 4 requests/s per key answered
429 (headers undocumented: none sent).
"""

from __future__ import annotations

import re
import uuid
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

from tests.support.emulators.base import Driver, Emulator, WindowLimit
from tests.support.saas_views import subscription_of

EMAIL = re.compile(r"^[^@\s]+@[^@\s]+\.[^@\s]+$")
FILTER = re.compile(r"^\s*(\w+)\s+eq\s+'((?:[^'\\]|\\.)*)'\s*$")


def _err(status: int, message: str) -> web.Response:
    return web.json_response({"error": message}, status=status, content_type="application/hal+json")


def _hal(body: Any, status: int = 200) -> web.Response:
    return web.json_response(body, status=status, content_type="application/hal+json")


@dataclass
class ActionNetworkEmulator(Emulator):
    token: str = "an-test-token"
    people: dict[str, dict[str, Any]] = field(default_factory=dict)
    tags: dict[str, str] = field(default_factory=dict)
    taggings: set[tuple[str, str]] = field(default_factory=set)
    forms: dict[str, dict[str, Any]] = field(default_factory=dict)
    petitions: dict[str, dict[str, Any]] = field(default_factory=dict)
    records: list[dict[str, Any]] = field(default_factory=list)
    refused: set[str] = field(default_factory=set)
    """Addresses this group refuses, for the parking tests."""
    created: Counter[str] = field(default_factory=Counter)
    """Submissions and signatures recorded per Proca action id (at most 1 when idempotent)."""

    def authorised(self, request: web.Request) -> bool:
        return request.headers.get("OSDI-API-Token") == self.token

    def unauthorised(self) -> web.StreamResponse:
        return _err(401, "API Key invalid or not present")

    def throttled(self, retry_after: float) -> web.StreamResponse:
        return _err(429, "You have exceeded the rate limit of 4 requests per second")

    def failed(self, fault: Any) -> web.StreamResponse:
        return _err(fault.status or 500, "Internal server error")

    def href(self, path: str) -> str:
        return f"{self.url}/api/v2/{path}"

    def routes(self, app: web.Application) -> None:
        r = app.router
        r.add_get("/api/v2/", self.entry)
        r.add_get("/api/v2/people", self.list_people)
        r.add_post("/api/v2/people", self.signup)
        r.add_put("/api/v2/people/{id}", self.put_person)
        r.add_get("/api/v2/tags", self.list_tags)
        r.add_post("/api/v2/tags", self.create_tag)
        for kind in ("forms", "petitions"):
            r.add_get(f"/api/v2/{kind}", self.list_targets)
            r.add_post(f"/api/v2/{kind}", self.create_target)
        r.add_get("/api/v2/forms/{id}/submissions", self.list_records)
        r.add_post("/api/v2/forms/{id}/submissions", self.record)
        r.add_get("/api/v2/petitions/{id}/signatures", self.list_records)
        r.add_post("/api/v2/petitions/{id}/signatures", self.record)

    # ---- representations -----------------------------------------------------------------

    def _person(self, person: dict[str, Any]) -> dict[str, Any]:
        pid = person["id"]
        body = {k: v for k, v in person.items() if k != "id"}
        body["_links"] = {
            "self": {"href": self.href(f"people/{pid}")},
            "osdi:submissions": {"href": self.href(f"people/{pid}/submissions")},
            "osdi:signatures": {"href": self.href(f"people/{pid}/signatures")},
            "osdi:taggings": {"href": self.href(f"people/{pid}/taggings")},
        }
        return body

    def _target(self, kind: str, target: dict[str, Any]) -> dict[str, Any]:
        tid = target["id"]
        body = {k: v for k, v in target.items() if k != "id"}
        if kind == "forms":
            body["_links"] = {
                "self": {"href": self.href(f"forms/{tid}")},
                "osdi:submissions": {"href": self.href(f"forms/{tid}/submissions")},
                "osdi:record_submission_helper": {"href": self.href(f"forms/{tid}/submissions")},
            }
        else:
            body["_links"] = {
                "self": {"href": self.href(f"petitions/{tid}")},
                "osdi:signatures": {"href": self.href(f"petitions/{tid}/signatures")},
                "osdi:record_signature_helper": {"href": self.href(f"petitions/{tid}/signatures")},
            }
        return body

    def _collection(self, name: str, items: list[Any], request: web.Request) -> web.Response:
        page = int(request.query.get("page", "1"))
        per_page = min(25, int(request.query.get("per_page", "25")))
        chunk = items[(page - 1) * per_page : page * per_page]
        return _hal(
            {
                "total_pages": max(1, -(-len(items) // per_page)),
                "per_page": per_page,
                "page": page,
                "total_records": len(items),
                "_links": {"self": {"href": str(request.url)}},
                "_embedded": {name: chunk},
            }
        )

    @staticmethod
    def _filter(request: web.Request) -> tuple[str, str] | None:
        raw = request.query.get("filter")
        if raw is None:
            return None
        match = FILTER.match(raw)
        if match is None:
            return ("", "")
        return match.group(1), match.group(2).replace("\\'", "'")

    # ---- model -------------------------------------------------------------------------

    def by_email(self, email: str) -> dict[str, Any] | None:
        email = email.strip().lower()
        for person in self.people.values():
            for address in person["email_addresses"]:
                if address["address"] == email:
                    return person
        return None

    def status_of(self, email: str) -> str | None:
        person = self.by_email(email)
        return None if person is None else person["email_addresses"][0]["status"]

    def tags_of(self, email: str) -> list[str]:
        person = self.by_email(email)
        if person is None:
            return []
        return sorted(self.tags[t] for t, p in self.taggings if p == person["id"])

    def records_of(self, email: str, kind: str = "submissions") -> list[int]:
        person = self.by_email(email)
        if person is None:
            return []
        out = []
        for record in self.records:
            if record["person"] == person["id"] and record["kind"] == kind:
                out.extend(
                    int(i.split(":", 1)[1])
                    for i in record["identifiers"]
                    if i.startswith("proca:") and i.count(":") == 1
                )
        return sorted(out)

    # ---- routes ------------------------------------------------------------------------

    async def entry(self, request: web.Request) -> web.StreamResponse:
        return _hal(
            {
                "motd": "Welcome to the Action Network OSDI API v2",
                "_links": {
                    "self": {"href": self.href("")},
                    "osdi:people": {"href": self.href("people")},
                    "osdi:tags": {"href": self.href("tags")},
                    "osdi:forms": {"href": self.href("forms")},
                    "osdi:petitions": {"href": self.href("petitions")},
                    "osdi:person_signup_helper": {"href": self.href("people")},
                },
            }
        )

    async def list_people(self, request: web.Request) -> web.StreamResponse:
        people = list(self.people.values())
        flt = self._filter(request)
        if flt is not None:
            if flt[0] != "email_address":
                return _err(400, "Invalid filter")
            people = [
                p
                for p in people
                if any(a["address"] == flt[1].strip().lower() for a in p["email_addresses"])
            ]
        return self._collection("osdi:people", [self._person(p) for p in people], request)

    async def signup(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()
        data = body.get("person") or {}
        addresses = data.get("email_addresses") or []
        raw = str(addresses[0].get("address", "")).strip() if addresses else ""
        if not EMAIL.match(raw) or raw.lower() in self.refused:
            return _err(400, "A valid email address is required")
        email = str(addresses[0]["address"]).strip().lower()
        status = addresses[0].get("status")
        if status not in (None, "subscribed", "unsubscribed"):
            return _err(400, "Invalid email status")
        person = self.by_email(email)
        if person is None:
            pid = str(uuid.uuid4())
            person = {
                "id": pid,
                "identifiers": [f"action_network:{pid}"],
                "email_addresses": [
                    {"primary": True, "address": email, "status": status or "subscribed"}
                ],
                "postal_addresses": [],
                "custom_fields": {},
            }
            self.people[pid] = person
        elif status is not None:
            person["email_addresses"][0]["status"] = status  # set, whatever it was
        for key in ("given_name", "family_name"):
            if data.get(key):
                person[key] = data[key]
        if data.get("postal_addresses"):
            merged = dict(person["postal_addresses"][0]) if person["postal_addresses"] else {}
            merged.update({k: v for k, v in data["postal_addresses"][0].items() if v})
            merged["primary"] = True
            person["postal_addresses"] = [merged]
        for ident in data.get("identifiers") or ():
            if ident not in person["identifiers"]:
                person["identifiers"].append(ident)
        person["custom_fields"].update(data.get("custom_fields") or {})
        self._apply_tags(person["id"], body.get("add_tags") or ())
        return _hal(self._person(person))

    def _apply_tags(self, pid: str, names: Any) -> None:
        by_name = {name: tid for tid, name in self.tags.items()}
        for name in names:
            if name in by_name:  # a tag that does not exist is ignored
                self.taggings.add((by_name[name], pid))

    async def put_person(self, request: web.Request) -> web.StreamResponse:
        person = self.people.get(request.match_info["id"])
        if person is None:
            return _err(404, "Not found")
        data = await request.json()
        for key in ("given_name", "family_name"):
            if key in data:
                if data[key] is None:
                    person.pop(key, None)
                else:
                    person[key] = data[key]
        if data.get("email_addresses"):
            status = data["email_addresses"][0].get("status")
            if status in ("subscribed", "unsubscribed"):
                person["email_addresses"][0]["status"] = status
        if "postal_addresses" in data:
            new = (data["postal_addresses"] or [{}])[0]
            current = person["postal_addresses"][0] if person["postal_addresses"] else {}
            for key, value in new.items():
                if value is None:
                    current.pop(key, None)
                else:
                    current[key] = value
            current.pop("primary", None)
            person["postal_addresses"] = [{"primary": True, **current}] if current else []
        for key, value in (data.get("custom_fields") or {}).items():
            if value is None:
                person["custom_fields"].pop(key, None)
            else:
                person["custom_fields"][key] = value
        return _hal(self._person(person))

    async def list_tags(self, request: web.Request) -> web.StreamResponse:
        items = [(tid, name) for tid, name in self.tags.items()]
        flt = self._filter(request)
        if flt is not None:
            if flt[0] != "name":
                return _err(400, "Invalid filter")
            items = [(tid, name) for tid, name in items if name == flt[1]]
        return self._collection(
            "osdi:tags",
            [
                {"name": name, "_links": {"self": {"href": self.href(f"tags/{tid}")}}}
                for tid, name in items
            ],
            request,
        )

    async def create_tag(self, request: web.Request) -> web.StreamResponse:
        name = str((await request.json()).get("name", ""))
        if not name:
            return _err(400, "name is required")
        for tid, existing in self.tags.items():
            if existing == name:
                break
        else:
            tid = str(uuid.uuid4())
            self.tags[tid] = name
        return _hal({"name": name, "_links": {"self": {"href": self.href(f"tags/{tid}")}}})

    def _kind(self, request: web.Request) -> str:
        return "forms" if "/forms" in request.path else "petitions"

    async def list_targets(self, request: web.Request) -> web.StreamResponse:
        kind = self._kind(request)
        store = self.forms if kind == "forms" else self.petitions
        items = list(store.values())
        flt = self._filter(request)
        if flt is not None:
            if flt[0] != "identifier":
                return _err(400, "Invalid filter")
            items = [t for t in items if flt[1] in t["identifiers"]]
        return self._collection(f"osdi:{kind}", [self._target(kind, t) for t in items], request)

    async def create_target(self, request: web.Request) -> web.StreamResponse:
        kind = self._kind(request)
        data = await request.json()
        if not data.get("title"):
            return _err(400, "title is required")
        tid = str(uuid.uuid4())
        target = {
            "id": tid,
            "title": data["title"],
            "origin_system": data.get("origin_system"),
            "identifiers": [f"action_network:{tid}", *(data.get("identifiers") or [])],
        }
        (self.forms if kind == "forms" else self.petitions)[tid] = target
        return _hal(self._target(kind, target))

    async def list_records(self, request: web.Request) -> web.StreamResponse:
        kind = "submissions" if "/submissions" in request.path else "signatures"
        items = [
            r for r in self.records if r["kind"] == kind and r["target"] == request.match_info["id"]
        ]
        flt = self._filter(request)
        if flt is not None:
            if flt[0] != "identifier":
                return _err(400, "Invalid filter")
            items = [r for r in items if flt[1] in r["identifiers"]]
        name = f"osdi:{kind}"
        return self._collection(
            name,
            [
                {
                    "identifiers": r["identifiers"],
                    "_links": {
                        "self": {"href": self.href(f"{kind}/{r['id']}")},
                        "osdi:person": {"href": self.href(f"people/{r['person']}")},
                    },
                }
                for r in items
            ],
            request,
        )

    async def record(self, request: web.Request) -> web.StreamResponse:
        kind = "submissions" if "/submissions" in request.path else "signatures"
        store = self.forms if kind == "submissions" else self.petitions
        target = request.match_info["id"]
        if target not in store:
            return _err(404, "Not found")
        data = await request.json()
        href = ((data.get("_links") or {}).get("osdi:person") or {}).get("href")
        person = None
        if href:
            person = self.people.get(str(href).rstrip("/").rsplit("/", 1)[-1])
        elif data.get("person"):
            emails = data["person"].get("email_addresses") or [{}]
            person = self.by_email(str(emails[0].get("address", "")))
        if person is None:
            return _err(400, "A person is required")
        rid = str(uuid.uuid4())
        idents = [f"action_network:{rid}", *(data.get("identifiers") or [])]
        self.records.append(
            {
                "id": rid,
                "kind": kind,
                "target": target,
                "person": person["id"],
                "identifiers": idents,
            }
        )
        for ident in idents:
            if ident.startswith("proca:") and ident.count(":") == 1:
                self.created[ident.split(":", 1)[1]] += 1
        self._apply_tags(person["id"], data.get("add_tags") or ())
        return _hal(
            {"identifiers": idents, "_links": {"self": {"href": self.href(f"{kind}/{rid}")}}}
        )


STRIPPED: dict[str, Any] = {
    "given_name": None,
    "family_name": None,
    "postal_code": None,
    "country": None,
    "status": "unsubscribed",
    "tags": [],
}
"""A person as the connector's erasure leaves them (names, postal address and tags gone,
unsubscribed)."""


class ActionNetworkDriver(Driver):

    erasure_keeps_address = True
    """The API cannot delete a person: erasure strips the data and unsubscribes."""
    type = "actionnetwork"
    rate_limit = 4.0
    """The documented requests per second (the emulator's quota when rate-limited)."""
    key_env = "PROCA_TEST_ACTIONNETWORK_KEY"
    key = "an-test-key-0123"

    def make(self, *, latency: float = 0.0, rate_limited: bool = True) -> ActionNetworkEmulator:
        return ActionNetworkEmulator(
            latency=latency,
            limit=WindowLimit(4, 1.0) if rate_limited else None,
            token=self.key,
        )

    def config(self, emulator: Emulator) -> dict[str, Any]:
        return {
            "type": "actionnetwork",
            "base_url": f"{emulator.url}/api/v2/",
            "api_key_env": self.key_env,
        }

    def snapshot(self, emulator: Emulator) -> dict[str, Any]:
        assert isinstance(emulator, ActionNetworkEmulator)
        out = {}
        for person in emulator.people.values():
            email = person["email_addresses"][0]["address"]
            postal = person["postal_addresses"][0] if person["postal_addresses"] else {}
            row = {
                "given_name": person.get("given_name"),
                "family_name": person.get("family_name"),
                "postal_code": postal.get("postal_code"),
                "country": postal.get("country"),
                "status": person["email_addresses"][0]["status"],
                "tags": emulator.tags_of(email),
            }
            if row == STRIPPED:
                # What an erasure or a retired address leaves (the API cannot delete a
                # person; the docs page leaves the rest to an administrator): no longer a
                # contact of the account. A ledger contact stripped by mistake still shows
                # up, as missing from the snapshot.
                continue
            out[email] = row
        activities: dict[str, list[Any]] = {}
        emails = {p["id"]: p["email_addresses"][0]["address"] for p in emulator.people.values()}
        for record in emulator.records:
            for ident in record["identifiers"]:
                if ident.startswith("proca:") and ident.count(":") == 1:
                    activities.setdefault(ident.split(":", 1)[1], []).append(
                        [emails.get(record["person"]), record["kind"]]
                    )
        return {"contacts": out, "activities": activities}

    def expected(self, export: dict[str, Any], config: dict[str, Any]) -> dict[str, Any]:
        testing = bool(config.get("include_testing"))
        campaign_tag = config.get("campaign_tag", "proca:{campaign}")
        action_tag = config.get("action_tag", "proca:{action_type}")
        petition_types = config.get("petition_types", ["register", "petition"])
        out = {}
        activities: dict[str, list[Any]] = {}
        for c in export["contacts"]:
            if not c.get("email") or (c.get("testing") and not testing):
                continue
            tags = set()
            for a in c.get("actions") or ():
                if a.get("testing") and not testing:
                    continue
                tags.add(campaign_tag.format(campaign=a["campaign"]))
                tags.add(action_tag.format(action_type=a["actionType"]))
                kind = "signatures" if a["actionType"] in petition_types else "submissions"
                activities[str(a["actionId"])] = [[c["email"], kind]]
            sub = subscription_of(c)
            out[c["email"]] = {
                "given_name": c.get("firstName") or None,
                "family_name": c.get("lastName") or None,
                "postal_code": c.get("postcode") or None,
                "country": c.get("country") or None,
                "status": "subscribed" if sub == "subscribed" else "unsubscribed",
                "tags": sorted(tags),
            }
        return {"contacts": out, "activities": activities}

    def refuse(self, emulator: Emulator, email: str) -> None:
        """Make the group refuse this address (the parking test)."""
        assert isinstance(emulator, ActionNetworkEmulator)
        emulator.call(lambda: emulator.refused.add(email.strip().lower()))


DRIVER = ActionNetworkDriver()
