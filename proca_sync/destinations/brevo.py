"""Brevo (API v3): contacts upserted by e-mail, subscription as list membership and the
e-mail blocklist.

What one push does (see docs/destinations/brevo.md for the promises):

* Subscribed contacts join the configured ``list_ids`` plus the list of each campaign they
  acted in (``campaign_lists``). Large groups sharing the same lists go through the bulk
  import (``POST /contacts/import``, asynchronous: the connector polls the process until
  it completed, so nothing written later in the push can be overtaken by it); the rest go
  one by one through ``POST /contacts`` with ``updateEnabled`` (201 created, 204 updated),
  whose 400 answers are per-item refusals with Brevo's ``code``.
* Unsubscribed contacts are upserted with ``emailBlacklisted: true`` (Brevo's "never
  e-mail", global to the account) and removed from those lists
  (``POST /contacts/lists/{id}/contacts/remove``, ≤ 150 addresses a call).
* Contacts who never opted in are upserted without lists and without touching the
  blocklist, so an existing subscriber stays one.
* A blocklist is lifted only by a newer positive e-mail status in the ledger (a confirmed
  double opt-in, or ``active``) — a plain opt-in never silently re-subscribes.
* Actions: optional custom events (``events = true``, ``POST /events``); the API has no
  event id, so the docs page states the duplicate bound.

Brevo answers 429 with ``x-sib-ratelimit-reset`` (seconds) and no ``Retry-After``: the
client's ``retry_after`` hook reads it.
"""

from __future__ import annotations

import asyncio
import builtins
import logging
import re
import time
from collections import defaultdict, deque
from collections.abc import Awaitable, Sequence
from typing import Any, ClassVar, Literal, TypeVar
from urllib.parse import quote

from pydantic import Field

from proca_sync.destinations.base import (
    ActionView,
    Batch,
    ContactView,
    DestinationConfig,
    DestinationRejectedError,
    Erasure,
    ItemKey,
    PushReport,
)
from proca_sync.destinations.http import ApiClient, ApiResponse, RateLimiter, parse_retry_after
from proca_sync.errors import BackendUnavailableError, ConfigError, ProcaSyncError, TransientError

__all__ = ["BrevoConfig", "BrevoDestination", "brevo_retry_after"]

LIST_CALL = 150
"""Addresses per list add/remove call (the API's documented cap)."""

POSITIVE_STATUSES = frozenset({"double_opt_in", "active"})


log = logging.getLogger("proca_sync.destinations")
"""Ledger statuses newer than any objection: they lift Brevo's e-mail blocklist."""

_T = TypeVar("_T")


class BrevoConfig(DestinationConfig):
    """``[destinations.NAME]`` with ``type = "brevo"``."""

    type: Literal["brevo"]
    list_ids: list[int] = Field(default_factory=list)
    campaign_lists: dict[str, int] = Field(
        default_factory=dict, description="Campaign name → list id for its subscribers."
    )
    attributes: dict[str, str] = Field(
        default_factory=lambda: {"first_name": "FIRSTNAME", "last_name": "LASTNAME"},
        description="Ledger field (first_name, last_name, postcode, country, fields.NAME) "
        "→ Brevo attribute.",
    )
    blocklist: bool = True
    import_threshold: int = Field(default=100, ge=1)
    poll_interval: float = Field(default=1.0, gt=0)
    poll_budget: int = Field(
        default=90,
        ge=1,
        le=100,
        description="Process polls per sliding hour (Brevo allows 100 requests an hour on "
        "its other endpoints; the rest is left to ping).",
    )
    events: bool = False
    event_prefix: str = "proca_"
    concurrency: int = Field(
        default=4,
        ge=1,
        le=10,
        description="Pushes in flight at once (each may hold an import being processed "
        "and polled); they hold distinct contacts, and the 10 requests/s bucket paces "
        "their requests.",
    )


def brevo_retry_after(response: ApiResponse) -> float | None:
    """Seconds to wait after a 429: Brevo's ``x-sib-ratelimit-reset`` (or Retry-After)."""
    reset = response.headers.get("x-sib-ratelimit-reset")
    if reset:
        try:
            return max(0.0, float(reset))
        except ValueError:
            pass
    return parse_retry_after(response.headers.get("Retry-After"))



