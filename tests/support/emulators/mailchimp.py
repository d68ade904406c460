"""Mailchimp Marketing API 3.0, the endpoints a list sync uses, from Mailchimp's public
reference (members, batch subscribe, static segments/tags, member events, GDPR delete).

Contract reproduced:
* HTTP Basic auth, any user name, the API key as password; 401 problem+json otherwise.
* Errors are problem+json ``{type, title, status, detail, instance}``.
* ``PUT /lists/{id}/members/{hash}``: the hash must be the MD5 of the lower-case address;
  ``status_if_new`` is required for a new member; ``status`` changes an existing one; 200
  with the member either way.
* ``POST /lists/{id}`` (batch subscribe): ≤ 500 members, answers 200 even when some
  failed, with ``new_members``, ``updated_members`` and ``errors[{email_address, error,
  error_code}]``; ``ERROR_CONTACT_EXISTS`` for existing members without
  ``update_existing``.
* A member who is unsubscribed or cleaned cannot be set back to ``subscribed`` by the API:
  400 "Member In Compliance State" (in a batch: an ``errors[]`` entry); ``pending`` is
  accepted (Mailchimp sends its confirmation e-mail).
* ``POST …/actions/delete-permanent``: the address is forgotten; adding it again is
  refused with "Forgotten Email Not Subscribed".
* Static segments (tags): list, create, ``members_to_add`` ≤ 500 with ``errors[]``.
* Member events: ``name`` 2–30 characters, 204; listed by ``GET …/events``.
* Batch operations: ``POST /batches`` with ``operations[{method, path, operation_id,
  body}]`` answers at once (``pending``), applies them later; ``GET /batches/{id}`` reports
  ``pending`` → ``started`` → ``finished`` with ``errored_operations`` and
  ``response_body_url``, a pre-signed link (no credentials) to a gzipped tar of JSON
  arrays ``[{status_code, operation_id, response}]``. Member events only, here.
* 10 simultaneous connections per key: the 11th gets 429 "Too Many Requests", with no
  rate headers (Mailchimp sends none).
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import io
import itertools
import json
import re
import tarfile
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

from proca_sync.destinations.mailchimp import member_status
from tests.support.emulators.base import Driver, Emulator
from tests.support.emulators.export import pushed

EMAIL = re.compile(r"^[^@\s]+@[^@\s]+\.[^@\s]+$")
STATUSES = {"subscribed", "unsubscribed", "cleaned", "pending", "transactional"}


def md5(email: str) -> str:
    return hashlib.md5(email.strip().lower().encode(), usedforsecurity=False).hexdigest()


def problem(status: int, title: str, detail: str) -> web.Response:
    return web.json_response(
        {
            "type": "https://mailchimp.com/developer/marketing/docs/errors/",
            "title": title,
            "status": status,
            "detail": detail,
            "instance": "emulator",
        },
        status=status,
        content_type="application/problem+json",
    )


@dataclass
class MailchimpEmulator(Emulator):
    key: str = "emulatorkey-us6"
    list_id: str = "a1b2c3d4e5"
    members: dict[str, dict[str, Any]] = field(default_factory=dict)
    forgotten: set[str] = field(default_factory=set)
    segments: dict[int, dict[str, Any]] = field(default_factory=dict)
    reject: set[str] = field(default_factory=set)
    """Addresses Mailchimp refuses as fake ("Invalid Resource"), besides malformed ones."""
    batch_delay: float = 0.05
    """Seconds before a batch operation is applied."""

    def __post_init__(self) -> None:
        super().__post_init__()
        self._ids = itertools.count(1001)
        self.batches: dict[str, dict[str, Any]] = {}
        self._archives: dict[str, bytes] = {}

    # ---- contract --------------------------------------------------------------------

    def authorised(self, request: web.Request) -> bool:
        if request.path.startswith("/batch-results/"):
            return True  # a pre-signed download link
        header = request.headers.get("Authorization", "")
        if not header.startswith("Basic "):
            return False
        try:
            _, _, password = base64.b64decode(header[6:]).decode().partition(":")
        except ValueError:
            return False
        return password == self.key

    def unauthorised(self) -> web.StreamResponse:
        return problem(401, "API Key Invalid", "Your API key may be invalid.")

    def throttled(self, retry_after: float) -> web.StreamResponse:
        return problem(
            429, "Too Many Requests", "You have exceeded the limit of 10 simultaneous connections."
        )

    def failed(self, fault: Any) -> web.StreamResponse:
        return problem(fault.status or 500, "Internal Server Error", "An unexpected error.")

    def routes(self, app: web.Application) -> None:
        base = "/3.0/lists/{list_id}"
        app.router.add_get(base, self.get_list)
        app.router.add_post(base, self.batch_subscribe)
        app.router.add_get(base + "/members/{hash}", self.get_member)
        app.router.add_put(base + "/members/{hash}", self.put_member)
        app.router.add_delete(base + "/members/{hash}", self.archive_member)
        app.router.add_post(base + "/members/{hash}/actions/delete-permanent", self.forget)
        app.router.add_post(base + "/members/{hash}/events", self.post_event)
        app.router.add_get(base + "/members/{hash}/events", self.get_events)
        app.router.add_get(base + "/segments", self.get_segments)
        app.router.add_post(base + "/segments", self.create_segment)
        app.router.add_post(base + "/segments/{segment}", self.update_segment)
        app.router.add_post("/3.0/batches", self.create_batch)
        app.router.add_get("/3.0/batches/{batch_id}", self.get_batch)
        app.router.add_get("/batch-results/{batch_id}.tar.gz", self.batch_archive)

    def _list(self, request: web.Request) -> None:
        if request.match_info["list_id"] != self.list_id:
            raise NotFound()

    def _member_or_404(self, request: web.Request) -> dict[str, Any]:
        self._list(request)
        member = self.members.get(request.match_info["hash"])
        if member is None or member["status"] == "archived":
            raise NotFound()
        return member

    async def get_list(self, request: web.Request) -> web.StreamResponse:
        self._list(request)
        return web.json_response({"id": self.list_id, "name": "Emulated audience"})

    def _upsert(self, body: dict[str, Any], *, new_status: str | None, status: str | None) -> str:
        """Apply one member write; return "" on success or the refusal's title."""
        email = str(body.get("email_address") or "").strip()
        if not EMAIL.match(email) or email.lower() in self.reject:
            return "Invalid Resource"
        hashed = md5(email)
        if hashed in self.forgotten:
            return "Forgotten Email Not Subscribed"
        member = self.members.get(hashed)
        if member is None or member["status"] == "archived":
            wanted = status or new_status
            if wanted not in STATUSES:
                return "Invalid Resource"
            member = {
                "email_address": email.lower(),
                "status": wanted,
                "merge_fields": {},
                "tags": set(),
                "events": [],
            }
            self.members[hashed] = member
        elif status is not None:
            if status not in STATUSES:
                return "Invalid Resource"
            if status == "subscribed" and member["status"] in {"unsubscribed", "cleaned"}:
                return "Member In Compliance State"
            member["status"] = status
        member["merge_fields"].update(body.get("merge_fields") or {})
        return ""

    async def put_member(self, request: web.Request) -> web.StreamResponse:
        self._list(request)
        body = await request.json()
        email = str(body.get("email_address") or "")
        if md5(email) != request.match_info["hash"]:
            return problem(400, "Invalid Resource", "The subscriber hash does not match.")
        existing = self.members.get(md5(email))
        if (existing is None or existing["status"] == "archived") and not (
            body.get("status_if_new") or body.get("status")
        ):
            return problem(400, "Invalid Resource", "status_if_new is required.")
        refused = self._upsert(
            body, new_status=body.get("status_if_new"), status=body.get("status")
        )
        if refused:
            return problem(400, refused, _detail(refused))
        return web.json_response(self._public(self.members[md5(email)]))

    async def batch_subscribe(self, request: web.Request) -> web.StreamResponse:
        self._list(request)
        body = await request.json()
        members = body.get("members") or []
        if len(members) > 500:
            return problem(400, "Invalid Resource", "At most 500 members per call.")
        update = bool(body.get("update_existing"))
        new, updated, errors = [], [], []
        for item in members:
            email = str(item.get("email_address") or "")
            hashed = md5(email) if email else ""
            existing = self.members.get(hashed)
            exists = existing is not None and existing["status"] != "archived"
            if exists and not update:
                errors.append(
                    {
                        "email_address": email,
                        "error": f"{email} is already a list member.",
                        "error_code": "ERROR_CONTACT_EXISTS",
                    }
                )
                continue
            status = item.get("status")
            refused = self._upsert(item, new_status=status, status=status)
            if refused:
                errors.append(
                    {
                        "email_address": email,
                        "error": _detail(refused, email),
                        "error_code": "ERROR_GENERIC",
                    }
                )
                continue
            (updated if exists else new).append(self._public(self.members[hashed]))
        return web.json_response(
            {
                "new_members": new,
                "updated_members": updated,
                "errors": errors,
                "total_created": len(new),
                "total_updated": len(updated),
                "error_count": len(errors),
            }
        )

    async def get_member(self, request: web.Request) -> web.StreamResponse:
        return web.json_response(self._public(self._member_or_404(request)))

    async def archive_member(self, request: web.Request) -> web.StreamResponse:
        self._member_or_404(request)["status"] = "archived"
        return web.Response(status=204)

    async def forget(self, request: web.Request) -> web.StreamResponse:
        self._member_or_404(request)
        hashed = request.match_info["hash"]
        del self.members[hashed]
        self.forgotten.add(hashed)
        for segment in self.segments.values():
            segment["members"].discard(hashed)
        return web.Response(status=204)

    async def post_event(self, request: web.Request) -> web.StreamResponse:
        member = self._member_or_404(request)
        body = await request.json()
        name = str(body.get("name") or "")
        if not 2 <= len(name) <= 30:
            return problem(400, "Invalid Resource", "The event name must be 2-30 characters.")
        member["events"].append(
            {
                "name": name,
                "properties": body.get("properties") or {},
                "occurred_at": body.get("occurred_at"),
            }
        )
        return web.Response(status=204)

    async def create_batch(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()
        operations = body.get("operations")
        if not isinstance(operations, list) or not operations:
            return problem(400, "Invalid Resource", "operations is required.")
        batch_id = f"b{next(self._ids)}"
        self.batches[batch_id] = {
            "id": batch_id,
            "status": "pending",
            "total_operations": len(operations),
            "finished_operations": 0,
            "errored_operations": 0,
            "response_body_url": "",
        }
        asyncio.get_running_loop().call_later(
            self.batch_delay, self._apply_batch, batch_id, operations
        )
        return web.json_response(self.batches[batch_id])

    def _apply_batch(self, batch_id: str, operations: list[dict[str, Any]]) -> None:
        results = []
        pattern = re.compile(rf"^/?lists/{self.list_id}/members/([0-9a-f]{{32}})/events$")
        for op in operations:
            match = pattern.match(str(op.get("path", "")))
            member = self.members.get(match.group(1)) if match else None
            body = json.loads(op.get("body") or "{}")
            name = str(body.get("name") or "")
            if op.get("method") != "POST" or member is None or member["status"] == "archived":
                status, response = 404, {"title": "Resource Not Found", "status": 404}
            elif not 2 <= len(name) <= 30:
                status, response = 400, {"title": "Invalid Resource", "status": 400}
            else:
                member["events"].append(
                    {
                        "name": name,
                        "properties": body.get("properties") or {},
                        "occurred_at": body.get("occurred_at"),
                    }
                )
                status, response = 204, {}
            results.append(
                {
                    "status_code": status,
                    "operation_id": op.get("operation_id"),
                    "response": json.dumps(response),
                }
            )
        buffer = io.BytesIO()
        with tarfile.open(fileobj=buffer, mode="w:gz") as archive:
            data = json.dumps(results).encode()
            info = tarfile.TarInfo(f"{batch_id}/results.json")
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
        self._archives[batch_id] = buffer.getvalue()
        self.batches[batch_id].update(
            status="finished",
            finished_operations=len(operations),
            errored_operations=sum(1 for r in results if r["status_code"] >= 400),
            response_body_url=f"{self.url}/batch-results/{batch_id}.tar.gz",
        )

    async def get_batch(self, request: web.Request) -> web.StreamResponse:
        batch = self.batches.get(request.match_info["batch_id"])
        if batch is None:
            raise NotFound()
        return web.json_response(batch)

    async def batch_archive(self, request: web.Request) -> web.StreamResponse:
        archive = self._archives.get(request.match_info["batch_id"])
        if archive is None:
            raise NotFound()
        return web.Response(body=archive, content_type="application/x-gzip")

    async def get_events(self, request: web.Request) -> web.StreamResponse:
        member = self._member_or_404(request)
        offset = int(request.query.get("offset", "0"))
        count = int(request.query.get("count", "10"))
        events = member["events"]
        return web.json_response(
            {"events": events[offset : offset + count], "total_items": len(events)}
        )

    async def get_segments(self, request: web.Request) -> web.StreamResponse:
        self._list(request)
        offset = int(request.query.get("offset", "0"))
        count = int(request.query.get("count", "10"))
        rows = [
            {"id": sid, "name": s["name"], "type": "static", "member_count": len(s["members"])}
            for sid, s in sorted(self.segments.items())
        ]
        return web.json_response(
            {"segments": rows[offset : offset + count], "total_items": len(rows)}
        )

    async def create_segment(self, request: web.Request) -> web.StreamResponse:
        self._list(request)
        body = await request.json()
        name = str(body.get("name") or "")
        if not name or any(s["name"] == name for s in self.segments.values()):
            return problem(400, "Invalid Resource", "A tag with that name already exists.")
        sid = next(self._ids)
        self.segments[sid] = {"name": name, "members": set()}
        return web.json_response({"id": sid, "name": name, "type": "static", "member_count": 0})

    async def update_segment(self, request: web.Request) -> web.StreamResponse:
        self._list(request)
        segment = self.segments.get(int(request.match_info["segment"]))
        if segment is None:
            return problem(404, "Resource Not Found", "The requested resource could not be found.")
        body = await request.json()
        adds = body.get("members_to_add") or []
        removes = body.get("members_to_remove") or []
        if len(adds) > 500 or len(removes) > 500:
            return problem(400, "Invalid Resource", "At most 500 members per call.")
        added, removed, missing = [], [], []
        for email in adds:
            hashed = md5(str(email))
            member = self.members.get(hashed)
            if member is None or member["status"] == "archived":
                missing.append(email)
                continue
            if hashed not in segment["members"]:
                segment["members"].add(hashed)
                added.append(self._public(member))
        for email in removes:
            hashed = md5(str(email))
            if hashed in segment["members"]:
                segment["members"].discard(hashed)
                removed.append(self._public(self.members[hashed]))
        errors = (
            [{"email_addresses": missing, "error": "Email addresses not on list"}]
            if missing
            else []
        )
        return web.json_response(
            {
                "members_added": added,
                "members_removed": removed,
                "errors": errors,
                "total_added": len(added),
                "total_removed": len(removed),
                "error_count": len(missing),
            }
        )

    def _public(self, member: dict[str, Any]) -> dict[str, Any]:
        hashed = md5(member["email_address"])
        return {
            "id": hashed,
            "email_address": member["email_address"],
            "status": member["status"],
            "merge_fields": member["merge_fields"],
            "tags": [
                {"id": sid, "name": s["name"]}
                for sid, s in sorted(self.segments.items())
                if hashed in s["members"]
            ],
        }

    # ---- observation -----------------------------------------------------------------

    def state(self) -> dict[str, dict[str, Any]]:
        """Members that are not archived, keyed by address, normalised for comparison."""
        out = {}
        for hashed, member in self.members.items():
            if member["status"] == "archived":
                continue
            out[member["email_address"]] = {
                "status": "subscribed" if member["status"] == "pending" else member["status"],
                "merge_fields": dict(sorted(member["merge_fields"].items())),
                "tags": sorted(s["name"] for s in self.segments.values() if hashed in s["members"]),
                "events": sorted(int(e["properties"]["action_id"]) for e in member["events"]),
            }
        return out


class NotFound(web.HTTPNotFound):
    """Mailchimp's 404 problem document."""

    def __init__(self) -> None:
        super().__init__(
            text='{"title":"Resource Not Found","status":404,'
            '"detail":"The requested resource could not be found."}',
            content_type="application/problem+json",
        )


def _detail(title: str, email: str = "the address") -> str:
    return {
        "Member In Compliance State": f"{email} is in a compliance state due to unsubscribe, "
        "bounce, or compliance review and cannot be subscribed.",
        "Forgotten Email Not Subscribed": f"{email} was permanently deleted and cannot be "
        "re-imported. The contact must re-subscribe to get back on the list.",
        "Invalid Resource": f"{email} looks fake or invalid, please enter a real email address.",
    }.get(title, title)


class MailchimpDriver(Driver):
    type = "mailchimp"
    key_env = "PROCA_TEST_MAILCHIMP_KEY"
    key = "emulatorkey-us6"

    def make(self, *, latency: float = 0.0, rate_limited: bool = True) -> MailchimpEmulator:
        return MailchimpEmulator(
            latency=latency, concurrency=10 if rate_limited else None, key=self.key
        )

    def config(self, emulator: Emulator) -> dict[str, Any]:
        assert isinstance(emulator, MailchimpEmulator)
        return {
            "type": "mailchimp",
            "base_url": f"{emulator.url}/3.0",
            "api_key_env": self.key_env,
            "list_id": emulator.list_id,
            # The contract suite re-creates an erased contact from a newer action: archive
            # allows that; delete-permanent (the default) makes Mailchimp refuse it.
            "erasure": "archive",
        }

    def snapshot(self, emulator: Emulator) -> dict[str, Any]:
        assert isinstance(emulator, MailchimpEmulator)
        state: dict[str, Any] = emulator.call(emulator.state)
        return state

    def expected(self, export: dict[str, Any], config: dict[str, Any]) -> dict[str, Any]:
        merge_map = config.get("merge_fields") or {"first_name": "FNAME", "last_name": "LNAME"}
        prefix = config.get("tag_prefix", "")
        out = {}
        for contact, actions in pushed(export, config):
            merge = {}
            for source, tag in merge_map.items():
                value = (
                    contact.fields.get(source.removeprefix("fields."))
                    if source.startswith("fields.")
                    else getattr(contact, source, None)
                )
                if value not in (None, ""):
                    merge[tag] = value
            out[contact.email] = {
                "status": member_status(contact) or "transactional",
                "merge_fields": dict(sorted(merge.items())),
                "tags": sorted(f"{prefix}{c}" for c in contact.campaigns)
                if config.get("tags", True)
                else [],
                "events": sorted(a.action_id for a in actions)
                if config.get("events", True)
                else [],
            }
        return out


DRIVER = MailchimpDriver()
