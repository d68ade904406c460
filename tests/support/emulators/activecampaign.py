"""ActiveCampaign API v3 as documented (developers.activecampaign.com: contact sync,
contactLists, tags, contactTags, fields, contacts list filters, bulk import and import
info; help centre "Use the Bulk Contact Importer API"), for the tests.

Contract reproduced: ``Api-Token`` header (403 ``{"message": "No Result found…"}``-style
answers otherwise); ``POST /contact/sync`` 201 created / 200 updated, 422
``{errors: [{title, detail, code, source}]}`` on an invalid address; list status 1/2 set
by ``contactLists`` — including 2 → 1, which re-subscribes (the API does not protect an
unsubscribed person: the connector must); tags by name; ``contactTags`` adding an existing
tag returns the existing link; bulk import ≤250 contacts, answered at once with a
``batchId`` and applied asynchronously (``import/info`` reports ``waiting`` then
``completed`` with ``success`` ids of new contacts and ``failure`` e-mails; tags named in
an import are created when missing); 5 requests/s answered 429 with ``Retry-After`` and
``RateLimit-Limit`` / ``RateLimit-Remaining``, bulk imports at most 100 a minute.
"""

from __future__ import annotations

import asyncio
import re
import time
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from aiohttp import web

from tests.support.emulators.base import Driver, Emulator, WindowLimit
from tests.support.saas_views import subscription_of

EMAIL = re.compile(r"^[^@\s]+@[^@\s]+\.[^@\s]+$")
LIST_ID = 3
FIELD_MAPPING = {"postcode": "Postcode", "country": "COUNTRY"}
"""A ``fields`` table naming the emulator's custom fields by title and by perstag."""
FIELDS = {
    "1": {"title": "Postcode", "perstag": "POSTCODE"},
    "2": {"title": "Country", "perstag": "COUNTRY"},
}


def _errors(status: int, title: str, code: str, pointer: str = "") -> web.Response:
    return web.json_response(
        {"errors": [{"title": title, "detail": "", "code": code, "source": {"pointer": pointer}}]},
        status=status,
    )


