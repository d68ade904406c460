"""Action Network (OSDI API v2): people through the person signup helper, tags, and one
form submission or petition signature per action.

Links are followed, never built: the API entry point (``base_url``, default
``https://actionnetwork.org/api/v2/``) names the collections (``osdi:people``,
``osdi:tags``, ``osdi:forms``, ``osdi:petitions``, ``osdi:person_signup_helper``); a form
names its ``osdi:record_submission_helper`` and ``osdi:submissions``, a petition its
``osdi:record_signature_helper`` and ``osdi:signatures``, a person its ``self``.

Per contact (the API has no batch endpoint; 4 requests/s per key — the default bucket
sends 3.6/s, a 10 % margin for network jitter):

1. the person is looked up by e-mail (``filter=email_address eq '…'``) to apply the
   e-mail status rules: ``subscribed`` → ``subscribed`` for a new person or a subscriber,
   but an existing person who is not subscribed (unsubscribed, bouncing, spam complaint)
   is left so — an opt-out never turns into a subscription; ``unsubscribed`` →
   ``unsubscribed``; ``not_opted_in`` → ``unsubscribed`` for a new person (the helper
   would subscribe them otherwise), marked ``proca_consent = not_opted_in`` so that their
   later consent does subscribe them (they were never mailed, so could not have opted
   out), and no status at all for an existing one, so a form submitted without the box
   ticked never unsubscribes a subscriber;
2. ``POST`` to the signup helper with names, postal code, country and ``add_tags`` — the
   campaign and action-type tags of the batch's actions, created first when missing
   (``filter=name eq '…'``, then ``POST osdi:tags``);
3. each action: the form (or petition, for ``petition_types``) of its campaign, found by
   the identifier ``proca:campaign:<name>`` or created; unless the person is new, the
   form's submissions are searched for the action's identifier ``proca:<actionId>``; when
   absent, the record helper is posted once (``idempotent=False``) with that identifier
   and a link to the person. A create whose answer was lost is reported transient and
   found by the search on the next push.

Erasure: Action Network has no API to delete a person. The connector does what the API
allows — ``PUT`` on the person: e-mail status ``unsubscribed``, names, postal address and
custom fields set to null — and the docs page says the rest (the e-mail address and the
action records) must be deleted by an administrator in Action Network.
"""

from __future__ import annotations

import builtins
from collections.abc import Mapping, Sequence
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

__all__ = ["ActionNetworkConfig", "ActionNetworkDestination", "action_identifier"]

NOT_SUBSCRIBABLE = frozenset(
    {"unsubscribed", "bouncing", "previous bounce", "spam complaint", "previous spam complaint"}
)


def action_identifier(action_id: int) -> str:
    return f"proca:{action_id}"


def _quote(value: str) -> str:
    return value.replace("'", "\\'")


class ActionNetworkConfig(DestinationConfig):
    """``[destinations.NAME]`` with ``type = "actionnetwork"``."""

    type: Literal["actionnetwork"] = "actionnetwork"
    campaign_tag: str = "proca:{campaign}"
    action_tag: str = "proca:{action_type}"
    petition_types: list[str] = Field(default_factory=lambda: ["register", "petition"])
    origin_system: str = "Proca"
    consent_field: str | None = Field(
        default="proca_consent",
        description="Custom field marking people unsubscribed only for want of consent.",
    )


