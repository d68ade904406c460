"""HubSpot (CRM v3): contacts by e-mail, communication preferences, one note per action.

Per push (at most 100 contacts, HubSpot's batch size):

1. ``POST /crm/v3/objects/contacts/batch/upsert`` — contacts keyed by ``email``
   (``idProperty``), each input tagged with ``objectWriteTraceId`` = the ledger contact id
   so the per-item results and errors of a 207 multi-status answer map back to items;
2. subscriptions, when ``subscription_id`` is configured: one batch read of the current
   statuses (``/communication-preferences/v4/statuses/batch/read``), then one batch write
   of the changes only — ``subscribed`` → SUBSCRIBED unless HubSpot has the person opted
   out (NOT_SUBSCRIBED: never re-subscribed), ``unsubscribed`` → NOT_SUBSCRIBED,
   ``not_opted_in`` → untouched;
3. notes: one per action, associated to the contact (type 202), its body ending with a
   marker ``[proca:action:<id>]``. Before creating, the notes already associated to the
   batch's existing contacts are read (associations batch read, then notes batch read —
   both read records by id, not the eventually consistent search index), so a redelivered
   or retried action is not noted twice. Contacts the upsert reports ``new`` have no notes
   yet and are not read. The create itself is sent once (``idempotent=False``): after a
   timeout or a 5xx its actions are reported transient and looked up again next push;
4. erasures: the notes this connector wrote on the contact are archived
   (``/crm/v3/objects/notes/batch/archive``), then
   ``POST /crm/v3/objects/contacts/gdpr-delete`` (404: already gone).

Rate: HubSpot counts 100 requests per rolling 10 s (Free/Starter); the default bucket
(9/s, burst 5) never sends more than 95 in any 10 s (set ``rate``/``burst`` for the
190 or 250 of higher tiers). A 429 pauses for the time the
``X-HubSpot-RateLimit-*`` headers imply; a response with ``-Remaining: 0`` pauses too.
"""

from __future__ import annotations

import builtins
import re
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any, ClassVar, Literal
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
from proca_sync.errors import BackendUnavailableError, ConfigError, TransientError

__all__ = ["DEFAULT_PROPERTIES", "HubSpotConfig", "HubSpotDestination", "note_marker"]

BATCH = 100
NOTE_TO_CONTACT = 202
DEFAULT_PROPERTIES: dict[str, str] = {
    "email": "email",
    "firstname": "firstName",
    "lastname": "lastName",
    "zip": "postcode",
    "country": "country",
    "phone": "phone",
}
"""HubSpot property → ledger field (``email``, ``firstName``, ``lastName``, ``postcode``,
``country``, or any key of the contact's ``fields``)."""

LegalBasis = Literal[
    "CONSENT_WITH_NOTICE",
    "LEGITIMATE_INTEREST_PQL",
    "LEGITIMATE_INTEREST_CLIENT",
    "LEGITIMATE_INTEREST_OTHER",
    "NON_GDPR",
    "PERFORMANCE_OF_CONTRACT",
    "PROCESS_AND_STORE",
]
_MARKER = re.compile(r"\[proca:action:(\d+)\]")


def note_marker(action_id: int) -> str:
    """The tag a note's body ends with: how a later push recognises the note."""
    return f"[proca:action:{action_id}]"


class HubSpotConfig(DestinationConfig):
    """``[destinations.NAME]`` with ``type = "hubspot"``."""

    type: Literal["hubspot"] = "hubspot"
    subscription_id: int | None = Field(
        default=None, description="Subscription type id for marketing e-mail (none: skip)."
    )
    legal_basis: LegalBasis = "CONSENT_WITH_NOTICE"
    legal_basis_explanation: str = "Consent given on a Proca action page"
    properties: dict[str, str] = Field(default_factory=lambda: dict(DEFAULT_PROPERTIES))
    notes: bool = True


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