@dataclass
class ActiveCampaignEmulator(Emulator):
    token: str = "ac-test-token"
    import_delay: float = 0.1
    import_limit: WindowLimit | None = None
    lists: dict[str, str] = field(default_factory=lambda: {str(LIST_ID): "Supporters"})
    fields: dict[str, dict[str, str]] = field(default_factory=lambda: dict(FIELDS))
    contacts: dict[str, dict[str, Any]] = field(default_factory=dict)
    list_status: dict[tuple[str, str], int] = field(default_factory=dict)
    tags: dict[str, str] = field(default_factory=dict)
    contact_tags: set[tuple[str, str]] = field(default_factory=set)
    imports: dict[str, dict[str, Any]] = field(default_factory=dict)
    refused: set[str] = field(default_factory=set)
    """Addresses this account refuses, for the parking tests."""

    def __post_init__(self) -> None:
        super().__post_init__()
        self._ids = 100
        self._by_email: dict[str, str] = {}
        """Address → contact id (addresses never change once created)."""

    def touch(self, cid: str) -> None:
        """Any change to a contact (fields, list status, tags) moves its ``udate``."""
        self.contacts[cid]["udate"] = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S+00:00")

    def _next(self) -> str:
        self._ids += 1
        return str(self._ids)

    def authorised(self, request: web.Request) -> bool:
        return request.headers.get("Api-Token") == self.token

    def unauthorised(self) -> web.StreamResponse:
        return web.json_response(
            {"message": "You are not authorized to access this resource"}, status=403
        )

    def throttled(self, retry_after: float) -> web.StreamResponse:
        return web.json_response(
            {"message": "Too Many Requests"},
            status=429,
            headers={
                "Retry-After": str(max(1, round(retry_after + 0.499))),
                "RateLimit-Limit": str(self.limit.limit if self.limit else 5),
                "RateLimit-Remaining": "0",
            },
        )

    def routes(self, app: web.Application) -> None:
        r = app.router
        r.add_get("/api/3/lists/{id}", self.get_list)
        r.add_get("/api/3/fields", self.get_fields)
        r.add_get("/api/3/contacts", self.list_contacts)
        r.add_post("/api/3/contact/sync", self.sync)
        r.add_delete("/api/3/contacts/{id}", self.delete_contact)
        r.add_post("/api/3/contactLists", self.contact_list)
        r.add_get("/api/3/tags", self.search_tags)
        r.add_post("/api/3/tags", self.create_tag)
        r.add_get("/api/3/contacts/{id}/contactTags", self.get_contact_tags)
        r.add_post("/api/3/contactTags", self.add_contact_tag)
        r.add_post("/api/3/import/bulk_import", self.bulk_import)
        r.add_get("/api/3/import/info", self.import_info)

    # ---- model -------------------------------------------------------------------------

    def by_email(self, email: str) -> dict[str, Any] | None:
        # An index, not a scan of every contact: a 100,000-contact backfill looked each
        # address up in all the contacts before it (quadratic: the emulator, not the
        # connector, was the bound). A contact's address never changes once created.
        email = email.strip().lower()
        index = self._by_email
        if len(index) < len(self.contacts):  # contacts added some other way
            index.clear()
            index.update(
                {str(c["email"]): cid for cid, c in self.contacts.items()}
            )
        cid = index.get(email)
        contact = None if cid is None else self.contacts.get(cid)
        if contact is None or contact["email"] != email:
            index.pop(email, None)  # deleted (or never there)
            return None
        return contact

    def _upsert(
        self, email: str, values: dict[str, str], custom: dict[str, str]
    ) -> tuple[dict[str, Any], bool]:
        contact = self.by_email(email)
        created = contact is None
        if contact is None:
            contact = {
                "id": self._next(),
                "email": email.strip().lower(),
                "firstName": "",
                "lastName": "",
                "phone": "",
                "fields": {},
            }
            self.contacts[contact["id"]] = contact
            self._by_email[email.strip().lower()] = contact["id"]
        contact.update({k: v for k, v in values.items() if v is not None})
        contact["fields"].update(custom)
        self.touch(contact["id"])
        return contact, created

    def _tag(self, name: str) -> str:
        for tid, existing in self.tags.items():
            if existing.lower() == name.lower():
                return tid
        tid = self._next()
        self.tags[tid] = name
        return tid

    def unsubscribe_in_app(self, email: str) -> None:
        """The person unsubscribes through ActiveCampaign (an unsubscribe link)."""
        contact = self.by_email(email)
        assert contact is not None
        self.list_status[(contact["id"], str(LIST_ID))] = 2
        self.touch(contact["id"])

    def tags_of(self, email: str) -> list[str]:
        contact = self.by_email(email)
        if contact is None:
            return []
        return sorted(self.tags[t] for c, t in self.contact_tags if c == contact["id"])

    def _public(self, contact: dict[str, Any]) -> dict[str, Any]:
        return {k: v for k, v in contact.items() if k != "fields"}

    # ---- routes ------------------------------------------------------------------------

    async def get_list(self, request: web.Request) -> web.StreamResponse:
        lid = request.match_info["id"]
        if lid not in self.lists:
            return web.json_response(
                {"message": f"No Result found for List with id {lid}"}, status=404
            )
        return web.json_response({"list": {"id": lid, "name": self.lists[lid]}})

    async def get_fields(self, request: web.Request) -> web.StreamResponse:
        limit = int(request.query.get("limit", "20"))
        offset = int(request.query.get("offset", "0"))
        rows = [{"id": fid, "type": "text", **meta} for fid, meta in sorted(self.fields.items())]
        return web.json_response(
            {"fields": rows[offset : offset + limit], "meta": {"total": str(len(rows))}}
        )

    async def list_contacts(self, request: web.Request) -> web.StreamResponse:
        q = request.query
        rows = list(self.contacts.values())
        if "email" in q:
            rows = [c for c in rows if c["email"] == q["email"].strip().lower()]
        if "listid" in q:
            lid = q["listid"]
            rows = [c for c in rows if (c["id"], lid) in self.list_status]
            if "status" in q and q["status"] != "-1":
                rows = [c for c in rows if str(self.list_status[(c["id"], lid)]) == q["status"]]
        if "filters[updated_after]" in q:
            since = datetime.fromisoformat(q["filters[updated_after]"])
            rows = [c for c in rows if datetime.fromisoformat(c["udate"]) > since]
        limit = min(100, int(q.get("limit", "20")))
        offset = int(q.get("offset", "0"))
        page = [self._public(c) for c in rows[offset : offset + limit]]
        return web.json_response({"contacts": page, "meta": {"total": str(len(rows))}})

    async def sync(self, request: web.Request) -> web.StreamResponse:
        body = (await request.json()).get("contact") or {}
        email = str(body.get("email", ""))
        if not EMAIL.match(email.strip()) or email.strip().lower() in self.refused:
            return _errors(
                422, "Email address is not valid.", "email_invalid", "/data/attributes/email"
            )
        custom = {}
        for fv in body.get("fieldValues") or ():
            fid = str(fv.get("field"))
            if fid not in self.fields:
                return _errors(422, "Field does not exist", "field_missing")
            custom[fid] = str(fv.get("value"))
        values = {k: body.get(k) for k in ("firstName", "lastName", "phone")}
        contact, created = self._upsert(email, values, custom)
        field_values = [
            {"contact": contact["id"], "field": f, "value": v} for f, v in contact["fields"].items()
        ]
        return web.json_response(
            {"contact": self._public(contact), "fieldValues": field_values},
            status=201 if created else 200,
        )

    async def delete_contact(self, request: web.Request) -> web.StreamResponse:
        cid = request.match_info["id"]
        if cid not in self.contacts:
            return web.json_response(
                {"message": f"No Result found for Subscriber with id {cid}"}, status=404
            )
        del self.contacts[cid]
        for key in [k for k in self.list_status if k[0] == cid]:
            del self.list_status[key]
        self.contact_tags = {ct for ct in self.contact_tags if ct[0] != cid}
        return web.json_response({})

    async def contact_list(self, request: web.Request) -> web.StreamResponse:
        body = (await request.json()).get("contactList") or {}
        cid, lid = str(body.get("contact")), str(body.get("list"))
        status = int(body.get("status", 0))
        if cid not in self.contacts or lid not in self.lists or status not in (1, 2):
            return _errors(422, "Invalid contactList", "invalid")
        self.list_status[(cid, lid)] = status  # 2 → 1 re-subscribes: the API allows it
        self.touch(cid)
        return web.json_response(
            {
                "contacts": [self._public(self.contacts[cid])],
                "contactList": {"contact": cid, "list": lid, "status": str(status)},
            }
        )

    async def search_tags(self, request: web.Request) -> web.StreamResponse:
        term = request.query.get("search", "").lower()
        rows = [
            {"id": tid, "tag": name, "tagType": "contact"}
            for tid, name in self.tags.items()
            if term in name.lower()
        ]
        return web.json_response({"tags": rows, "meta": {"total": str(len(rows))}})

    async def create_tag(self, request: web.Request) -> web.StreamResponse:
        body = (await request.json()).get("tag") or {}
        name = str(body.get("tag", ""))
        if not name:
            return _errors(422, "Tag name is required", "required")
        if any(existing.lower() == name.lower() for existing in self.tags.values()):
            return _errors(422, "Tag already exists", "duplicate")
        tid = self._tag(name)
        return web.json_response(
            {"tag": {"id": tid, "tag": name, "tagType": "contact"}}, status=201
        )

    async def get_contact_tags(self, request: web.Request) -> web.StreamResponse:
        cid = request.match_info["id"]
        rows = [
            {"contact": c, "tag": t, "id": f"{c}-{t}"} for c, t in self.contact_tags if c == cid
        ]
        return web.json_response({"contactTags": rows})

    async def add_contact_tag(self, request: web.Request) -> web.StreamResponse:
        body = (await request.json()).get("contactTag") or {}
        cid, tid = str(body.get("contact")), str(body.get("tag"))
        if cid not in self.contacts or tid not in self.tags:
            return _errors(422, "Invalid contactTag", "invalid")
        self.contact_tags.add((cid, tid))
        self.touch(cid)
        return web.json_response(
            {"contactTag": {"contact": cid, "tag": tid, "id": f"{cid}-{tid}"}}, status=201
        )

    async def bulk_import(self, request: web.Request) -> web.StreamResponse:
        if self.import_limit is not None:
            wait = self.import_limit.admit(time.monotonic())
            if wait is not None:
                return self.throttled(wait)
        body = await request.json()
        rows = body.get("contacts")
        if not isinstance(rows, list) or not rows:
            return web.json_response(
                {
                    "success": 0,
                    "message": "contacts is required",
                    "failureReasons": ["contacts is required"],
                },
                status=400,
            )
        if len(rows) > 250:
            return web.json_response(
                {
                    "success": 0,
                    "message": "Too many contacts",
                    "failureReasons": ["A maximum of 250 contacts may be imported per request"],
                },
                status=400,
            )
        batch_id = str(uuid.uuid4())
        self.imports[batch_id] = {"status": "waiting", "success": [], "failure": []}
        asyncio.get_running_loop().call_later(self.import_delay, self._apply, batch_id, rows)
        return web.json_response(
            {
                "success": 1,
                "queued_contacts": len(rows),
                "batchId": batch_id,
                "message": "Contact import queued",
            }
        )

    def _apply(self, batch_id: str, rows: list[dict[str, Any]]) -> None:
        job = self.imports[batch_id]
        for row in rows:
            email = str(row.get("email", ""))
            if not EMAIL.match(email.strip()) or email.strip().lower() in self.refused:
                job["failure"].append(email)
                continue
            custom = {
                str(f["id"]): str(f["value"])
                for f in row.get("fields") or ()
                if str(f.get("id")) in self.fields
            }
            values = {
                "firstName": row.get("first_name"),
                "lastName": row.get("last_name"),
                "phone": row.get("phone"),
            }
            contact, created = self._upsert(email, values, custom)
            if created:
                job["success"].append(contact["id"])
            for name in row.get("tags") or ():
                self.contact_tags.add((contact["id"], self._tag(str(name))))
            for sub in row.get("subscribe") or ():
                if str(sub.get("listid")) in self.lists:
                    self.list_status[(contact["id"], str(sub["listid"]))] = 1
            for sub in row.get("unsubscribe") or ():
                if str(sub.get("listid")) in self.lists:
                    self.list_status[(contact["id"], str(sub["listid"]))] = 2
            self.touch(contact["id"])
        job["status"] = "completed"

    async def import_info(self, request: web.Request) -> web.StreamResponse:
        job = self.imports.get(request.query.get("batchId", ""))
        if job is None:
            return web.json_response({"message": "No Result found"}, status=404)
        return web.json_response(dict(job))


