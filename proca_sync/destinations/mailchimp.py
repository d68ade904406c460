"""Mailchimp (Marketing API 3.0): one audience, members upserted by subscriber hash.

What one push does (see docs/destinations/mailchimp.md for the promises):

1. Contacts with a marketing status (subscribed, unsubscribed, cleaned) go through the
   synchronous batch endpoint ``POST /lists/{id}`` (≤ 500 members, ``update_existing``),
   whose per-member ``errors[]`` become per-item failures. Contacts that never opted in
   go one by one through ``PUT /lists/{id}/members/{hash}`` with only ``status_if_new``
   (``transactional``), so an existing subscriber is never unsubscribed.
2. Mailchimp refuses to turn an unsubscribed or cleaned member back into a subscriber
   ("Member In Compliance State"). The connector never forces it: when the ledger holds a
   newer double opt-in it asks for ``pending`` (Mailchimp mails its own confirmation);
   otherwise the member is reported refused with code ``member_in_compliance_state``.
3. Tags per campaign are static segments, filled in bulk (``POST /lists/{id}/segments/{sid}``
   with ``members_to_add``, ≤ 500).
4. One member event per action (``POST …/members/{hash}/events``, posted without a silent
   retry). The API has no event id, so before posting to a member that already existed
   the connector reads the member's events and skips the actions already recorded; a
   member the batch call reports as *new* has none, so a backfill pays no look-up, and
   when there are many such events they go in one batch operation (``POST /batches``,
   polled until finished; per-operation errors read from its results archive).

Mailchimp's limit is 10 simultaneous connections per key, not a request rate: requests go
through a semaphore of ``max_connections`` on top of the token bucket.
"""

from __future__ import annotations

import asyncio
import base64
import builtins
import hashlib
import io
import re
import tarfile
from collections import defaultdict
from collections.abc import Awaitable, Iterable, Sequence
from typing import Any, ClassVar, Literal, TypeVar

import orjson
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
from proca_sync.destinations.http import ApiClient, ApiResponse, RateLimiter
from proca_sync.errors import BackendUnavailableError, ConfigError, ProcaSyncError, TransientError

__all__ = ["MailchimpConfig", "MailchimpDestination", "member_status", "subscriber_hash"]

BATCH_OPERATIONS = 500
"""Operations per ``POST /batches`` (the documented cap is not confirmed: kept low)."""

BATCH_MEMBERS = 500
"""Members per ``POST /lists/{id}`` and per segment update (the API's documented cap)."""

CLEANED_STATUSES = frozenset({"bounce"})
"""Ledger e-mail statuses that mean a bad address: Mailchimp's ``cleaned``."""

_T = TypeVar("_T")


class MailchimpConfig(DestinationConfig):
    """``[destinations.NAME]`` with ``type = "mailchimp"``."""

    type: Literal["mailchimp"]
    list_id: str = Field(min_length=1, description="The audience id.")
    merge_fields: dict[str, str] = Field(
        default_factory=lambda: {"first_name": "FNAME", "last_name": "LNAME"},
        description="Ledger field (first_name, last_name, postcode, country, fields.NAME) "
        "→ merge tag.",
    )
    tags: bool = True
    tag_prefix: str = ""
    events: bool = True
    event_prefix: str = "proca_"
    batch_events_from: int = Field(
        default=50,
        ge=1,
        description="From this many events of new members in a push, they go in one batch "
        "operation (POST /batches) instead of one request each.",
    )
    poll_interval: float = Field(default=0.5, gt=0)
    max_connections: int = Field(default=10, ge=1, le=10)
    concurrency: int = Field(
        default=4,
        ge=1,
        le=10,
        description="Pushes in flight at once (each waits for its batch operation); they "
        "hold distinct contacts and share the max_connections.",
    )
    erasure: Literal["delete-permanent", "archive"] = "delete-permanent"


def subscriber_hash(email: str) -> str:
    """Mailchimp's member id: the MD5 of the lower-case address (not a secret)."""
    return hashlib.md5(email.strip().lower().encode(), usedforsecurity=False).hexdigest()