def _chunks(items: Sequence[Any], size: int) -> Iterator[Sequence[Any]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def _retry_after(response: ApiResponse) -> float | None:
    """Seconds to pause after HubSpot's 429: Retry-After when sent, else from the
    policy (a tenth of the interval for the rolling window; a minute for the daily cap)."""
    explicit = parse_retry_after(response.headers.get("Retry-After"))
    if explicit is not None:
        return explicit
    body = response.body if isinstance(response.body, dict) else {}
    if str(body.get("policyName", "")).upper() == "DAILY":
        return 60.0
    try:
        interval = float(response.headers.get("X-HubSpot-RateLimit-Interval-Milliseconds", ""))
    except ValueError:
        interval = 10_000.0
    return max(0.5, interval / 1000 / 10)


def _error_code(error: Mapping[str, Any]) -> str:
    for detail in error.get("errors") or ():
        if isinstance(detail, dict) and detail.get("code"):
            return str(detail["code"])
    return str(error.get("subCategory") or error.get("category") or "error")


def _named(error: Mapping[str, Any]) -> set[str]:
    """Every string an error's ``context`` names (trace ids, e-mails, ids)."""
    out: set[str] = set()
    context = error.get("context") or {}
    if isinstance(context, dict):
        for value in context.values():
            if isinstance(value, list):
                out.update(str(v).lower() for v in value)
            elif isinstance(value, str):
                out.add(value.lower())
    return out


class HubSpotDestination:
    """HubSpot CRM v3 (see the module docstring)."""

    type: ClassVar[str] = "hubspot"
    Config: ClassVar[builtins.type[DestinationConfig]] = HubSpotConfig
    supports_erasure = True

    def __init__(self, name: str, config: HubSpotConfig) -> None:
        self.name = name
        self.config = config
        self.max_batch = min(BATCH, config.batch_size or BATCH)
        for prop, source in config.properties.items():
            if prop == "email" and source != "email":
                raise ConfigError(f"destination {name!r}: properties.email must map 'email'")
        self._client: ApiClient | None = None

    @property
    def throttled(self) -> int:
        """429 answers received (the pusher's metrics)."""
        return 0 if self._client is None else self._client.stats.throttled

    @property
    def client(self) -> ApiClient:
        if self._client is None:
            limiter = RateLimiter(self.config.rate or 9.0, self.config.burst or 5)
            self._client = ApiClient(
                name=self.name,
                base_url=self.config.base_url or "https://api.hubapi.com",
                headers={"Authorization": f"Bearer {self.config.api_key()}"},
                limiter=limiter,
                timeout=self.config.timeout,
                retry_after=_retry_after,
            )
        return self._client

    async def open(self) -> None:
        await self.client.open()

    async def close(self) -> None:
        if self._client is not None:
            await self._client.close()

    async def ping(self) -> None:
        response = await self._call("GET", "/crm/v3/objects/contacts?limit=1")
        if not response.ok:
            raise ConfigError(f"{self.name}: HubSpot answered {response.status} to a contacts read")

    async def _call(self, method: str, path: str, **kwargs: Any) -> ApiResponse:
        response = await self.client.request(method, path, **kwargs)
        if response.headers.get("X-HubSpot-RateLimit-Remaining") == "0":
            self.client.limiter.pause(_retry_after(response) or 1.0)
        return response

    # ---- push -----------------------------------------------------------------------

    async def push(self, batch: Batch) -> PushReport:
        report = PushReport()
        before = self.client.stats.requests
        contacts = [
            c for c in batch.contacts if c.email and (self.config.include_testing or not c.testing)
        ]
        ids: dict[int, str] = {}
        new: set[int] = set()
        for chunk in _unique_chunks(contacts):
            await self._upsert(chunk, ids, new, report)
        if self.config.subscription_id is not None:
            written = [c for c in contacts if c.contact_id in ids]
            for part in _chunks(written, BATCH):
                await self._subscribe(part, report)
        actions = self._actions_of(batch, ids, report)
        if self.config.notes and actions:
            await self._notes(actions, batch, ids, new, report)
        for erasure in batch.erasures:
            await self._erase(erasure, report)
        report.requests = self.client.stats.requests - before
        return report

    def _actions_of(
        self, batch: Batch, written: Mapping[int, str], report: PushReport
    ) -> list[ActionView]:
        """The batch's actions to record; those whose contact was not written fail
        the way their contact did."""
        out: list[ActionView] = []
        for action in batch.actions:
            if action.testing and not self.config.include_testing:
                continue
            if action.contact_id in written:
                out.append(action)
                continue
            cause = report.failed.get(("contact", str(action.contact_id)))
            report.failed[action.key] = cause or TransientError(
                f"{self.name}: the contact of action {action.action_id} was not written"
            )
        return out

    def _properties(self, contact: ContactView) -> dict[str, str]:
        out: dict[str, str] = {}
        for prop, source in self.config.properties.items():
            value = _value(contact, source)
            if value is not None and value != "":
                out[prop] = str(value)
        out["email"] = contact.email
        return out

    async def _upsert(
        self,
        chunk: Sequence[ContactView],
        ids: dict[int, str],
        new: set[int],
        report: PushReport,
    ) -> None:
        inputs = [
            {
                "id": c.email,
                "idProperty": "email",
                "objectWriteTraceId": str(c.contact_id),
                "properties": self._properties(c),
            }
            for c in chunk
        ]
        try:
            response = await self._call(
                "POST", "/crm/v3/objects/contacts/batch/upsert", json={"inputs": inputs}
            )
        except TransientError as exc:
            for c in chunk:
                report.failed[c.key] = exc
            return
        by_trace = {str(c.contact_id): c for c in chunk}
        by_email = {c.email: c for c in chunk}
        body = response.body if isinstance(response.body, dict) else {}
        if response.status in (200, 201, 207):
            for result in body.get("results") or ():
                props = result.get("properties") or {}
                hit = by_trace.get(str(result.get("objectWriteTraceId"))) or by_email.get(
                    str(props.get("email", "")).lower()
                )
                if hit is not None:
                    ids[hit.contact_id] = str(result["id"])
                    if result.get("new"):
                        new.add(hit.contact_id)
            for error in body.get("errors") or ():
                named = _named(error)
                for c in chunk:
                    if c.contact_id not in ids and (str(c.contact_id) in named or c.email in named):
                        report.failed[c.key] = DestinationRejectedError(
                            f"{self.name}: contact {c.contact_id} refused "
                            f"({error.get('category', 'error')})",
                            code=_error_code(error),
                        )
            for c in chunk:
                if c.contact_id not in ids and c.key not in report.failed:
                    report.failed[c.key] = TransientError(
                        f"{self.name}: no result for contact {c.contact_id}"
                    )
        elif 400 <= response.status < 500:
            code = _error_code(body)
            for c in chunk:
                report.failed[c.key] = DestinationRejectedError(
                    f"{self.name}: batch upsert refused ({response.status})", code=code
                )
        else:
            for c in chunk:
                report.failed[c.key] = BackendUnavailableError(
                    f"{self.name}: batch upsert answered {response.status}"
                )

    async def _subscribe(self, chunk: Sequence[ContactView], report: PushReport) -> None:
        wanted = [c for c in chunk if c.subscription != "not_opted_in"]
        if not wanted:
            return
        sid = self.config.subscription_id
        try:
            read = await self._call(
                "POST",
                "/communication-preferences/v4/statuses/batch/read",
                params={"channel": "EMAIL"},
                json={"inputs": [c.email for c in wanted]},
            )
            if read.status not in (200, 207):
                raise BackendUnavailableError(f"{self.name}: status read answered {read.status}")
            current: dict[str, str] = {}
            for result in (read.body or {}).get("results") or ():
                email = str(result.get("subscriberIdString", "")).lower()
                for status in result.get("statuses") or ():
                    if status.get("subscriptionId") == sid:
                        current[email] = str(status.get("status"))
            inputs = []
            for c in wanted:
                now = current.get(c.email, "NOT_SPECIFIED")
                if c.subscription == "subscribed" and now == "NOT_SPECIFIED":
                    state = "SUBSCRIBED"  # never over NOT_SUBSCRIBED: an opt-out stays
                elif c.subscription == "unsubscribed" and now != "NOT_SUBSCRIBED":
                    state = "NOT_SUBSCRIBED"
                else:
                    continue
                inputs.append(
                    {
                        "channel": "EMAIL",
                        "statusState": state,
                        "subscriberIdString": c.email,
                        "subscriptionId": sid,
                        "legalBasis": self.config.legal_basis,
                        "legalBasisExplanation": self.config.legal_basis_explanation,
                    }
                )
            if not inputs:
                return
            write = await self._call(
                "POST",
                "/communication-preferences/v4/statuses/batch/write",
                json={"inputs": inputs},
            )
        except TransientError as exc:
            for c in wanted:
                report.failed[c.key] = exc
            return
        body = write.body if isinstance(write.body, dict) else {}
        if write.status in (200, 207):
            for error in body.get("errors") or ():
                named = _named(error)
                for c in wanted:
                    if c.email in named:
                        report.failed[c.key] = DestinationRejectedError(
                            f"{self.name}: subscription of contact {c.contact_id} refused",
                            code=_error_code(error),
                        )
        else:
            for c in wanted:
                report.failed[c.key] = DestinationRejectedError(
                    f"{self.name}: subscription write refused ({write.status})",
                    code=_error_code(body),
                )

    async def _our_notes(self, contact_ids: Iterable[str]) -> dict[str, set[int]]:
        """The notes this connector wrote on these HubSpot contacts: note id → the
        action ids its marker names."""
        note_ids: list[str] = []
        for chunk in _chunks(sorted(set(contact_ids)), BATCH):
            response = await self._call(
                "POST",
                "/crm/v4/associations/contacts/notes/batch/read",
                json={"inputs": [{"id": hid} for hid in chunk]},
            )
            if response.status not in (200, 207):
                raise BackendUnavailableError(
                    f"{self.name}: associations read answered {response.status}"
                )
            for result in (response.body or {}).get("results") or ():
                note_ids.extend(str(to["toObjectId"]) for to in result.get("to") or ())
        ours: dict[str, set[int]] = {}
        for chunk in _chunks(sorted(set(note_ids)), BATCH):
            response = await self._call(
                "POST",
                "/crm/v3/objects/notes/batch/read",
                json={"inputs": [{"id": nid} for nid in chunk], "properties": ["hs_note_body"]},
            )
            if response.status not in (200, 207):
                raise BackendUnavailableError(f"{self.name}: notes read answered {response.status}")
            for result in (response.body or {}).get("results") or ():
                body = str((result.get("properties") or {}).get("hs_note_body") or "")
                marks = {int(m) for m in _MARKER.findall(body)}
                if marks:
                    ours[str(result["id"])] = marks
        return ours

    async def _noted(self, contact_ids: Iterable[str]) -> set[int]:
        """Action ids already noted on these HubSpot contacts."""
        seen: set[int] = set()
        for marks in (await self._our_notes(contact_ids)).values():
            seen |= marks
        return seen

    def _note(self, action: ActionView, batch: Batch, hid: str) -> dict[str, Any]:
        campaign = batch.campaigns.get(action.campaign)
        title = (campaign.title if campaign else None) or action.campaign
        page = (action.data.get("actionPage") or {}).get("name") if action.data else None
        text = f"Proca action: {action.action_type} in campaign {title}"
        if page:
            text += f" (page {page})"
        return {
            "objectWriteTraceId": str(action.action_id),
            "properties": {
                "hs_timestamp": action.created_at,
                "hs_note_body": f"{text} {note_marker(action.action_id)}",
            },
            "associations": [
                {
                    "to": {"id": hid},
                    "types": [
                        {
                            "associationCategory": "HUBSPOT_DEFINED",
                            "associationTypeId": NOTE_TO_CONTACT,
                        }
                    ],
                }
            ],
        }

    async def _notes(
        self,
        actions: Sequence[ActionView],
        batch: Batch,
        ids: Mapping[int, str],
        new: set[int],
        report: PushReport,
    ) -> None:
        try:
            done = await self._noted(ids[a.contact_id] for a in actions if a.contact_id not in new)
        except TransientError as exc:
            for a in actions:
                report.failed[a.key] = exc
            return
        todo: list[ActionView] = []
        for action in actions:
            if action.action_id not in done and action not in todo:
                todo.append(action)
        for chunk in _chunks(todo, BATCH):
            inputs = [self._note(a, batch, ids[a.contact_id]) for a in chunk]
            try:
                response = await self._call(
                    "POST",
                    "/crm/v3/objects/notes/batch/create",
                    json={"inputs": inputs},
                    idempotent=False,
                )
            except TransientError as exc:
                for a in chunk:
                    report.failed[a.key] = exc  # maybe written: looked up again next push
                continue
            body = response.body if isinstance(response.body, dict) else {}
            if response.status in (200, 201):
                continue
            if response.status == 207:
                for error in body.get("errors") or ():
                    named = _named(error)
                    for a in chunk:
                        if str(a.action_id) in named:
                            report.failed[a.key] = DestinationRejectedError(
                                f"{self.name}: note for action {a.action_id} refused",
                                code=_error_code(error),
                            )
                continue
            for a in chunk:
                report.failed[a.key] = DestinationRejectedError(
                    f"{self.name}: notes create refused ({response.status})",
                    code=_error_code(body),
                )

    async def _erase(self, erasure: Erasure, report: PushReport) -> None:
        """Archive the notes this connector wrote on the contact, then GDPR-delete it —
        or, for a retired address (a contact merged away), archive it: a GDPR delete
        would stop the address from ever coming back."""
        key: ItemKey = erasure.key
        try:
            found = await self._call(
                "GET",
                f"/crm/v3/objects/contacts/{quote(erasure.email, safe='')}",
                params={"idProperty": "email"},
                what="GET /crm/v3/objects/contacts/{email}",
            )
            if found.status == 404:
                return  # HubSpot does not have the address: nothing to erase
            if not found.ok:
                raise BackendUnavailableError(f"{self.name}: contact read answered {found.status}")
            ours = await self._our_notes([str(found.body["id"])])
            for chunk in _chunks(sorted(ours), BATCH):
                archived = await self._call(
                    "POST",
                    "/crm/v3/objects/notes/batch/archive",
                    json={"inputs": [{"id": nid} for nid in chunk]},
                )
                if not archived.ok:
                    raise BackendUnavailableError(
                        f"{self.name}: notes archive answered {archived.status}"
                    )
            if erasure.retired:
                response = await self._call(
                    "DELETE",
                    f"/crm/v3/objects/contacts/{found.body['id']}",
                    what="DELETE /crm/v3/objects/contacts/{id}",
                )
            else:
                response = await self._call(
                    "POST",
                    "/crm/v3/objects/contacts/gdpr-delete",
                    json={"objectId": erasure.email, "idProperty": "email"},
                )
        except TransientError as exc:
            report.failed[key] = exc
            return
        if response.ok or response.status == 404:
            return
        body = response.body if isinstance(response.body, dict) else {}
        what = "archive" if erasure.retired else "GDPR delete"
        report.failed[key] = DestinationRejectedError(
            f"{self.name}: {what} refused ({response.status})", code=_error_code(body)
        )


def _unique_chunks(contacts: Sequence[ContactView]) -> Iterator[list[ContactView]]:
    """Chunks of at most 100 with no e-mail twice (HubSpot refuses duplicate ids)."""
    pending = list(contacts)
    while pending:
        chunk: list[ContactView] = []
        seen: set[str] = set()
        rest: list[ContactView] = []
        for contact in pending:
            if len(chunk) < BATCH and contact.email not in seen:
                chunk.append(contact)
                seen.add(contact.email)
            else:
                rest.append(contact)
        yield chunk
        pending = rest