class ActiveCampaignDriver(Driver):
    type = "activecampaign"
    rate_limit = 5.0
    """The documented requests per second (the emulator's quota when rate-limited)."""
    key_env = "PROCA_TEST_ACTIVECAMPAIGN_KEY"
    key = "ac-test-token-0123"

    def make(self, *, latency: float = 0.0, rate_limited: bool = True) -> ActiveCampaignEmulator:
        return ActiveCampaignEmulator(
            latency=latency,
            limit=WindowLimit(5, 1.0) if rate_limited else None,
            import_limit=WindowLimit(100, 60.0) if rate_limited else None,
            token=self.key,
        )

    def config(self, emulator: Emulator) -> dict[str, Any]:
        return {
            "type": "activecampaign",
            "base_url": emulator.url,
            "api_key_env": self.key_env,
            "list_id": LIST_ID,
            # no table-valued key: the contract suite writes this table as flat TOML;
            # the custom-field mapping is exercised by test_destination_activecampaign
        }

    def snapshot(self, emulator: Emulator) -> dict[str, Any]:
        assert isinstance(emulator, ActiveCampaignEmulator)
        out = {}
        for contact in emulator.contacts.values():
            out[contact["email"]] = {
                "firstName": contact["firstName"],
                "lastName": contact["lastName"],
                "phone": contact["phone"],
                "fields": dict(sorted(contact["fields"].items())),
                "list": emulator.list_status.get((contact["id"], str(LIST_ID))),
                "tags": emulator.tags_of(contact["email"]),
            }
        return {"contacts": out}

    def expected(self, export: dict[str, Any], config: dict[str, Any]) -> dict[str, Any]:
        testing = bool(config.get("include_testing"))
        names = {"postcode": "1", "country": "2"}  # the emulator's Postcode / Country fields
        campaign_tag = config.get("campaign_tag", "proca:{campaign}")
        action_tag = config.get("action_tag", "proca:{action_type}")
        out = {}
        for c in export["contacts"]:
            if not c.get("email") or (c.get("testing") and not testing):
                continue
            fields = {}
            for source in config.get("fields") or {}:
                value = c.get(source) if source in c else (c.get("fields") or {}).get(source)
                if value not in (None, ""):
                    fields[names[source]] = str(value)
            tags = set()
            for a in c.get("actions") or ():
                if a.get("testing") and not testing:
                    continue
                tags.add(campaign_tag.format(campaign=a["campaign"]))
                tags.add(action_tag.format(action_type=a["actionType"]))
            sub = subscription_of(c)
            phone = (c.get("fields") or {}).get("phone")
            out[c["email"]] = {
                "firstName": c.get("firstName") or "",
                "lastName": c.get("lastName") or "",
                "phone": str(phone) if phone not in (None, "") else "",
                "fields": dict(sorted(fields.items())),
                "list": {"subscribed": 1, "unsubscribed": 2}.get(sub),
                "tags": sorted(tags),
            }
        return {"contacts": out}

    def refuse(self, emulator: Emulator, email: str) -> None:
        """Make the account refuse this address (the parking test)."""
        assert isinstance(emulator, ActiveCampaignEmulator)
        emulator.call(lambda: emulator.refused.add(email.strip().lower()))


DRIVER = ActiveCampaignDriver()