def member_status(contact: ContactView) -> str | None:
    """The member status the ledger implies, ``None`` for "never opted in"."""
    subscription = contact.subscription
    if subscription == "subscribed":
        return "subscribed"
    if subscription == "unsubscribed":
        return "cleaned" if contact.email_status in CLEANED_STATUSES else "unsubscribed"
    return None



def event_name(prefix: str, action_type: str) -> str:
    """A valid event name (2–30 characters of letters, digits, ``-`` and ``_``)."""
    name = re.sub(r"[^A-Za-z0-9_-]", "_", f"{prefix}{action_type}")[:30]
    return name if len(name) >= 2 else f"{name}__"[:2]


class MailchimpDestination:
    """Keeps one Mailchimp audience in sync; see the module docstring."""

    type: ClassVar[str] = "mailchimp"
    Config: ClassVar[builtins.type[MailchimpConfig]] = MailchimpConfig
    supports_erasure = True

    def __init__(self, name: str, config: MailchimpConfig) -> None:
        self.name = name
        self.config = config
        key = config.api_key()
        base_url = config.base_url or _base_url_from_key(key)
        self.max_batch = config.batch_size or 2000
        self.concurrency = config.concurrency
        """Batches the pusher keeps in flight (see :class:`MailchimpConfig`)."""
        limiter = RateLimiter(config.rate or 100.0, config.burst or 10)
        common: dict[str, Any] = {
            "name": name,
            "base_url": base_url,
            "headers": {
                "Accept": "application/json",
                # HTTP Basic, any user name, the key as password.
                "Authorization": "Basic "
                + base64.b64encode(f"proca-sync:{key}".encode()).decode(),
            },
            "limiter": limiter,
            "timeout": config.timeout,
        }
        self._client = ApiClient(**common)
        # Event posts are not idempotent: no silent retry inside the client (a timed-out
        # post may have landed); the next push looks the member's events up first.
        self._once = ApiClient(**common, attempts=1)
        # The results archive of a batch operation is a pre-signed link: no credentials.
        self._download = ApiClient(
            name=name,
            base_url=base_url,
            headers={},
            limiter=limiter,
            timeout=config.timeout,
        )
        self._slots = asyncio.Semaphore(config.max_connections)
        self._unfinished: set[str] = set()
        """Batch operations started and not seen finished (a push was interrupted)."""
        self._polling: set[str] = set()
        """Batch operations a push in flight is waiting for (of its own contacts)."""
        self._list = f"/lists/{config.list_id}"
        self._segments: dict[str, int] | None = None
        self._segments_lock = asyncio.Lock()
        """One look-up or creation of tags at a time: pushes in flight together would
        otherwise create the same tag twice (the second refused)."""

    # ---- lifecycle -------------------------------------------------------------------

    async def open(self) -> None:
        for client in (self._client, self._once, self._download):
            await client.open()

    async def close(self) -> None:
        for client in (self._client, self._once, self._download):
            await client.close()

    async def ping(self) -> None:
        answer = await self._call("GET", self._list, what="GET /lists/{id}")
        if answer.status == 404:
            raise ConfigError(f"{self.name}: audience list_id not found")
        if not answer.ok:
            raise BackendUnavailableError(
                f"{self.name}: GET /lists/{{id}} answered {answer.status}"
            )

    # ---- push ------------------------------------------------------------------------

    async def push(self, batch: Batch) -> PushReport:
        report = PushReport()
        fresh: set[str] = set()  # members this push created: no events to look up
        start = self._requests()
        contacts = [c for c in batch.contacts if self.config.include_testing or not c.testing]
        marketing = [c for c in contacts if member_status(c) is not None]
        quiet = [c for c in contacts if member_status(c) is None]
        chunks = _chunks(marketing, BATCH_MEMBERS)
        jobs: list[Awaitable[None]] = [
            self._batch_subscribe(chunk, report, fresh) for chunk in chunks
        ]
        jobs += [self._put_quiet(c, report) for c in quiet]
        keys = [[c.key for c in chunk] for chunk in chunks] + [[c.key] for c in quiet]
        await self._all(jobs, report, keys)
        written = [c for c in contacts if c.key not in report.failed]
        if self.config.tags and written:
            await self._tag(written, report)
        by_id = {c.contact_id: c for c in contacts}
        actions = [a for a in batch.actions if self.config.include_testing or not a.testing]
        if self.config.events and actions:
            await self._events(actions, by_id, report, fresh)
        for erasure in batch.erasures:
            await self._erase(erasure, report)
        report.requests = self._requests() - start
        return report

    @property
    def throttled(self) -> int:
        """429 answers received (the pusher's metrics)."""
        return sum(c.stats.throttled for c in (self._client, self._once, self._download))

    def _requests(self) -> int:
        return sum(c.stats.requests for c in (self._client, self._once, self._download))

    async def _call(
        self, method: str, path: str, *, once: bool = False, **kwargs: Any
    ) -> ApiResponse:
        client = self._once if once else self._client
        async with self._slots:
            return await client.request(method, path, **kwargs)

    async def _all(
        self,
        jobs: Sequence[Awaitable[None]],
        report: PushReport,
        keys: Sequence[Sequence[ItemKey]],
    ) -> None:
        """Run the jobs together; a job that failed transiently fails its items only,
        and when every job failed the whole push fails."""
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

    def _member(self, contact: ContactView) -> dict[str, Any]:
        body: dict[str, Any] = {"email_address": contact.email}
        merge = {}
        for source, tag in self.config.merge_fields.items():
            value = contact.field(source)
            if value not in (None, ""):
                merge[tag] = value if isinstance(value, str | int | float) else str(value)
        if merge:
            body["merge_fields"] = merge
        return body

    async def _batch_subscribe(
        self, chunk: Sequence[ContactView], report: PushReport, fresh: set[str]
    ) -> None:
        members = []
        for contact in chunk:
            member = self._member(contact)
            member["status"] = member_status(contact)
            members.append(member)
        answer = await self._call(
            "POST", self._list, json={"members": members, "update_existing": True}
        )
        if not answer.ok:
            _refuse_all(self.name, "POST /lists/{id}", answer, chunk, report)
            return
        by_email = {c.email: c for c in chunk}
        for member in (answer.body or {}).get("new_members") or []:
            fresh.add(str(member.get("email_address", "")).strip().lower())
        refused_doi: list[ContactView] = []
        for error in (answer.body or {}).get("errors") or []:
            refused = by_email.get(str(error.get("email_address", "")).strip().lower())
            if refused is None:
                continue
            code = _error_code(error)
            if code == "member_in_compliance_state" and refused.email_status == "double_opt_in":
                refused_doi.append(refused)
                continue
            report.failed[refused.key] = DestinationRejectedError(
                f"{self.name}: member refused by POST /lists/{{id}} ({code})", code=code
            )
        for contact in refused_doi:
            # A newer double opt-in: ask Mailchimp to confirm again, its way.
            member = self._member(contact)
            member.update(status="pending", status_if_new="pending")
            try:
                answer = await self._call(
                    "PUT",
                    f"{self._list}/members/{subscriber_hash(contact.email)}",
                    json=member,
                    what="PUT /lists/{id}/members/{hash}",
                )
            except TransientError as exc:
                report.failed[contact.key] = exc
                continue
            if not answer.ok:
                report.failed[contact.key] = _rejected(self.name, "PUT member", answer)

    async def _put_quiet(self, contact: ContactView, report: PushReport) -> None:
        member = self._member(contact)
        member["status_if_new"] = "transactional"
        answer = await self._call(
            "PUT",
            f"{self._list}/members/{subscriber_hash(contact.email)}",
            json=member,
            what="PUT /lists/{id}/members/{hash}",
        )
        if not answer.ok:
            report.failed[contact.key] = _rejected(self.name, "PUT member", answer)

    # ---- tags ------------------------------------------------------------------------

    async def _tag(self, contacts: Sequence[ContactView], report: PushReport) -> None:
        wanted: dict[str, list[ContactView]] = defaultdict(list)
        for contact in contacts:
            for campaign in contact.campaigns:
                wanted[f"{self.config.tag_prefix}{campaign}"].append(contact)
        if not wanted:
            return
        try:
            segments = await self._segment_ids(wanted)
        except TransientError as exc:
            for contact in contacts:
                report.failed.setdefault(contact.key, exc)
            return
        jobs: list[Awaitable[None]] = []
        keys: list[list[ItemKey]] = []
        for tag, members in wanted.items():
            for chunk in _chunks(members, BATCH_MEMBERS):
                jobs.append(self._add_to_segment(segments[tag], chunk, report))
                keys.append([c.key for c in chunk])
        await self._all(jobs, report, keys)

    async def _segment_ids(self, names: Iterable[str]) -> dict[str, int]:
        async with self._segments_lock:
            return await self._segment_ids_locked(names)

    async def _segment_ids_locked(self, names: Iterable[str]) -> dict[str, int]:
        # A local reference: another push may drop ``_segments`` meanwhile (a vanished tag).
        segments = self._segments
        if segments is None:
            known: dict[str, int] = {}
            offset = 0
            while True:
                answer = await self._call(
                    "GET",
                    f"{self._list}/segments",
                    params={"type": "static", "count": "1000", "offset": str(offset)},
                )
                if not answer.ok:
                    raise BackendUnavailableError(
                        f"{self.name}: GET /lists/{{id}}/segments answered {answer.status}"
                    )
                page = answer.body.get("segments") or []
                known.update({s["name"]: int(s["id"]) for s in page})
                offset += len(page)
                if not page or offset >= int(answer.body.get("total_items", 0)):
                    break
            self._segments = segments = known
        for name in names:
            if name not in segments:
                answer = await self._call(
                    "POST", f"{self._list}/segments", json={"name": name, "static_segment": []}
                )
                if not answer.ok:
                    # Perhaps created meanwhile by someone else: read the tags again next time.
                    self._segments = None
                    raise BackendUnavailableError(
                        f"{self.name}: POST /lists/{{id}}/segments answered {answer.status}"
                    )
                segments[name] = int(answer.body["id"])
        return segments

    async def _add_to_segment(
        self, segment: int, chunk: Sequence[ContactView], report: PushReport
    ) -> None:
        answer = await self._call(
            "POST",
            f"{self._list}/segments/{segment}",
            json={"members_to_add": [c.email for c in chunk]},
        )
        if answer.status == 404:  # the tag was deleted in Mailchimp meanwhile
            self._segments = None
            raise BackendUnavailableError(f"{self.name}: tag segment vanished; reloading")
        if not answer.ok:
            _refuse_all(self.name, "POST /lists/{id}/segments/{id}", answer, chunk, report)
            return
        by_email = {c.email: c for c in chunk}
        for error in (answer.body or {}).get("errors") or []:
            for address in error.get("email_addresses") or []:
                contact = by_email.get(str(address).strip().lower())
                if contact is not None:
                    report.failed[contact.key] = DestinationRejectedError(
                        f"{self.name}: tag refused for a member", code="tag_refused"
                    )

    # ---- events ----------------------------------------------------------------------

    async def _events(
        self,
        actions: Sequence[ActionView],
        contacts: dict[int, ContactView],
        report: PushReport,
        fresh: set[str],
    ) -> None:
        per_contact: dict[int, list[ActionView]] = defaultdict(list)
        for action in actions:
            contact = contacts.get(action.contact_id)
            if contact is None:
                report.failed[action.key] = TransientError(
                    f"{self.name}: action {action.action_id} without its contact in the batch"
                )
            elif contact.key in report.failed:
                report.failed[action.key] = report.failed[contact.key]
            else:
                per_contact[action.contact_id].append(action)
        # An interrupted push's operation: its events must be visible to the look-ups.
        # (Those another push in flight is waiting for are of other contacts: the pusher
        # never has one contact in two pushes at once.)
        for batch_id in sorted(self._unfinished - self._polling):
            await self._finished(batch_id)
        bulk = [a for c, acts in per_contact.items() if contacts[c].email in fresh for a in acts]
        if len(bulk) >= self.config.batch_events_from:
            for c in [c for c in per_contact if contacts[c].email in fresh]:
                del per_contact[c]
            parts = _chunks(bulk, BATCH_OPERATIONS)
            await self._all(
                [self._batch_events(part, contacts, report) for part in parts],
                report,
                [[a.key for a in part] for part in parts],
            )
        jobs = [
            self._contact_events(contacts[c], acts, report, contacts[c].email in fresh)
            for c, acts in per_contact.items()
        ]
        await self._all(jobs, report, [[a.key for a in acts] for acts in per_contact.values()])

    def _event_body(self, action: ActionView) -> dict[str, Any]:
        return {
            "name": event_name(self.config.event_prefix, action.action_type),
            "properties": {
                "action_id": str(action.action_id),
                "action_type": action.action_type,
                "campaign": action.campaign,
            },
            "occurred_at": action.created_at or None,
            "is_syncing": True,
        }

    async def _batch_events(
        self, actions: Sequence[ActionView], contacts: dict[int, ContactView], report: PushReport
    ) -> None:
        """Events of new members in one batch operation, waited for until finished."""
        operations = [
            {
                "method": "POST",
                "path": f"{self._list}/members/"
                f"{subscriber_hash(contacts[a.contact_id].email)}/events",
                "operation_id": str(a.action_id),
                "body": orjson.dumps(self._event_body(a)).decode(),
            }
            for a in actions
        ]
        answer = await self._call("POST", "/batches", json={"operations": operations}, once=True)
        if not answer.ok:
            error = _rejected(self.name, "POST /batches", answer)
            for action in actions:
                report.failed[action.key] = error
            return
        batch_id = str(answer.body["id"])
        self._unfinished.add(batch_id)
        self._polling.add(batch_id)
        try:
            status = await self._finished(batch_id)
        finally:
            self._polling.discard(batch_id)
        if int(status.get("errored_operations") or 0) == 0:
            return
        by_id = {str(a.action_id): a for a in actions}
        for result in await self._batch_results(str(status.get("response_body_url") or "")):
            failed = by_id.get(str(result.get("operation_id")))
            code = int(result.get("status_code") or 0)
            if failed is None or 200 <= code < 300:
                continue
            if code == 429 or code >= 500:
                report.failed[failed.key] = TransientError(
                    f"{self.name}: batch operation answered {code}"
                )
                continue
            try:
                body = orjson.loads(result.get("response") or "{}")
            except orjson.JSONDecodeError:
                body = {}
            report.failed[failed.key] = _rejected(
                self.name, "batch event", ApiResponse(code, {}, body)
            )

    async def _finished(self, batch_id: str) -> dict[str, Any]:
        """Poll a batch operation until Mailchimp finished it; its status document."""
        delay = self.config.poll_interval
        while True:
            answer = await self._call("GET", f"/batches/{batch_id}")
            if answer.status == 404:
                self._unfinished.discard(batch_id)
                return {}
            if not answer.ok:
                raise BackendUnavailableError(
                    f"{self.name}: GET /batches/{{id}} answered {answer.status}"
                )
            if answer.body.get("status") == "finished":
                self._unfinished.discard(batch_id)
                body: dict[str, Any] = answer.body
                return body
            await asyncio.sleep(delay)  # Mailchimp is still applying the operations
            delay = min(delay * 2, 10.0)

    async def _batch_results(self, url: str) -> list[dict[str, Any]]:
        """The per-operation results of a finished batch (a gzipped tar of JSON arrays)."""
        if not url:
            return []
        answer = await self._download.request(
            "GET", url, what="GET batch results archive", raw=True
        )
        raw = answer.body if isinstance(answer.body, bytes) else None
        if not answer.ok or raw is None:
            raise BackendUnavailableError(
                f"{self.name}: batch results archive answered {answer.status}"
            )
        results: list[dict[str, Any]] = []
        with tarfile.open(fileobj=io.BytesIO(raw), mode="r:gz") as archive:
            for member in archive.getmembers():
                handle = archive.extractfile(member) if member.isfile() else None
                if handle is not None:
                    results.extend(orjson.loads(handle.read()))
        return results

    async def _contact_events(
        self, contact: ContactView, actions: Sequence[ActionView], report: PushReport, new: bool
    ) -> None:
        path = f"{self._list}/members/{subscriber_hash(contact.email)}/events"
        what = "POST /lists/{id}/members/{hash}/events"
        if not new:
            recorded = await self._recorded_events(path)
            actions = [a for a in actions if str(a.action_id) not in recorded]
        for action in actions:
            body = self._event_body(action)
            try:
                answer = await self._call("POST", path, json=body, what=what, once=True)
            except TransientError as exc:
                report.failed[action.key] = exc
                continue
            if not answer.ok:
                report.failed[action.key] = _rejected(self.name, "POST member event", answer)

    async def _recorded_events(self, path: str) -> set[str]:
        recorded: set[str] = set()
        offset = 0
        while True:
            answer = await self._call(
                "GET",
                path,
                params={"count": "1000", "offset": str(offset)},
                what="GET /lists/{id}/members/{hash}/events",
            )
            if answer.status == 404:
                return recorded
            if not answer.ok:
                raise BackendUnavailableError(
                    f"{self.name}: GET member events answered {answer.status}"
                )
            page = answer.body.get("events") or []
            for event in page:
                action_id = (event.get("properties") or {}).get("action_id")
                if action_id is not None:
                    recorded.add(str(action_id))
            offset += len(page)
            if not page or offset >= int(answer.body.get("total_items", 0)):
                return recorded

    # ---- erasure ---------------------------------------------------------------------

    async def _erase(self, erasure: Erasure, report: PushReport) -> None:
        member = f"{self._list}/members/{subscriber_hash(erasure.email)}"
        try:
            # A retired address (a contact merged away) is archived: a permanent delete
            # would stop it from ever being added again.
            if self.config.erasure == "delete-permanent" and not erasure.retired:
                answer = await self._call(
                    "POST",
                    f"{member}/actions/delete-permanent",
                    what="POST /lists/{id}/members/{hash}/actions/delete-permanent",
                )
            else:
                answer = await self._call(
                    "DELETE", member, what="DELETE /lists/{id}/members/{hash}"
                )
        except TransientError as exc:
            report.failed[erasure.key] = exc
            return
        if not answer.ok and answer.status != 404:  # 404: already gone
            report.failed[erasure.key] = _rejected(self.name, "erase member", answer)


