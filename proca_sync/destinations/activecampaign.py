"""ActiveCampaign (API v3): contacts, one list's subscription status, tags per campaign
and action type.

Per push:

1. the list's unsubscribed contacts are known (``GET /api/3/contacts?listid=&status=2``,
   in full now and then, incrementally by ``filters[updated_after]`` in between) so that
   nobody who unsubscribed from the list is subscribed again — the API itself would
   re-subscribe them (status 2 → 1);
2. up to ``sync_threshold`` contacts (ActiveCampaign asks for the contacts API below ten):
   ``POST /api/3/contact/sync`` each, then ``POST /api/3/contactLists`` when the list
   status must change, then the missing tags (``GET /api/3/contacts/{id}/contactTags``,
   tags found by name or created, ``POST /api/3/contactTags``);
3. more: one ``POST /api/3/import/bulk_import`` of at most 250 contacts (names, phone,
   custom fields, tag names — created when missing —, ``subscribe`` / ``unsubscribe``
   for the list), then ``GET /api/3/import/info?batchId=`` until ``completed``; the
   addresses it lists under ``failure`` are refused items (code ``import_failure``);
4. erasures: the contact found by e-mail and ``DELETE /api/3/contacts/{id}``.

Every write is an upsert by e-mail, a status set or a tag that is there or not, so a
retry or a redelivery records nothing twice. Subscription: ``subscribed`` → status 1
unless the list has the person unsubscribed (2 stays 2); ``unsubscribed`` → status 2;
``not_opted_in`` → the list is not touched (a new contact is not on it).

Rate: 5 requests/s per account (429 + ``Retry-After``); the default bucket sends 4.5/s
(a 10 % margin, so network jitter does not squeeze six requests into one second). Bulk
imports at most 100 a minute (a second bucket).
"""

from __future__ import annotations

import asyncio
import builtins
import time
from collections.abc import Iterable, Mapping, Sequence
from datetime import UTC, datetime
from typing import Any, ClassVar, Literal

from pydantic import Field

from proca_sync.destinations.base import (
    ActionView,
    Batch,
    ContactView,
    DestinationConfig,
    DestinationRejectedError,
    Erasure,
    PushReport,
)
from proca_sync.destinations.http import ApiClient, ApiResponse, RateLimiter
from proca_sync.errors import BackendUnavailableError, ConfigError, TransientError

__all__ = ["ActiveCampaignConfig", "ActiveCampaignDestination", "tags_for"]

BULK_MAX = 250
PAGE = 100


class ActiveCampaignConfig(DestinationConfig):
    """``[destinations.NAME]`` with ``type = "activecampaign"``."""

    type: Literal["activecampaign"] = "activecampaign"
    list_id: int = Field(description="The list whose subscription status follows consent.")
    fields: dict[str, str | int] = Field(
        default_factory=dict,
        description="Ledger field → custom field id, title or personalisation tag.",
    )
    campaign_tag: str = "proca:{campaign}"
    action_tag: str = "proca:{action_type}"
    sync_threshold: int = Field(default=10, ge=0)
    import_timeout: float = Field(default=300.0, gt=0)
    unsubscribed_refresh: float = Field(
        default=600.0, gt=0, description="Seconds between full reads of the unsubscribed."
    )


def tags_for(config: ActiveCampaignConfig, actions: Iterable[ActionView]) -> set[str]:
    """The tags a contact carries for these actions."""
    out: set[str] = set()
    for action in actions:
        out.add(config.campaign_tag.format(campaign=action.campaign))
        out.add(config.action_tag.format(action_type=action.action_type))
    return out


def _value(contact: ContactView, source: str) -> Any:
    direct = {
        "email": contact.email,
        "firstName": contact.first_name,
        "lastName": contact.last_name,
        "postcode": contact.postcode,
        "country": contact.country,
    }
    if source in direct:
        return direct[source]
    return contact.fields.get(source)


def _code(body: Any, default: str) -> str:
    if isinstance(body, dict):
        for error in body.get("errors") or ():
            if isinstance(error, dict) and error.get("code"):
                return str(error["code"])
    return default


