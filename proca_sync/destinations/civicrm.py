"""CiviCRM (APIv4 over REST): Individuals matched by e-mail, a group per campaign, one
Activity per action.

Every request is a *multi-call* ``POST {site}/civicrm/ajax/api4`` with the form field
``calls`` (a JSON object of ``[entity, action, params]`` keyed by our item keys), so one
HTTP request carries a whole batch and CiviCRM answers per call — a refusal fails that item
only. One push makes three requests (four when a campaign group is new):

1. look-up: ``Email.get`` for the batch's addresses (contacts not in the trash),
   ``Activity.get`` for the batch's action ids (``source_record_id`` of our activity
   type), ``Group.get`` for the campaign groups;
2. (``Group.create`` for campaign groups CiviCRM lacks;)
3. one call per contact: ``Contact.create`` (new) or ``Contact.update`` (existing), each
   chained to its primary Email, primary Address and GroupContacts (``$id``);
4. one ``Activity.create`` per action not found in step 1 — idempotent by the action id.

Subscription: CiviCRM's own flags. Unsubscribed → ``is_opt_out`` and ``do_not_email``
set, the e-mail ``on_hold`` when the status is a bounce, removed from the newsletter
``group_id``; subscribed → added to that group, and the flags cleared only by a newer
positive status (a confirmed double opt-in or ``active``); never opted in → untouched.

CiviCRM answers HTTP 500 both for validation errors and for database trouble, so the
client does not retry a 500 by itself (only 502/503/504); a 500 *per call* is a refusal of
that item, parked with CiviCRM's error code.
"""

from __future__ import annotations

import builtins
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from typing import Any, ClassVar, Literal
from urllib.parse import urlencode

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
from proca_sync.destinations.http import ApiClient, RateLimiter
from proca_sync.errors import BackendUnavailableError, ConfigError, ProcaSyncError, TransientError

__all__ = ["CivicrmConfig", "CivicrmDestination"]

POSITIVE_STATUSES = frozenset({"double_opt_in", "active"})


class CivicrmConfig(DestinationConfig):
    """``[destinations.NAME]`` with ``type = "civicrm"`` (``base_url`` is the site root)."""

    type: Literal["civicrm"]
    path: str = "/civicrm/ajax/api4"
    site_key_env: str | None = None
    group_id: int | None = Field(default=None, description="The newsletter group.")
    campaign_groups: bool = True
    group_prefix: str = "proca_"
    activity_type: str = "Petition Signature"
    activity_types: dict[str, str] = Field(
        default_factory=dict, description="Proca action type → CiviCRM activity type name."
    )
    source: str = "proca"
    timeout: float = Field(
        default=120.0, gt=0, description="Seconds per request: one request carries a batch."
    )