def _base_url_from_key(key: str) -> str:
    _, sep, dc = key.rpartition("-")
    if not sep or not re.fullmatch(r"[a-z]+[0-9]+", dc):
        raise ConfigError(
            "mailchimp: the API key has no data-centre suffix (…-us6); set base_url"
        )
    return f"https://{dc}.api.mailchimp.com/3.0"


def _chunks(items: Sequence[_T], size: int) -> list[Sequence[_T]]:
    return [items[i : i + size] for i in range(0, len(items), size)]


def _error_code(error: dict[str, Any]) -> str:
    text = str(error.get("error") or error.get("title") or "")
    if "compliance state" in text.lower():
        return "member_in_compliance_state"
    if "forgotten" in text.lower() or "permanently deleted" in text.lower():
        return "forgotten_email_not_subscribed"
    return str(error.get("error_code") or "ERROR_GENERIC")


def _rejected(name: str, what: str, answer: ApiResponse) -> ProcaSyncError:
    """An answer that is not 2xx (429/5xx/auth already handled by the client)."""
    body = answer.body if isinstance(answer.body, dict) else {}
    title = str(body.get("title") or f"http_{answer.status}")
    code = _error_code({"title": title, "error": body.get("detail")})
    if code == "ERROR_GENERIC":
        code = re.sub(r"[^a-z0-9]+", "_", title.lower()).strip("_")
    return DestinationRejectedError(f"{name}: {what} refused ({answer.status} {code})", code=code)


def _refuse_all(
    name: str, what: str, answer: ApiResponse, chunk: Sequence[ContactView], report: PushReport
) -> None:
    error = _rejected(name, what, answer)
    for contact in chunk:
        report.failed[contact.key] = error