class BrevoDestination:
    """Keeps a Brevo account's contacts and lists in sync; see the module docstring."""

    type: ClassVar[str] = "brevo"
    Config: ClassVar[builtins.type[BrevoConfig]] = BrevoConfig
    supports_erasure = True

    def __init__(self, name: str, config: BrevoConfig) -> None:
        self.name = name
        self.config = config
        key = config.api_key()
        self.max_batch = config.batch_size or 5000
        self.concurrency = config.concurrency
        """Batches the pusher keeps in flight (see :class:`BrevoConfig`)."""
        common: dict[str, Any] = {
            "name": name,
            "base_url": config.base_url or "https://api.brevo.com/v3",
            "headers": {"api-key": key, "Accept": "application/json"},
            "timeout": config.timeout,
            "retry_after": brevo_retry_after,
        }
        # /contacts/* (and /events): 10 requests/s on the General tier.
        self._client = ApiClient(
            **common, limiter=RateLimiter(config.rate or 10.0, config.burst or 1)
        )
        # Every other endpoint (processes, account): 100 requests an hour, spent through
        # the sliding-hour budget below (the bucket only spaces bursts).
        self._slow = ApiClient(**common, limiter=RateLimiter(2.0, 2))
        self._polls: deque[float] = deque()
        self._outstanding: dict[int, list[ContactView]] = {}
        """Imports queued and not yet seen completed (when the poll budget ran out)."""
        self.unconfirmed_refusals = 0
        """Addresses a deferred import skipped: logged and counted, not parked."""
        self._events = ApiClient(**common, limiter=self._client.limiter, attempts=1)

    # ---- lifecycle -------------------------------------------------------------------

    async def open(self) -> None:
        for client in (self._client, self._slow, self._events):
            await client.open()

    async def close(self) -> None:
        if self._outstanding:
            log.info(
                "destination %s: %d imports still processing at Brevo",
                self.name,
                len(self._outstanding),
                extra={"fields": {"event": "imports_outstanding", "destination": self.name}},
            )
        for client in (self._client, self._slow, self._events):
            await client.close()

    async def ping(self) -> None:
        answer = await self._slow.request("GET", "/account")
        if not answer.ok:
            raise BackendUnavailableError(f"{self.name}: GET /account answered {answer.status}")
        for list_id in sorted(set(self.config.list_ids) | set(self.config.campaign_lists.values())):
            answer = await self._client.request("GET", f"/contacts/lists/{list_id}")
            if answer.status == 404:
                raise ConfigError(f"{self.name}: list {list_id} does not exist")
            if not answer.ok:
                raise BackendUnavailableError(
                    f"{self.name}: GET /contacts/lists/{{id}} answered {answer.status}"
                )

    # ---- push ------------------------------------------------------------------------

    def _lists(self, contact: ContactView) -> list[int]:
        per_campaign = self.config.campaign_lists
        lists = set(self.config.list_ids)
        lists.update(per_campaign[c] for c in contact.campaigns if c in per_campaign)
        return sorted(lists)

    def _blocklisted(self, contact: ContactView) -> bool | None:
        subscription = contact.subscription
        if subscription == "unsubscribed":
            return True if self.config.blocklist else None
        if subscription == "subscribed" and contact.email_status in POSITIVE_STATUSES:
            return False
        return None

    def _attributes(self, contact: ContactView) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for source, attribute in self.config.attributes.items():
            value = contact.field(source)
            if value not in (None, ""):
                plain = isinstance(value, str | int | float | bool)
                out[attribute] = value if plain else str(value)
        return out

    async def push(self, batch: Batch) -> PushReport:
        report = PushReport()
        start = self._requests()
        contacts = [c for c in batch.contacts if self.config.include_testing or not c.testing]
        if self._outstanding:
            touched = {c.email for c in contacts} | {e.email for e in batch.erasures}
            if any(c.email in touched for cs in self._outstanding.values() for c in cs):
                await self._confirm_outstanding()  # an older import must not overtake
        groups: dict[tuple[int, ...], list[ContactView]] = defaultdict(list)
        singles: list[ContactView] = []
        removals: dict[int, list[ContactView]] = defaultdict(list)
        for contact in contacts:
            subscription = contact.subscription
            lists = self._lists(contact)
            if subscription == "subscribed" and lists and self._blocklisted(contact) is None:
                groups[tuple(lists)].append(contact)
            else:
                singles.append(contact)
            if subscription == "unsubscribed":
                for list_id in lists:
                    removals[list_id].append(contact)
        jobs: list[Awaitable[None]] = []
        keys: list[list[ItemKey]] = []
        for shared_lists, members in groups.items():
            if len(members) >= self.config.import_threshold:
                jobs.append(self._import(list(shared_lists), members, report))
                keys.append([c.key for c in members])
            else:
                singles.extend(members)
        jobs += [self._upsert(c, report) for c in singles]
        keys += [[c.key] for c in singles]
        await self._all(jobs, report, keys)
        jobs, keys = [], []
        for list_id, members in removals.items():
            for chunk in _chunks(members, LIST_CALL):
                jobs.append(self._remove(list_id, chunk, report))
                keys.append([c.key for c in chunk])
        await self._all(jobs, report, keys)
        if self.config.events:
            await self._post_events(batch.actions, {c.contact_id: c for c in contacts}, report)
        for erasure in batch.erasures:
            await self._erase(erasure, report)
        report.requests = self._requests() - start
        return report

    @property
    def throttled(self) -> int:
        """429 answers received (the pusher's metrics)."""
        return sum(c.stats.throttled for c in (self._client, self._slow, self._events))

    def _requests(self) -> int:
        return sum(c.stats.requests for c in (self._client, self._slow, self._events))

    async def _all(
        self,
        jobs: Sequence[Awaitable[None]],
        report: PushReport,
        keys: Sequence[Sequence[ItemKey]],
    ) -> None:
        """Run the jobs together; a job that failed transiently fails its items only,
        and when every job failed the whole push fails."""
        if not jobs:
            return
        results = await asyncio.gather(*jobs, return_exceptions=True)
        errors = [r for r in results if isinstance(r, BaseException)]
        for error in errors:
            if not isinstance(error, TransientError):
                raise error
        if errors and len(errors) == len(results):
            raise errors[0]
        for result, item_keys in zip(results, keys, strict=True):
            if isinstance(result, TransientError):
                for key in item_keys:
                    report.failed.setdefault(key, result)

    async def _upsert(self, contact: ContactView, report: PushReport) -> None:
        body: dict[str, Any] = {
            "email": contact.email,
            "attributes": self._attributes(contact),
            "updateEnabled": True,
        }
        if contact.subscription == "subscribed":
            lists = self._lists(contact)
            if lists:
                body["listIds"] = lists
        blocklisted = self._blocklisted(contact)
        if blocklisted is not None:
            body["emailBlacklisted"] = blocklisted
        answer = await self._client.request("POST", "/contacts", json=body)
        if not answer.ok:
            report.failed[contact.key] = _rejected(self.name, "POST /contacts", answer)

    def _poll_budget(self) -> int:
        now = time.monotonic()
        while self._polls and now - self._polls[0] >= 3600:
            self._polls.popleft()
        return self.config.poll_budget - len(self._polls)

    async def _poll(self, path: str, params: dict[str, str] | None = None) -> ApiResponse:
        if self._poll_budget() <= 0:  # never beyond Brevo's hourly allowance
            await asyncio.sleep(max(0.0, self._polls[0] + 3600 - time.monotonic()))
            self._poll_budget()
        self._polls.append(time.monotonic())
        answer = await self._slow.request("GET", path, params=params)
        if not answer.ok:
            raise BackendUnavailableError(f"{self.name}: GET /processes answered {answer.status}")
        return answer

    async def _import(
        self, lists: list[int], members: Sequence[ContactView], report: PushReport
    ) -> None:
        body = {
            "jsonBody": [{"email": c.email, "attributes": self._attributes(c)} for c in members],
            "listIds": lists,
            "updateExistingContacts": True,
            "emptyContactsAttributes": False,
            "disableNotification": True,
        }
        answer = await self._client.request("POST", "/contacts/import", json=body)
        if not answer.ok:
            error = _rejected(self.name, "POST /contacts/import", answer)
            for contact in members:
                report.failed[contact.key] = error
            return
        process = int(answer.body["processId"])
        delay = self.config.poll_interval
        while True:
            # Checked before the wait, and again right before the poll takes its place in
            # the budget (no await in between): the imports of other pushes in flight,
            # polled meanwhile, cannot spend the reserve.
            for wait in (True, False):
                if self._poll_budget() < 3:  # keep a few polls to confirm deferred imports
                    # The hour's polls are spent (a large backfill): the import is trusted
                    # to complete, confirmed before any later write to one of its contacts.
                    self._outstanding[process] = list(members)
                    return
                if wait:
                    await asyncio.sleep(delay)  # the process runs on Brevo's side
            answer = await self._poll(f"/processes/{process}")
            status = str(answer.body.get("status", ""))
            if status == "completed":
                break
            if status not in {"queued", "in_process", "processing"}:
                raise BackendUnavailableError(f"{self.name}: import process ended {status!r}")
            delay = min(delay * 2, 30.0)
        if _reported_problems(answer.body.get("info")):
            # The import skipped some records and says so only in a CSV report: send this
            # group again one by one (idempotent), so each refusal gets its own code.
            await self._all(
                [self._upsert(c, report) for c in members], report, [[c.key] for c in members]
            )

    async def _confirm_outstanding(self) -> None:
        """Wait until every deferred import completed (one listing covers up to 50)."""
        delay = self.config.poll_interval
        while self._outstanding:
            answer = await self._poll("/processes", {"limit": "50", "offset": "0", "sort": "desc"})
            listed = {int(p["id"]): p for p in answer.body.get("processes") or []}
            for process in sorted(self._outstanding):
                entry = listed.get(process)
                if entry is None and (not listed or process < min(listed)):
                    entry = (await self._poll(f"/processes/{process}")).body
                if entry is None or entry.get("status") != "completed":
                    continue
                members = self._outstanding.pop(process, None)
                if members is None:
                    continue  # confirmed meanwhile by another push in flight
                if _reported_problems(entry.get("info")):
                    late = PushReport()
                    await self._all(
                        [self._upsert(c, late) for c in members], late, [[c.key] for c in members]
                    )
                    refused = [
                        k for k, e in late.failed.items() if not isinstance(e, TransientError)
                    ]
                    self.unconfirmed_refusals += len(refused)
                    log.warning(
                        "destination %s: a deferred import skipped %d records; not parked",
                        self.name,
                        len(refused),
                        extra={
                            "fields": {
                                "event": "import_skipped",
                                "destination": self.name,
                                "count": len(refused),
                            }
                        },
                    )
            if self._outstanding:
                await asyncio.sleep(delay)  # Brevo is still processing
                delay = min(delay * 2, 30.0)

    async def _remove(self, list_id: int, chunk: Sequence[ContactView], report: PushReport) -> None:
        answer = await self._client.request(
            "POST",
            f"/contacts/lists/{list_id}/contacts/remove",
            json={"emails": [c.email for c in chunk]},
        )
        if answer.ok:
            return
        body = answer.body if isinstance(answer.body, dict) else {}
        if answer.status == 400 and body.get("code") == "invalid_parameter":
            return  # none of them was in the list: nothing to remove
        error = _rejected(self.name, "POST /contacts/lists/{id}/contacts/remove", answer)
        for contact in chunk:
            report.failed.setdefault(contact.key, error)

    async def _post_events(
        self, actions: Sequence[ActionView], contacts: dict[int, ContactView], report: PushReport
    ) -> None:
        for action in actions:
            if action.testing and not self.config.include_testing:
                continue
            contact = contacts.get(action.contact_id)
            if contact is None or contact.key in report.failed:
                report.failed[action.key] = (
                    report.failed[contact.key]
                    if contact is not None
                    else TransientError(f"{self.name}: action without its contact in the batch")
                )
                continue
            body = {
                "event_name": re.sub(
                    r"[^A-Za-z0-9_-]", "_", f"{self.config.event_prefix}{action.action_type}"
                )[:255],
                "event_date": action.created_at or None,
                "identifiers": {"email_id": contact.email},
                "event_properties": {
                    "action_id": action.action_id,
                    "action_type": action.action_type,
                    "campaign": action.campaign,
                },
            }
            try:
                answer = await self._events.request("POST", "/events", json=body)
            except TransientError as exc:
                report.failed[action.key] = exc
                continue
            if not answer.ok:
                report.failed[action.key] = _rejected(self.name, "POST /events", answer)

    async def _erase(self, erasure: Erasure, report: PushReport) -> None:
        try:
            answer = await self._client.request(
                "DELETE",
                f"/contacts/{quote(erasure.email, safe='')}",
                params={"identifierType": "email_id"},
                what="DELETE /contacts/{email}",
            )
        except TransientError as exc:
            report.failed[erasure.key] = exc
            return
        if not answer.ok and answer.status != 404:  # 404: already gone
            report.failed[erasure.key] = _rejected(self.name, "DELETE /contacts/{email}", answer)


def _reported_problems(info: Any) -> bool:
    """Whether a completed import's ``info`` points at a report of problem records."""
    if not isinstance(info, dict):
        return False
    stack: list[Any] = [info]
    while stack:
        item = stack.pop()
        if isinstance(item, dict):
            stack.extend(item.values())
        elif isinstance(item, str) and item:
            return True
    return False


def _chunks(items: Sequence[_T], size: int) -> list[Sequence[_T]]:
    return [items[i : i + size] for i in range(0, len(items), size)]


def _rejected(name: str, what: str, answer: ApiResponse) -> ProcaSyncError:
    body = answer.body if isinstance(answer.body, dict) else {}
    code = str(body.get("code") or f"http_{answer.status}")
    return DestinationRejectedError(f"{name}: {what} refused ({answer.status} {code})", code=code)