class ActionNetworkDestination:
    """Action Network OSDI v2 (see the module docstring)."""

    type: ClassVar[str] = "actionnetwork"
    Config: ClassVar[builtins.type[DestinationConfig]] = ActionNetworkConfig
    supports_erasure = True
    """Partly: unsubscribe and blank the person (see the module docstring)."""

    def __init__(self, name: str, config: ActionNetworkConfig) -> None:
        self.name = name
        self.config = config
        self.max_batch = config.batch_size or 25
        self._client: ApiClient | None = None
        self._links: dict[str, str] | None = None
        self._tags: dict[str, str] = {}
        self._targets: dict[tuple[str, str], dict[str, str]] = {}

    @property
    def throttled(self) -> int:
        """429 answers received (the pusher's metrics)."""
        return 0 if self._client is None else self._client.stats.throttled

    @property
    def client(self) -> ApiClient:
        if self._client is None:
            self._client = ApiClient(
                name=self.name,
                base_url=self.config.base_url or "https://actionnetwork.org/api/v2/",
                headers={"OSDI-API-Token": self.config.api_key()},
                limiter=RateLimiter(self.config.rate or 3.6, self.config.burst or 1),
                timeout=self.config.timeout,
            )
        return self._client

    async def open(self) -> None:
        await self.client.open()

    async def close(self) -> None:
        if self._client is not None:
            await self._client.close()

    async def ping(self) -> None:
        self._links = None
        await self._entry()

    # ---- following links -------------------------------------------------------------

    async def _get(
        self, href: str, what: str, params: Mapping[str, str] | None = None
    ) -> ApiResponse:
        response = await self.client.request("GET", href, params=params, what=what)
        if not response.ok:
            raise BackendUnavailableError(f"{self.name}: {what} answered {response.status}")
        return response

    async def _entry(self) -> dict[str, str]:
        if self._links is None:
            response = await self.client.request("GET", self.client.base_url + "/")
            if not response.ok:
                raise ConfigError(f"{self.name}: the API entry point answered {response.status}")
            links = (response.body or {}).get("_links") or {}
            self._links = {k: v["href"] for k, v in links.items() if isinstance(v, dict)}
            for needed in ("osdi:people", "osdi:tags", "osdi:forms", "osdi:petitions"):
                if needed not in self._links:
                    raise ConfigError(f"{self.name}: the entry point has no {needed} link")
        return self._links

    async def _find(self, collection: str, field: str, value: str, what: str) -> list[Any]:
        query = {"filter": f"{field} eq '{_quote(value)}'"}
        body = (await self._get(collection, what, query)).body or {}
        embedded = body.get("_embedded") or {}
        for items in embedded.values():
            if isinstance(items, list):
                return items
        return []

    async def _tag(self, name: str) -> str:
        if name not in self._tags:
            links = await self._entry()
            found = await self._find(links["osdi:tags"], "name", name, "GET tags?filter=name")
            if not found:
                created = await self.client.request("POST", links["osdi:tags"], json={"name": name})
                if not created.ok:
                    raise BackendUnavailableError(
                        f"{self.name}: tag create answered {created.status}"
                    )
                found = [created.body]
            self._tags[name] = found[0]["_links"]["self"]["href"]
        return self._tags[name]

    async def _target(self, action: ActionView, batch: Batch) -> dict[str, str]:
        """The form or petition of the action's campaign: its record helper and its
        collection of records (created when missing)."""
        petition = action.action_type in self.config.petition_types
        kind = "osdi:petitions" if petition else "osdi:forms"
        key = (kind, action.campaign)
        if key not in self._targets:
            links = await self._entry()
            ident = f"proca:campaign:{action.campaign}"
            found = await self._find(links[kind], "identifier", ident, f"GET {kind}?filter")
            if found:
                target = found[0]
            else:
                campaign = batch.campaigns.get(action.campaign)
                title = (campaign.title if campaign else None) or action.campaign
                created = await self.client.request(
                    "POST",
                    links[kind],
                    json={
                        "title": title,
                        "origin_system": self.config.origin_system,
                        "identifiers": [ident],
                    },
                )
                if not created.ok:
                    raise BackendUnavailableError(
                        f"{self.name}: {kind} create answered {created.status}"
                    )
                target = created.body
            hal = target["_links"]
            if petition:
                helper, records = "osdi:record_signature_helper", "osdi:signatures"
            else:
                helper, records = "osdi:record_submission_helper", "osdi:submissions"
            self._targets[key] = {
                "helper": hal[helper]["href"],
                "records": hal[records]["href"],
            }
        return self._targets[key]

    # ---- push ------------------------------------------------------------------------

    async def push(self, batch: Batch) -> PushReport:
        report = PushReport()
        before = self.client.stats.requests
        testing = self.config.include_testing
        by_contact: dict[int, list[ActionView]] = {}
        for action in batch.actions:
            if testing or not action.testing:
                by_contact.setdefault(action.contact_id, []).append(action)
        pushed: set[int] = set()
        for contact in batch.contacts:
            if not contact.email or (contact.testing and not testing):
                continue
            pushed.add(contact.contact_id)
            await self._contact(contact, by_contact.get(contact.contact_id, []), batch, report)
        for contact_id, actions in by_contact.items():
            if contact_id not in pushed:
                for action in actions:
                    report.failed[action.key] = TransientError(
                        f"{self.name}: the contact of action {action.action_id} was not written"
                    )
        for erasure in batch.erasures:
            await self._erase(erasure, report)
        report.requests = self.client.stats.requests - before
        return report

    def _tag_names(self, actions: Sequence[ActionView]) -> list[str]:
        names = set()
        for action in actions:
            names.add(self.config.campaign_tag.format(campaign=action.campaign))
            names.add(self.config.action_tag.format(action_type=action.action_type))
        return sorted(names)

    async def _contact(
        self,
        contact: ContactView,
        actions: Sequence[ActionView],
        batch: Batch,
        report: PushReport,
    ) -> None:
        try:
            links = await self._entry()
            found = await self._find(
                links["osdi:people"],
                "email_address",
                contact.email,
                "GET people?filter=email_address",
            )
            existing = found[0] if found else None
            status, consent = _status(contact, existing, self.config.consent_field)
            email: dict[str, Any] = {"address": contact.email}
            if status is not None:
                email["status"] = status
            person: dict[str, Any] = {"email_addresses": [email]}
            if consent is not None and self.config.consent_field:  # "" disables it
                person["custom_fields"] = {self.config.consent_field: consent}
            if contact.first_name:
                person["given_name"] = contact.first_name
            if contact.last_name:
                person["family_name"] = contact.last_name
            address = {
                k: v
                for k, v in (("postal_code", contact.postcode), ("country", contact.country))
                if v
            }
            if address:
                person["postal_addresses"] = [address]
            tags = [name for name in self._tag_names(actions)]
            for name in tags:
                await self._tag(name)
            body: dict[str, Any] = {"person": person}
            if tags:
                body["add_tags"] = tags
            signup = links.get("osdi:person_signup_helper", links["osdi:people"])
            response = await self.client.request("POST", signup, json=body)
        except TransientError as exc:
            report.failed[contact.key] = exc
            for action in actions:
                report.failed[action.key] = exc
            return
        if not response.ok:
            error: DestinationRejectedError | BackendUnavailableError
            if 400 <= response.status < 500:
                error = DestinationRejectedError(
                    f"{self.name}: contact {contact.contact_id} refused ({response.status})",
                    code=f"http_{response.status}",
                )
            else:
                error = BackendUnavailableError(f"{self.name}: signup answered {response.status}")
            report.failed[contact.key] = error
            for action in actions:
                report.failed[action.key] = error
            return
        person_href = response.body["_links"]["self"]["href"]
        for action in actions:
            try:
                await self._record(action, batch, person_href, existing is not None, report)
            except TransientError as exc:
                report.failed[action.key] = exc

    async def _record(
        self, action: ActionView, batch: Batch, person: str, known: bool, report: PushReport
    ) -> None:
        target = await self._target(action, batch)
        ident = action_identifier(action.action_id)
        if known and await self._find(
            target["records"], "identifier", ident, "GET records?filter=identifier"
        ):
            return  # recorded by an earlier push
        body: dict[str, Any] = {
            "identifiers": [ident],
            "_links": {"osdi:person": {"href": person}},
        }
        response = await self.client.request("POST", target["helper"], json=body, idempotent=False)
        if response.ok:
            return
        if response.status == 404:  # the form or petition was deleted: find or create again
            self._targets = {k: v for k, v in self._targets.items() if v is not target}
            report.failed[action.key] = BackendUnavailableError(
                f"{self.name}: the form or petition of action {action.action_id} is gone"
            )
            return
        if 400 <= response.status < 500:
            report.failed[action.key] = DestinationRejectedError(
                f"{self.name}: record of action {action.action_id} refused ({response.status})",
                code=f"http_{response.status}",
            )
        else:
            report.failed[action.key] = BackendUnavailableError(
                f"{self.name}: record helper answered {response.status}"
            )

    async def _erase(self, erasure: Erasure, report: PushReport) -> None:
        try:
            links = await self._entry()
            found = await self._find(
                links["osdi:people"],
                "email_address",
                erasure.email,
                "GET people?filter=email_address",
            )
            for person in found:
                response = await self.client.request(
                    "PUT",
                    person["_links"]["self"]["href"],
                    json=_blank(erasure.email, person),
                    what="PUT people/{id}",
                )
                if not response.ok:
                    if 400 <= response.status < 500:
                        report.failed[erasure.key] = DestinationRejectedError(
                            f"{self.name}: erasure refused ({response.status})",
                            code=f"http_{response.status}",
                        )
                        return
                    raise BackendUnavailableError(f"{self.name}: PUT answered {response.status}")
        except TransientError as exc:
            report.failed[erasure.key] = exc