class ActiveCampaignDestination:
    """ActiveCampaign API v3 (see the module docstring)."""

    type: ClassVar[str] = "activecampaign"
    Config: ClassVar[builtins.type[DestinationConfig]] = ActiveCampaignConfig
    supports_erasure = True

    def __init__(self, name: str, config: ActiveCampaignConfig) -> None:
        if not config.base_url:
            raise ConfigError(f"destination {name!r}: base_url (https://ACCOUNT.api-us1.com)")
        self.name = name
        self.config = config
        self.max_batch = min(BULK_MAX, config.batch_size or BULK_MAX)
        self._client: ApiClient | None = None
        self._imports = RateLimiter(100 / 60, 1)
        self._field_ids: dict[str, str] | None = None
        self._tag_ids: dict[str, str] = {}
        self._unsub: set[str] = set()
        self._unsub_read_at: float | None = None
        self._unsub_full_at = 0.0

    @property
    def throttled(self) -> int:
        """429 answers received (the pusher's metrics)."""
        return 0 if self._client is None else self._client.stats.throttled

    @property
    def client(self) -> ApiClient:
        if self._client is None:
            base = (self.config.base_url or "").rstrip("/")
            if not base.endswith("/api/3"):
                base += "/api/3"
            self._client = ApiClient(
                name=self.name,
                base_url=base,
                headers={"Api-Token": self.config.api_key(), "Accept": "application/json"},
                limiter=RateLimiter(self.config.rate or 4.5, self.config.burst or 1),
                timeout=self.config.timeout,
            )
        return self._client

    async def open(self) -> None:
        await self.client.open()

    async def close(self) -> None:
        if self._client is not None:
            await self._client.close()

    async def ping(self) -> None:
        response = await self.client.request("GET", f"/lists/{self.config.list_id}")
        if response.status == 404:
            raise ConfigError(f"{self.name}: list {self.config.list_id} does not exist")
        if not response.ok:
            raise ConfigError(f"{self.name}: ActiveCampaign answered {response.status}")
        await self._fields()

    # ---- lookups ---------------------------------------------------------------------

    async def _fields(self) -> dict[str, str]:
        """Ledger field → custom field id, resolved once from ``GET /fields``."""
        if self._field_ids is not None:
            return self._field_ids
        if not self.config.fields:
            self._field_ids = {}
            return self._field_ids
        known: dict[str, str] = {}
        offset = 0
        while True:
            response = await self.client.request(
                "GET", "/fields", params={"limit": str(PAGE), "offset": str(offset)}
            )
            if not response.ok:
                raise BackendUnavailableError(
                    f"{self.name}: fields read answered {response.status}"
                )
            page = (response.body or {}).get("fields") or []
            for field in page:
                fid = str(field["id"])
                known[fid] = fid
                for alias in (field.get("title"), field.get("perstag")):
                    if alias:
                        known.setdefault(str(alias).lower(), fid)
            if len(page) < PAGE:
                break
            offset += PAGE
        resolved: dict[str, str] = {}
        for source, target in self.config.fields.items():
            found = known.get(str(target).lower())
            if found is None:
                raise ConfigError(f"{self.name}: custom field {target!r} does not exist")
            resolved[source] = found
        self._field_ids = resolved
        return resolved

    async def _unsubscribed(self) -> set[str]:
        """E-mails the list has unsubscribed (status 2).

        Read in full once (100 a page), then only the contacts updated since the last
        read (``filters[updated_after]``, two seconds of overlap for clock skew) on later
        pushes, and in full again every ``unsubscribed_refresh`` seconds. An e-mail stays
        in the set until the next full read, so the set errs on the side of not
        subscribing.
        """
        started = time.time()
        full = self._unsub_read_at is None or started - self._unsub_full_at > (
            self.config.unsubscribed_refresh
        )
        params = {"listid": str(self.config.list_id), "status": "2", "limit": str(PAGE)}
        if not full:
            assert self._unsub_read_at is not None
            since = datetime.fromtimestamp(self._unsub_read_at - 2, tz=UTC)
            params["filters[updated_after]"] = since.strftime("%Y-%m-%dT%H:%M:%S+00:00")
        found: set[str] = set()
        offset = 0
        while True:
            response = await self.client.request(
                "GET", "/contacts", params={**params, "offset": str(offset)}
            )
            if not response.ok:
                raise BackendUnavailableError(
                    f"{self.name}: list status read answered {response.status}"
                )
            page = (response.body or {}).get("contacts") or []
            found.update(str(c.get("email", "")).lower() for c in page)
            if len(page) < PAGE:
                break
            offset += PAGE
        if full:
            self._unsub = found
            self._unsub_full_at = started
        else:
            self._unsub |= found
        self._unsub_read_at = started
        return self._unsub

    async def _tag_id(self, name: str) -> str:
        if name in self._tag_ids:
            return self._tag_ids[name]
        for attempt in range(2):
            response = await self.client.request(
                "GET", "/tags", params={"search": name}, what="GET /tags?search={tag}"
            )
            if not response.ok:
                raise BackendUnavailableError(f"{self.name}: tag search answered {response.status}")
            for tag in (response.body or {}).get("tags") or ():
                if tag.get("tag") == name:
                    self._tag_ids[name] = str(tag["id"])
                    return self._tag_ids[name]
            if attempt:
                break
            created = await self.client.request(
                "POST",
                "/tags",
                json={"tag": {"tag": name, "tagType": "contact", "description": "Proca"}},
            )
            if created.ok:
                self._tag_ids[name] = str(created.body["tag"]["id"])
                return self._tag_ids[name]
            # 422 duplicate: created meanwhile; search again
        raise BackendUnavailableError(f"{self.name}: tag could not be created")

    # ---- push ------------------------------------------------------------------------

    async def push(self, batch: Batch) -> PushReport:
        report = PushReport()
        before = self.client.stats.requests
        testing = self.config.include_testing
        contacts = [c for c in batch.contacts if c.email and (testing or not c.testing)]
        actions: dict[int, list[ActionView]] = {}
        for action in batch.actions:
            if testing or not action.testing:
                actions.setdefault(action.contact_id, []).append(action)
        try:
            fields = await self._fields()
            unsubscribed = (
                await self._unsubscribed()
                if any(c.subscription == "subscribed" for c in contacts)
                else set()
            )
        except TransientError as exc:
            keys = [c.key for c in contacts] + [a.key for a in batch.actions]
            for key in keys + [e.key for e in batch.erasures]:
                report.failed[key] = exc
            report.requests = self.client.stats.requests - before
            return report
        if len(contacts) <= self.config.sync_threshold:
            for contact in contacts:
                await self._sync_one(
                    contact, actions.get(contact.contact_id, []), fields, unsubscribed, report
                )
        else:
            for start in range(0, len(contacts), BULK_MAX):
                chunk = contacts[start : start + BULK_MAX]
                await self._bulk(chunk, actions, fields, unsubscribed, report)
        for action in batch.actions:
            cause = report.failed.get(("contact", str(action.contact_id)))
            if cause is not None:
                report.failed[action.key] = cause
            elif not any(c.contact_id == action.contact_id for c in contacts) and (
                testing or not action.testing
            ):
                report.failed[action.key] = TransientError(
                    f"{self.name}: the contact of action {action.action_id} was not written"
                )
        for erasure in batch.erasures:
            await self._erase(erasure, report)
        report.requests = self.client.stats.requests - before
        return report

    def _list_status(self, contact: ContactView, unsubscribed: set[str]) -> int | None:
        if contact.subscription == "subscribed":
            return None if contact.email in unsubscribed else 1
        if contact.subscription == "unsubscribed":
            return 2
        return None

    async def _sync_one(
        self,
        contact: ContactView,
        actions: Sequence[ActionView],
        fields: Mapping[str, str],
        unsubscribed: set[str],
        report: PushReport,
    ) -> None:
        body: dict[str, Any] = {"email": contact.email}
        for key, value in (
            ("firstName", contact.first_name),
            ("lastName", contact.last_name),
            ("phone", contact.fields.get("phone")),
        ):
            if value not in (None, ""):
                body[key] = str(value)
        values = [
            {"field": fid, "value": str(v)}
            for source, fid in fields.items()
            if (v := _value(contact, source)) not in (None, "")
        ]
        if values:
            body["fieldValues"] = values
        try:
            response = await self.client.request("POST", "/contact/sync", json={"contact": body})
            if not response.ok:
                if 400 <= response.status < 500:
                    report.failed[contact.key] = DestinationRejectedError(
                        f"{self.name}: contact {contact.contact_id} refused ({response.status})",
                        code=_code(response.body, f"http_{response.status}"),
                    )
                    return
                raise BackendUnavailableError(f"{self.name}: sync answered {response.status}")
            ac_id = str(response.body["contact"]["id"])
            status = self._list_status(contact, unsubscribed)
            if status is not None:
                await self._checked(
                    self.client.request(
                        "POST",
                        "/contactLists",
                        json={
                            "contactList": {
                                "list": self.config.list_id,
                                "contact": ac_id,
                                "status": status,
                            }
                        },
                    ),
                    "list status",
                )
                if status == 2:
                    self._unsub.add(contact.email)
            wanted = tags_for(self.config, actions)
            if wanted:
                have = await self._checked(
                    self.client.request(
                        "GET",
                        f"/contacts/{ac_id}/contactTags",
                        what="GET /contacts/{id}/contactTags",
                    ),
                    "contact tags read",
                )
                present = {str(t.get("tag")) for t in (have.body or {}).get("contactTags") or ()}
                for name in sorted(wanted):
                    tid = await self._tag_id(name)
                    if tid in present:
                        continue
                    await self._checked(
                        self.client.request(
                            "POST",
                            "/contactTags",
                            json={"contactTag": {"contact": ac_id, "tag": tid}},
                        ),
                        "contact tag",
                    )
        except TransientError as exc:
            report.failed[contact.key] = exc

    async def _checked(self, call: Any, what: str) -> ApiResponse:
        response: ApiResponse = await call
        if not response.ok:
            raise BackendUnavailableError(f"{self.name}: {what} answered {response.status}")
        return response

    async def _bulk(
        self,
        chunk: Sequence[ContactView],
        actions: Mapping[int, Sequence[ActionView]],
        fields: Mapping[str, str],
        unsubscribed: set[str],
        report: PushReport,
    ) -> None:
        rows = []
        for contact in chunk:
            row: dict[str, Any] = {"email": contact.email}
            for key, value in (
                ("first_name", contact.first_name),
                ("last_name", contact.last_name),
                ("phone", contact.fields.get("phone")),
            ):
                if value not in (None, ""):
                    row[key] = str(value)
            custom = [
                {"id": int(fid), "value": str(v)}
                for source, fid in fields.items()
                if (v := _value(contact, source)) not in (None, "")
            ]
            if custom:
                row["fields"] = custom
            tags = sorted(tags_for(self.config, actions.get(contact.contact_id, ())))
            if tags:
                row["tags"] = tags
            status = self._list_status(contact, unsubscribed)
            if status == 1:
                row["subscribe"] = [{"listid": self.config.list_id}]
            elif status == 2:
                row["unsubscribe"] = [{"listid": self.config.list_id}]
            rows.append(row)
        try:
            await self._imports.acquire()
            response = await self.client.request(
                "POST", "/import/bulk_import", json={"contacts": rows}
            )
            body = response.body if isinstance(response.body, dict) else {}
            if not response.ok or not body.get("batchId"):
                if 400 <= response.status < 500:
                    for contact in chunk:
                        report.failed[contact.key] = DestinationRejectedError(
                            f"{self.name}: bulk import refused ({response.status})",
                            code="bulk_import_refused",
                        )
                    return
                raise BackendUnavailableError(
                    f"{self.name}: bulk import answered {response.status}"
                )
            failures = await self._wait_import(str(body["batchId"]))
        except TransientError as exc:
            for contact in chunk:
                report.failed[contact.key] = exc
            return
        for contact in chunk:
            if contact.email not in failures and contact.subscription == "unsubscribed":
                self._unsub.add(contact.email)
            if contact.email in failures:
                report.failed[contact.key] = DestinationRejectedError(
                    f"{self.name}: contact {contact.contact_id} failed the import",
                    code="import_failure",
                )

    async def _wait_import(self, batch_id: str) -> set[str]:
        """Poll the import until it completes; the e-mails it failed."""
        deadline = time.monotonic() + self.config.import_timeout
        delay = 0.25
        while True:
            await asyncio.sleep(delay)  # the import is asynchronous: give it time
            response = await self.client.request(
                "GET", "/import/info", params={"batchId": batch_id}
            )
            if not response.ok:
                raise BackendUnavailableError(
                    f"{self.name}: import info answered {response.status}"
                )
            body = response.body if isinstance(response.body, dict) else {}
            status = body.get("status")
            if status == "completed":
                return {str(e).strip().lower() for e in body.get("failure") or ()}
            if status in ("failed", "interrupted"):
                raise BackendUnavailableError(f"{self.name}: import {status}")
            if time.monotonic() + delay > deadline:
                raise BackendUnavailableError(f"{self.name}: import not completed in time")
            delay = min(2.0, delay * 1.5)

    async def _erase(self, erasure: Erasure, report: PushReport) -> None:
        try:
            found = await self.client.request(
                "GET",
                "/contacts",
                params={"email": erasure.email},
                what="GET /contacts?email={email}",
            )
            if not found.ok:
                raise BackendUnavailableError(
                    f"{self.name}: contact search answered {found.status}"
                )
            for match in (found.body or {}).get("contacts") or ():
                gone = await self.client.request(
                    "DELETE", f"/contacts/{match['id']}", what="DELETE /contacts/{id}"
                )
                if not gone.ok and gone.status != 404:
                    report.failed[erasure.key] = DestinationRejectedError(
                        f"{self.name}: delete refused ({gone.status})",
                        code=_code(gone.body, f"http_{gone.status}"),
                    )
        except TransientError as exc:
            report.failed[erasure.key] = exc