class CivicrmDestination:
    """Keeps a CiviCRM site in sync through APIv4; see the module docstring."""

    type: ClassVar[str] = "civicrm"
    Config: ClassVar[builtins.type[CivicrmConfig]] = CivicrmConfig
    supports_erasure = True

    def __init__(self, name: str, config: CivicrmConfig) -> None:
        if not config.base_url:
            raise ConfigError(f"destination {name!r}: base_url (the CiviCRM site) is required")
        self.name = name
        self.config = config
        headers = {
            "X-Civi-Auth": f"Bearer {config.api_key()}",
            "X-Requested-With": "XMLHttpRequest",
            "Content-Type": "application/x-www-form-urlencoded",
            "Accept": "application/json",
        }
        if config.site_key_env:
            headers["X-Civi-Key"] = DestinationConfig(
                type="site-key", api_key_env=config.site_key_env
            ).api_key()
        self.max_batch = config.batch_size or 250
        common: dict[str, Any] = {
            "name": name,
            "base_url": config.base_url,
            "headers": headers,
            "timeout": config.timeout,
            "retryable": frozenset({502, 503, 504}),
        }
        self._client = ApiClient(
            **common, limiter=RateLimiter(config.rate or 5.0, config.burst or 5)
        )
        # Creates are not idempotent: a write whose answer was lost is not sent again by
        # the client; the next push looks the e-mails and action ids up first.
        self._writes = ApiClient(**common, limiter=self._client.limiter, attempts=1)
        self._groups: dict[str, int] = {}

    async def open(self) -> None:
        await self._client.open()
        await self._writes.open()

    async def close(self) -> None:
        await self._client.close()
        await self._writes.close()

    async def ping(self) -> None:
        calls: dict[str, list[Any]] = {
            "contact": ["Contact", "get", {"select": ["id"], "limit": 1}]
        }
        if self.config.group_id is not None:
            calls["group"] = [
                "Group",
                "get",
                {"select": ["id"], "where": [["id", "=", self.config.group_id]]},
            ]
        results = await self._multi(calls)
        for key, result in results.items():
            if "error_message" in result or "error_code" in result:
                raise BackendUnavailableError(f"{self.name}: ping {key} refused ({_code(result)})")
        if self.config.group_id is not None and not results["group"].get("values"):
            raise ConfigError(f"{self.name}: group_id {self.config.group_id} does not exist")

    # ---- transport -------------------------------------------------------------------

    async def _multi(
        self, calls: Mapping[str, list[Any]], *, write: bool = False
    ) -> dict[str, dict[str, Any]]:
        """One multi-call request; the per-call results keyed like ``calls``."""
        body = urlencode({"calls": orjson.dumps(calls).decode()})
        client = self._writes if write else self._client
        answer = await client.request(
            "POST", self.config.path, data=body, what="POST api4 (multi-call)"
        )
        results = answer.body
        if not isinstance(results, dict) or (calls and not set(calls) <= set(results)):
            raise BackendUnavailableError(
                f"{self.name}: api4 multi-call answered {answer.status} without per-call results"
            )
        return results

    def _refusal(self, what: str, result: dict[str, Any]) -> ProcaSyncError:
        code = _code(result)
        if result.get("status") == 403:
            return TransientError(f"{self.name}: {what} not permitted to the API user (403)")
        return DestinationRejectedError(f"{self.name}: {what} refused ({code})", code=code)

    # ---- push ------------------------------------------------------------------------

    def _activity_type(self, action: ActionView) -> str:
        return self.config.activity_types.get(action.action_type, self.config.activity_type)

    async def push(self, batch: Batch) -> PushReport:
        report = PushReport()
        start = self._requests()
        contacts = [c for c in batch.contacts if self.config.include_testing or not c.testing]
        actions = [a for a in batch.actions if self.config.include_testing or not a.testing]
        emails = sorted({c.email for c in contacts} | {e.email for e in batch.erasures})
        campaign_names = sorted({c for contact in contacts for c in contact.campaigns})
        wanted_groups = [
            self.config.group_prefix + c
            for c in campaign_names
            if self.config.campaign_groups and self.config.group_prefix + c not in self._groups
        ]
        lookup: dict[str, list[Any]] = {}
        if emails:
            lookup["emails"] = [
                "Email",
                "get",
                {
                    "select": ["id", "contact_id", "email"],
                    "where": [["email", "IN", emails], ["contact_id.is_deleted", "=", False]],
                    "orderBy": {"contact_id": "ASC", "is_primary": "DESC"},
                },
            ]
        if actions:
            lookup["activities"] = [
                "Activity",
                "get",
                {
                    "select": ["source_record_id"],
                    "where": [
                        ["source_record_id", "IN", sorted(a.action_id for a in actions)],
                        [
                            "activity_type_id:name",
                            "IN",
                            sorted({self._activity_type(a) for a in actions}),
                        ],
                    ],
                },
            ]
        if wanted_groups:
            lookup["groups"] = [
                "Group",
                "get",
                {"select": ["id", "name"], "where": [["name", "IN", wanted_groups]]},
            ]
        if not lookup:
            return report
        found = await self._multi(lookup)
        for key, result in found.items():
            if "error_code" in result or "error_message" in result:
                raise BackendUnavailableError(
                    f"{self.name}: look-up {key} failed ({_code(result)})"
                )
        # The oldest contact holding the address wins when several do.
        matches: dict[str, tuple[int, int]] = {}
        for row in found.get("emails", {}).get("values") or []:
            matches.setdefault(str(row["email"]).lower(), (int(row["contact_id"]), int(row["id"])))
        recorded = {
            int(row["source_record_id"])
            for row in found.get("activities", {}).get("values") or []
            if row.get("source_record_id") is not None
        }
        for row in found.get("groups", {}).get("values") or []:
            self._groups[str(row["name"])] = int(row["id"])
        await self._create_groups(batch, [g for g in wanted_groups if g not in self._groups])

        # Contacts, each with its e-mail, address and groups.
        calls = {f"c{c.contact_id}": self._contact_call(c, matches.get(c.email)) for c in contacts}
        ids: dict[int, int] = {}
        if calls:
            results = await self._multi(calls, write=True)
            for contact in contacts:
                result = results[f"c{contact.contact_id}"]
                if "error_code" in result or "error_message" in result:
                    report.failed[contact.key] = self._refusal("contact write", result)
                    continue
                values = result.get("values") or []
                if values:
                    ids[contact.contact_id] = int(values[0]["id"])
                elif contact.email in matches:
                    ids[contact.contact_id] = matches[contact.email][0]

        # Activities not recorded yet.
        activity_calls: dict[str, list[Any]] = {}
        by_key: dict[str, ActionView] = {}
        for action in actions:
            if action.action_id in recorded:
                continue
            target = ids.get(action.contact_id)
            if target is None:
                owner: ItemKey = ("contact", str(action.contact_id))
                report.failed[action.key] = report.failed.get(owner) or TransientError(
                    f"{self.name}: action {action.action_id} without its contact written"
                )
                continue
            key = f"a{action.action_id}"
            by_key[key] = action
            activity_calls[key] = ["Activity", "create", {"values": self._activity(action, target)}]
        if activity_calls:
            results = await self._multi(activity_calls, write=True)
            for key, action in by_key.items():
                result = results[key]
                if "error_code" in result or "error_message" in result:
                    report.failed[action.key] = self._refusal("activity create", result)

        if batch.erasures:
            await self._erase(batch, found.get("emails", {}).get("values") or [], report)
        report.requests = self._requests() - start
        return report

    @property
    def throttled(self) -> int:
        """429 answers received (the pusher's metrics)."""
        return self._client.stats.throttled + self._writes.stats.throttled

    def _requests(self) -> int:
        return self._client.stats.requests + self._writes.stats.requests

    async def _create_groups(self, batch: Batch, names: Sequence[str]) -> None:
        if not names:
            return
        prefix = len(self.config.group_prefix)
        calls: dict[str, list[Any]] = {}
        for n, name in enumerate(names):
            campaign = batch.campaigns.get(name[prefix:])
            title = (campaign.title if campaign and campaign.title else name[prefix:]) or name
            calls[f"g{n}"] = [
                "Group",
                "create",
                {
                    "values": {
                        "name": name,
                        "title": f"{title} ({name})",
                        "source": self.config.source,
                    }
                },
            ]
        results = await self._multi(calls, write=True)
        for n, name in enumerate(names):
            result = results[f"g{n}"]
            values = result.get("values") or []
            if not values:
                raise BackendUnavailableError(
                    f"{self.name}: Group.create for a campaign failed ({_code(result)})"
                )
            self._groups[name] = int(values[0]["id"])

    def _contact_call(self, contact: ContactView, match: tuple[int, int] | None) -> list[Any]:
        values: dict[str, Any] = {}
        if contact.first_name:
            values["first_name"] = contact.first_name
        if contact.last_name:
            values["last_name"] = contact.last_name
        on_hold: int | None = None
        subscription = contact.subscription
        if subscription == "unsubscribed":
            values.update(is_opt_out=True, do_not_email=True)
            on_hold = 1 if contact.email_status == "bounce" else 0
        elif subscription == "subscribed" and contact.email_status in POSITIVE_STATUSES:
            values.update(is_opt_out=False, do_not_email=False)
            on_hold = 0
        groups: list[dict[str, Any]] = []
        if self.config.group_id is not None and subscription != "not_opted_in":
            status = "Added" if subscription == "subscribed" else "Removed"
            groups.append({"group_id": self.config.group_id, "status": status})
        if self.config.campaign_groups:
            for campaign in contact.campaigns:
                group = self._groups.get(self.config.group_prefix + campaign)
                if group is not None:
                    groups.append({"group_id": group, "status": "Added"})
        chain: dict[str, list[Any]] = {}
        address: dict[str, Any] = {}
        if contact.postcode:
            address["postal_code"] = contact.postcode
        if contact.country:
            address["country_id:abbr"] = contact.country.upper()
        if address:
            chain["address"] = [
                "Address",
                "save",
                {
                    "records": [address],
                    "defaults": {"contact_id": "$id", "is_primary": True, "location_type_id": 1},
                    "match": ["contact_id", "is_primary"],
                },
            ]
        if groups:
            chain["groups"] = [
                "GroupContact",
                "save",
                {
                    "records": groups,
                    "defaults": {"contact_id": "$id"},
                    "match": ["group_id", "contact_id"],
                },
            ]
        if match is None:
            values.update(contact_type="Individual", source=self.config.source)
            email: dict[str, Any] = {
                "contact_id": "$id",
                "email": contact.email,
                "is_primary": True,
            }
            if on_hold is not None:
                email["on_hold"] = on_hold
            # The e-mail first: a refused address fails the call before the rest is written.
            chain = {"email": ["Email", "create", {"values": email}], **chain}
            return ["Contact", "create", {"values": values, "chain": chain}]
        contact_id, email_id = match
        if on_hold is not None:
            chain["email"] = [
                "Email",
                "update",
                {"where": [["id", "=", email_id]], "values": {"on_hold": on_hold}},
            ]
        if not values:  # nothing to change on the contact itself: its chain only
            return [
                "Contact",
                "get",
                {"select": ["id"], "where": [["id", "=", contact_id]], "chain": chain},
            ]
        return [
            "Contact",
            "update",
            {"where": [["id", "=", contact_id]], "values": values, "chain": chain},
        ]

    def _activity(self, action: ActionView, contact_id: int) -> dict[str, Any]:
        return {
            "activity_type_id:name": self._activity_type(action),
            "source_record_id": action.action_id,
            "source_contact_id": contact_id,
            "target_contact_id": [contact_id],
            "subject": f"{action.action_type} {action.campaign}"[:255],
            "activity_date_time": _civi_time(action.created_at),
            "status_id:name": "Completed",
        }

    async def _erase(
        self, batch: Batch, rows: Sequence[Mapping[str, Any]], report: PushReport
    ) -> None:
        """Delete (not trash) every contact holding an erased address."""
        by_email: dict[str, set[int]] = {}
        for row in rows:
            by_email.setdefault(str(row["email"]).lower(), set()).add(int(row["contact_id"]))
        calls: dict[str, list[Any]] = {}
        for erasure in batch.erasures:
            ids = sorted(by_email.get(erasure.email, ()))
            if ids:
                calls[_call_name(erasure)] = [
                    "Contact",
                    "delete",
                    {"where": [["id", "IN", ids]], "useTrash": False},
                ]
        if not calls:
            return
        results = await self._multi(calls)
        for erasure in batch.erasures:
            result = results.get(_call_name(erasure))
            if result is not None and ("error_code" in result or "error_message" in result):
                report.failed[erasure.key] = self._refusal("contact delete", result)


def _call_name(erasure: Erasure) -> str:
    """The call's name in a multi-call: ``e<tombstone>``, or ``r<contact>`` for a
    retirement (their ids come from different tables)."""
    kind, ident = erasure.key
    return f"{'r' if kind == 'retired' else 'e'}{ident}"


def _code(result: Mapping[str, Any]) -> str:
    code = result.get("error_code")
    if code in (None, "", 0, "0", "1", 1):
        return f"http_{result.get('status', 500)}"
    return str(code)


def _civi_time(value: str) -> str:
    """An ISO time as CiviCRM stores it (``YYYY-MM-DD HH:MM:SS``, UTC)."""
    if not value:
        return datetime.now(UTC).strftime("%Y-%m-%d %H:%M:%S")
    try:
        when = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return value
    if when.tzinfo is not None:
        when = when.astimezone(UTC)
    return when.strftime("%Y-%m-%d %H:%M:%S")