def _status(
    contact: ContactView, existing: Mapping[str, Any] | None, consent_field: str | None
) -> tuple[str | None, str | None]:
    """The e-mail status to send (None: leave it as Action Network has it) and the value
    of the consent marker field (None: leave it)."""
    current = None
    marker = None
    if existing is not None:
        for address in existing.get("email_addresses") or ():
            if str(address.get("address", "")).lower() == contact.email:
                current = address.get("status")
        if consent_field:
            marker = (existing.get("custom_fields") or {}).get(consent_field)
    if contact.subscription == "unsubscribed":
        return "unsubscribed", "unsubscribed"
    if contact.subscription == "subscribed":
        if existing is None or current == "subscribed":
            return "subscribed", "subscribed"
        if current == "unsubscribed" and marker == "not_opted_in":
            # unsubscribed by us only because they had not opted in (never mailed, so
            # never able to opt out in Action Network): their consent subscribes them
            return "subscribed", "subscribed"
        return None, None  # an opt-out never turns into a subscription
    if existing is None:
        return "unsubscribed", "not_opted_in"  # the helper would subscribe them otherwise
    return None, None


def _blank(email: str, person: Mapping[str, Any]) -> dict[str, Any]:
    """What erasure sends: unsubscribed, and every personal field nulled."""
    custom = {key: None for key in (person.get("custom_fields") or {})}
    return {
        "given_name": None,
        "family_name": None,
        "email_addresses": [{"address": email, "status": "unsubscribed"}],
        "postal_addresses": [
            {
                "postal_code": None,
                "country": None,
                "locality": None,
                "region": None,
                "address_lines": None,
            }
        ],
        "phone_numbers": None,
        "custom_fields": custom,
    }
