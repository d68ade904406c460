"""CiviCRM APIv4 over REST, the part a contact sync uses, from CiviCRM's public
documentation (docs.civicrm.org dev/api/v4: REST, chaining, save/match) and
``CRM/Api4/Page/AJAX.php``.

Contract reproduced:
* ``POST /civicrm/ajax/api4/{Entity}/{action}`` with the form field ``params`` (JSON), and
  the multi-call ``POST /civicrm/ajax/api4`` with ``calls`` (a JSON object of
  ``[entity, action, params, index?]``), answered with the results keyed the same; HTTP
  200 when at least one call succeeded, else the first call's error status.
* Each result: ``{values, entity, action, version: 4, count, countFetched}``; a failed
  call: ``{error_code, error_message, status}`` with status 403 (permission) or 500
  (anything else: validation or database).
* AuthX: ``X-Civi-Auth: Bearer <key>``; a request with neither a credential nor
  ``X-Requested-With`` gets 400 "SECURITY ALERT…"; a wrong credential 401. GET is allowed
  for ``get*`` actions only (else 405).
* ``save`` with ``records``, ``defaults`` and ``match`` (update when exactly one record
  matches, else create); ``chain`` with ``$id`` of each result; ``where`` with ``=`` and
  ``IN``, on joined ``contact_id.is_deleted`` and pseudo-constant ``:name`` suffixes.
* Calls are not transactional: a chained call that fails leaves what ran before it.
* No rate limit in core (a proxy's 429 can be switched on with ``limit``).
"""

from __future__ import annotations

import asyncio
import itertools
import json
import re
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

from tests.support.emulators.base import Driver, Emulator
from tests.support.emulators.export import pushed

EMAIL = re.compile(r"^[^@\s]+@[^@\s]+\.[^@\s]+$")
ACTIVITY_TYPES = {"Meeting": 1, "Phone Call": 2, "Email": 3, "Petition Signature": 32}


class ApiError(Exception):
    def __init__(self, message: str, *, status: int = 500, code: Any = 0) -> None:
        super().__init__(message)
        self.status = status
        self.code = code


ENTITIES = ("Contact", "Email", "Address", "Group", "GroupContact", "Activity")
INDEXED = {
    "Email": ("email", "contact_id"),
    "Address": ("contact_id",),
    "GroupContact": ("contact_id",),
    "Activity": ("source_record_id",),
    "Group": ("name",),
}
"""Fields looked up through an index (the emulator must keep up with a 100k backfill)."""


@dataclass
class CivicrmEmulator(Emulator):
    key: str = "civi-emulator-key"
    tables: dict[str, dict[int, dict[str, Any]]] = field(
        default_factory=lambda: {name: {} for name in ENTITIES}
    )
    reject: set[str] = field(default_factory=set)
    """Addresses CiviCRM refuses on ``Email.create`` (besides malformed ones)."""
    forbidden: set[str] = field(default_factory=set)
    """Entities the API user may not write (403 per call)."""
    slow_action: str | None = None
    slow_count: int = 0
    slow_seconds: float = 0.0
    """The next ``slow_count`` multi-calls holding a ``slow_action`` call answer only after
    ``slow_seconds`` — and are applied even if the client gave up (a lost answer)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        self._ids = itertools.count(1)
        self._index: dict[tuple[str, str], dict[Any, set[int]]] = {}
        self._indexed: dict[tuple[str, str, int], tuple[Any]] = {}
        self.tables["Group"][900] = {"id": 900, "name": "newsletter", "title": "Newsletter"}

    # ---- contract --------------------------------------------------------------------

    def authorised(self, request: web.Request) -> bool:
        return request.headers.get("X-Civi-Auth", "") == f"Bearer {self.key}"

    def unauthorised(self) -> web.StreamResponse:
        return web.json_response(
            {"error_code": 401, "error_message": "Invalid credential"}, status=401
        )

    def failed(self, fault: Any) -> web.StreamResponse:
        if fault.status == 503:
            return web.json_response(
                {"status_code": 503, "status_message": "Temporarily unavailable for maintenance."},
                status=503,
            )
        return web.Response(status=fault.status or 500, text="<html>Bad gateway</html>")

    def routes(self, app: web.Application) -> None:
        app.router.add_route("*", "/civicrm/ajax/api4", self.multi)
        app.router.add_route("*", "/civicrm/ajax/api4/{entity}/{action}", self.single)

    def _guard(self, request: web.Request, action: str) -> web.Response | None:
        if "X-Civi-Auth" not in request.headers and "X-Requested-With" not in request.headers:
            return web.json_response(
                {
                    "error_code": 400,
                    "error_message": "SECURITY ALERT: Ajax requests can only be issued by "
                    "javascript clients, eg. CRM.api4().",
                },
                status=400,
            )
        if request.method == "GET" and not action.lower().startswith(("get", "autocomplete")):
            return web.json_response(
                {
                    "error_code": 405,
                    "error_message": "SECURITY: All requests that modify the database must be "
                    "http POST, not GET.",
                },
                status=405,
            )
        return None

    async def multi(self, request: web.Request) -> web.StreamResponse:
        refused = self._guard(request, "" if request.method == "POST" else "create")
        if refused is not None:
            return refused
        form = await request.post()
        calls = json.loads(str(form.get("calls") or "{}"))
        if self.slow_count and any(c[1] == self.slow_action for c in calls.values()):
            self.slow_count -= 1
            await asyncio.sleep(self.slow_seconds)  # sleep-ok: an injected slow answer
        out: dict[str, Any] = {}
        status = 0
        for index, call in calls.items():
            entity, action, params = call[0], call[1], (call[2] if len(call) > 2 else {})
            result, code = self._execute(entity, action, params)
            out[index] = result
            status = 200 if code == 200 else (status or code)
        return web.json_response(out, status=status or 200)

    async def single(self, request: web.Request) -> web.StreamResponse:
        action = request.match_info["action"]
        refused = self._guard(request, action)
        if refused is not None:
            return refused
        form = await request.post()
        raw = form.get("params") or request.query.get("params") or "{}"
        result, code = self._execute(request.match_info["entity"], action, json.loads(str(raw)))
        return web.json_response(result, status=code)

    def _execute(
        self, entity: str, action: str, params: dict[str, Any]
    ) -> tuple[dict[str, Any], int]:
        try:
            values = self._run(entity, action, params)
        except ApiError as exc:
            return {
                "error_code": exc.code,
                "error_message": str(exc),
                "status": exc.status,
            }, exc.status
        return (
            {
                "values": values,
                "entity": entity,
                "action": action,
                "version": 4,
                "count": len(values),
                "countFetched": len(values),
            },
            200,
        )

    # ---- APIv4 -----------------------------------------------------------------------

    def _run(self, entity: str, action: str, params: dict[str, Any]) -> list[dict[str, Any]]:
        if entity not in self.tables:
            raise ApiError(
                f"API ({entity}, {action}) does not exist (join the API team and implement it!)"
            )
        if action != "get" and entity in self.forbidden:
            raise ApiError("Authorization failed", status=403)
        if action == "get":
            rows = self._select(entity, params.get("where") or [])
            limit = params.get("limit")
            rows = sorted(rows, key=lambda r: r["id"])[: limit or None]
            select = params.get("select")
            records = [{k: r.get(k) for k in (select or r)} | {"id": r["id"]} for r in rows]
        elif action == "create":
            records = [self._create(entity, dict(params.get("values") or {}))]
        elif action == "update":
            targets = self._select(entity, params.get("where") or [])
            if not params.get("where"):
                raise ApiError('Parameter "where" is required.')
            records = [self._update(entity, r, dict(params.get("values") or {})) for r in targets]
        elif action == "save":
            records = []
            defaults = params.get("defaults") or {}
            match = params.get("match") or []
            for record in params.get("records") or []:
                values = {**defaults, **record}
                found = (
                    self._select(entity, [[k, "=", values.get(k)] for k in match])
                    if match and "id" not in values
                    else [self.tables[entity][int(values["id"])]]
                    if "id" in values
                    else []
                )
                if len(found) == 1:
                    records.append(self._update(entity, found[0], values))
                else:
                    records.append(self._create(entity, values))
        elif action == "delete":
            if not params.get("where"):
                raise ApiError('Parameter "where" is required.')
            targets = self._select(entity, params["where"])
            for row in targets:
                if entity == "Contact" and params.get("useTrash", True):
                    row["is_deleted"] = True
                else:
                    self._delete(entity, row["id"])
            return [{"id": r["id"]} for r in targets]
        else:
            raise ApiError(f"Api {entity} {action} version 4 does not exist.")
        for record in records:
            for key, call in (params.get("chain") or {}).items():
                sub = _substitute(call[2] if len(call) > 2 else {}, record)
                record[key] = self._run(call[0], call[1], sub)
        return records

    def _select(self, entity: str, clauses: list[Any]) -> list[dict[str, Any]]:
        """Rows matching every clause, found through an index when a clause allows it."""
        table = self.tables[entity]
        rows: Any = None
        for name, op, value in clauses:
            if op not in {"=", "IN"}:
                continue
            wanted = value if op == "IN" else [value]
            if name == "id":
                rows = [table[i] for i in wanted if i in table]
                break
            index = self._index.get((entity, name))
            if index is not None:
                ids = set().union(*(index.get(v, set()) for v in wanted)) if wanted else set()
                rows = [table[i] for i in sorted(ids) if i in table]
                break
        if rows is None:
            rows = list(table.values())
        return [r for r in rows if self._where(entity, r, clauses)]

    def _reindex(self, entity: str, row: dict[str, Any], *, drop: bool = False) -> None:
        for name in INDEXED.get(entity, ()):
            index = self._index.setdefault((entity, name), {})
            old = self._indexed.pop((entity, name, row["id"]), None)
            if old is not None:
                index.get(old[0], set()).discard(row["id"])
            if not drop:
                value = row.get(name)
                index.setdefault(value, set()).add(row["id"])
                self._indexed[(entity, name, row["id"])] = (value,)

    def _where(self, entity: str, row: dict[str, Any], clauses: list[Any]) -> bool:
        for name, op, value in clauses:
            actual = self._field(entity, row, name)
            if op == "=" and actual != value:
                return False
            if op == "IN" and actual not in value:
                return False
        return True

    def _field(self, entity: str, row: dict[str, Any], name: str) -> Any:
        if name == "contact_id.is_deleted":
            contact = self.tables["Contact"].get(row.get("contact_id"))
            return bool(contact and contact.get("is_deleted"))
        if name == "activity_type_id:name":
            return {v: k for k, v in ACTIVITY_TYPES.items()}.get(row.get("activity_type_id"))
        return row.get(name)

    def _normalise(self, entity: str, values: dict[str, Any]) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for key, value in values.items():
            if key == "activity_type_id:name":
                if value not in ACTIVITY_TYPES:
                    raise ApiError(f"Illegal value for activity_type_id: {value}")
                out["activity_type_id"] = ACTIVITY_TYPES[value]
            elif key == "country_id:abbr":
                if not re.fullmatch(r"[A-Z]{2}", str(value)):
                    raise ApiError("Illegal value for country_id")
                out["country_id"] = str(value)
            elif key.endswith(":name"):
                out[key.removesuffix(":name")] = value
            else:
                out[key] = value
        return out

    def _check(self, entity: str, row: dict[str, Any]) -> None:
        if entity == "Email":
            email = str(row.get("email") or "")
            if not EMAIL.match(email) or email.lower() in self.reject:
                raise ApiError("Invalid email address", code="invalid_email")
            if row.get("contact_id") not in self.tables["Contact"]:
                raise ApiError("Mandatory values missing from Api4 Email::create: contact_id")
        if entity == "Contact" and row.get("contact_type") not in {
            "Individual",
            "Organization",
            "Household",
        }:
            raise ApiError("Mandatory values missing from Api4 Contact::create: contact_type")
        if entity == "GroupContact" and row.get("group_id") not in self.tables["Group"]:
            raise ApiError("Illegal value for group_id")

    def _create(self, entity: str, values: dict[str, Any]) -> dict[str, Any]:
        row = self._normalise(entity, values)
        row.pop("id", None)
        row = {"id": next(self._ids), **row}
        if entity == "Contact":
            row.setdefault("is_opt_out", False)
            row.setdefault("do_not_email", False)
            row.setdefault("is_deleted", False)
        if entity == "Email":
            row.setdefault("on_hold", 0)
        self._check(entity, row)
        self.tables[entity][row["id"]] = row
        self._reindex(entity, row)
        return dict(row)

    def _update(self, entity: str, row: dict[str, Any], values: dict[str, Any]) -> dict[str, Any]:
        candidate = {**row, **self._normalise(entity, values)}
        self._check(entity, candidate)
        row.update(candidate)
        self._reindex(entity, row)
        return dict(row)

    def _delete(self, entity: str, row_id: int) -> None:
        row = self.tables[entity].pop(row_id, None)
        if row is not None:
            self._reindex(entity, row, drop=True)
        if entity == "Contact":
            for name in ("Email", "Address", "GroupContact"):
                for dependent in self._select(name, [["contact_id", "=", row_id]]):
                    self._delete(name, dependent["id"])
            for rid, act in list(self.tables["Activity"].items()):
                if act.get("source_contact_id") == row_id or row_id in (
                    act.get("target_contact_id") or []
                ):
                    del self.tables["Activity"][rid]

    # ---- observation -----------------------------------------------------------------

    def state(self) -> dict[str, dict[str, Any]]:
        """Live contacts keyed by their primary e-mail, normalised for comparison."""
        addresses: dict[int, dict[str, Any]] = {}
        for address in self.tables["Address"].values():
            if address.get("is_primary"):
                addresses[address["contact_id"]] = address
        groups: dict[int, list[str]] = {}
        for member in self.tables["GroupContact"].values():
            if member.get("status") == "Added":
                name = self.tables["Group"][member["group_id"]]["name"]
                groups.setdefault(member["contact_id"], []).append(name)
        activities: dict[int, list[int]] = {}
        for activity in self.tables["Activity"].values():
            for target in activity.get("target_contact_id") or []:
                activities.setdefault(target, []).append(int(activity["source_record_id"]))
        out: dict[str, dict[str, Any]] = {}
        for email in self.tables["Email"].values():
            contact = self.tables["Contact"].get(email["contact_id"])
            if contact is None or contact.get("is_deleted") or not email.get("is_primary"):
                continue
            cid = contact["id"]
            address = addresses.get(cid, {})
            out[str(email["email"]).lower()] = {
                "first_name": contact.get("first_name"),
                "last_name": contact.get("last_name"),
                "postal_code": address.get("postal_code"),
                "country": address.get("country_id"),
                "is_opt_out": bool(contact.get("is_opt_out")),
                "do_not_email": bool(contact.get("do_not_email")),
                "on_hold": int(email.get("on_hold") or 0),
                "groups": sorted(groups.get(cid, [])),
                "activities": sorted(activities.get(cid, [])),
            }
        return out


def _substitute(value: Any, record: dict[str, Any]) -> Any:
    if isinstance(value, str) and value.startswith("$"):
        return record.get(value[1:], value)
    if isinstance(value, list):
        return [_substitute(v, record) for v in value]
    if isinstance(value, dict):
        return {k: _substitute(v, record) for k, v in value.items()}
    return value


class CivicrmDriver(Driver):
    type = "civicrm"
    key_env = "PROCA_TEST_CIVICRM_KEY"
    key = "civi-emulator-key"

    def make(self, *, latency: float = 0.0, rate_limited: bool = True) -> CivicrmEmulator:
        return CivicrmEmulator(latency=latency, key=self.key)

    def config(self, emulator: Emulator) -> dict[str, Any]:
        return {
            "type": "civicrm",
            "base_url": emulator.url,
            "api_key_env": self.key_env,
            "group_id": 900,
        }

    def snapshot(self, emulator: Emulator) -> dict[str, Any]:
        assert isinstance(emulator, CivicrmEmulator)
        state: dict[str, Any] = emulator.call(emulator.state)
        return state

    def expected(self, export: dict[str, Any], config: dict[str, Any]) -> dict[str, Any]:
        prefix = config.get("group_prefix", "proca_")
        newsletter = "newsletter" if config.get("group_id") == 900 else None
        out = {}
        for contact, actions in pushed(export, config):
            unsubscribed = contact.subscription == "unsubscribed"
            groups = (
                [prefix + c for c in contact.campaigns]
                if config.get("campaign_groups", True)
                else []
            )
            if newsletter and contact.subscription == "subscribed":
                groups.append(newsletter)
            out[contact.email] = {
                "first_name": contact.first_name or None,
                "last_name": contact.last_name or None,
                "postal_code": contact.postcode or None,
                "country": contact.country.upper() if contact.country else None,
                "is_opt_out": unsubscribed,
                "do_not_email": unsubscribed,
                "on_hold": 1 if unsubscribed and contact.email_status == "bounce" else 0,
                "groups": sorted(groups),
                "activities": sorted(a.action_id for a in actions),
            }
        return out


DRIVER = CivicrmDriver()
