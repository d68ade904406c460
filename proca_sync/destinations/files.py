"""Files destinations: ``jsonl`` and ``csv``.

Each keeps two files in the configured directory, created mode 0600 (they hold personal
data):

* a **contact snapshot** (``contacts.jsonl`` / ``contacts.csv``): one row per ledger
  contact with its merged current state, rewritten atomically (a temporary file renamed)
  when a push changes it. A contact written again replaces its row, and any other row
  sharing its e-mail or one of its refs (contacts merged in the ledger, a changed
  address), so the snapshot always shows one row per person;
* an **append-only action log** (``actions.jsonl`` / ``actions.csv``): one line per
  action, appended once (an action id already in the log is never appended again).

Erasure removes the person's row from the snapshot and their lines from the log. A push
that changes nothing writes nothing. Not for concurrent writers: the lease of the pusher
makes sure only one process pushes a destination.
"""

from __future__ import annotations

import csv
import io
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any, ClassVar, Literal

import orjson

from proca_sync.destinations.base import (
    ActionView,
    Batch,
    ContactView,
    DestinationConfig,
    PushReport,
)
from proca_sync.errors import BackendUnavailableError, ConfigError

__all__ = ["CsvConfig", "CsvDestination", "JsonlConfig", "JsonlDestination"]

CONTACT_COLUMNS = (
    "contactId",
    "email",
    "firstName",
    "lastName",
    "postcode",
    "country",
    "subscription",
    "optIn",
    "optInAt",
    "emailStatus",
    "emailStatusChanged",
    "testing",
    "campaigns",
    "refs",
    "fields",
)
ACTION_COLUMNS = (
    "actionId",
    "contactId",
    "email",
    "actionType",
    "campaign",
    "createdAt",
    "testing",
    "data",
)


class JsonlConfig(DestinationConfig):
    type: Literal["jsonl"]
    path: Path
    """Directory of the two files (created 0700 if absent)."""
    contacts_file: str = "contacts.jsonl"
    actions_file: str = "actions.jsonl"


class CsvConfig(DestinationConfig):
    type: Literal["csv"]
    path: Path
    contacts_file: str = "contacts.csv"
    actions_file: str = "actions.csv"


def contact_row(view: ContactView) -> dict[str, Any]:
    """A contact as the snapshot holds it (JSON types)."""
    return {
        "contactId": view.contact_id,
        "email": view.email,
        "firstName": view.first_name,
        "lastName": view.last_name,
        "postcode": view.postcode,
        "country": view.country,
        "subscription": view.subscription,
        "optIn": view.opted_in,
        "optInAt": view.opt_in_at,
        "emailStatus": view.email_status,
        "emailStatusChanged": view.email_status_changed,
        "testing": view.testing,
        "campaigns": list(view.campaigns),
        "refs": list(view.refs),
        "fields": dict(view.fields),
    }


def action_row(view: ActionView, email: str) -> dict[str, Any]:
    return {
        "actionId": view.action_id,
        "contactId": view.contact_id,
        "email": email,
        "actionType": view.action_type,
        "campaign": view.campaign,
        "createdAt": view.created_at,
        "testing": view.testing,
        "data": dict(view.data),
    }


def _write_new(path: Path, data: bytes) -> None:
    """Replace ``path`` atomically with ``data`` (mode 0600)."""
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)


class _FileDestination:
    """The two files, in memory between pushes; subclasses choose the format."""

    type: ClassVar[str] = ""
    supports_erasure = True
    max_batch = 1_000

    def __init__(self, name: str, config: JsonlConfig | CsvConfig) -> None:
        self.name = name
        self.config = config
        self.directory = config.path
        self.contacts_path = config.path / config.contacts_file
        self.actions_path = config.path / config.actions_file
        if config.batch_size:
            self.max_batch = config.batch_size
        self._contacts: dict[int, dict[str, Any]] = {}
        self._action_ids: set[int] = set()
        self._opened = False

    # ---- format ---------------------------------------------------------------------------

    def _dump_contacts(self, rows: Iterable[dict[str, Any]]) -> bytes:
        raise NotImplementedError

    def _load_contacts(self, data: bytes) -> list[dict[str, Any]]:
        raise NotImplementedError

    def _dump_actions(self, rows: Iterable[dict[str, Any]], *, header: bool) -> bytes:
        raise NotImplementedError

    def _load_actions(self, data: bytes) -> list[dict[str, Any]]:
        raise NotImplementedError

    # ---- Destination ----------------------------------------------------------------------

    async def open(self) -> None:
        if self._opened:
            return
        try:
            self.directory.mkdir(mode=0o700, parents=True, exist_ok=True)
            if self.contacts_path.exists():
                for row in self._load_contacts(self.contacts_path.read_bytes()):
                    self._contacts[int(row["contactId"])] = row
            if self.actions_path.exists():
                self._action_ids = {
                    int(row["actionId"])
                    for row in self._load_actions(self.actions_path.read_bytes())
                }
        except OSError as exc:
            raise ConfigError(
                f"destination {self.name}: cannot use {self.directory} ({type(exc).__name__})"
            ) from None
        self._opened = True

    async def close(self) -> None:
        self._opened = False
        self._contacts.clear()
        self._action_ids.clear()

    async def ping(self) -> None:
        try:
            self.directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        except OSError as exc:
            raise ConfigError(
                f"destination {self.name}: cannot use {self.directory} ({type(exc).__name__})"
            ) from None
        if not os.access(self.directory, os.W_OK):
            raise ConfigError(f"destination {self.name}: {self.directory} is not writable")

    async def push(self, batch: Batch) -> PushReport:
        await self.open()
        try:
            return self._push(batch)
        except OSError as exc:
            raise BackendUnavailableError(
                f"destination {self.name}: write failed ({type(exc).__name__})"
            ) from None

    def _push(self, batch: Batch) -> PushReport:
        report = PushReport()
        changed = False
        emails = {c.contact_id: c.email for c in batch.contacts}
        for view in batch.contacts:
            row = contact_row(view)
            refs = set(view.refs)
            for other in [
                cid
                for cid, old in self._contacts.items()
                if cid != view.contact_id
                and (old["email"] == view.email or refs.intersection(old.get("refs") or ()))
            ]:
                del self._contacts[other]
                changed = True
            if self._contacts.get(view.contact_id) != row:
                self._contacts[view.contact_id] = row
                changed = True
        new_actions = [
            action_row(a, emails.get(a.contact_id, ""))
            for a in batch.actions
            if a.action_id not in self._action_ids
        ]
        for erasure in batch.erasures:
            refs = set(erasure.refs)
            gone = {
                cid
                for cid, old in self._contacts.items()
                if old["email"] == erasure.email or refs.intersection(old.get("refs") or ())
            }
            for cid in gone:
                del self._contacts[cid]
            changed = changed or bool(gone)
            self._rewrite_actions(erasure.email, gone)
        if new_actions:
            # Appended before the snapshot: a crash in between leaves the snapshot behind,
            # which the next push (the cursor did not move) brings up to date.
            header = not self.actions_path.exists() or self.actions_path.stat().st_size == 0
            fd = os.open(self.actions_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
            try:
                os.write(fd, self._dump_actions(new_actions, header=header))
            finally:
                os.close(fd)
            self._action_ids.update(int(r["actionId"]) for r in new_actions)
            report.requests += 1
        if changed:
            _write_new(self.contacts_path, self._dump_contacts(self._contacts.values()))
            report.requests += 1
        return report

    def _rewrite_actions(self, email: str, contact_ids: set[int]) -> None:
        if not self.actions_path.exists():
            return
        rows = self._load_actions(self.actions_path.read_bytes())
        kept = [
            row
            for row in rows
            if row.get("email") != email and int(row["contactId"]) not in contact_ids
        ]
        if len(kept) == len(rows):
            return
        _write_new(self.actions_path, self._dump_actions(kept, header=True))
        self._action_ids = {int(r["actionId"]) for r in kept}


class JsonlDestination(_FileDestination):
    """One JSON object per line."""

    Config: ClassVar[type[DestinationConfig]] = JsonlConfig
    type: ClassVar[str] = "jsonl"

    def _dump_contacts(self, rows: Iterable[dict[str, Any]]) -> bytes:
        ordered = sorted(rows, key=lambda r: (r["email"] or "", r["contactId"]))
        return b"".join(orjson.dumps(r, option=orjson.OPT_SORT_KEYS) + b"\n" for r in ordered)

    def _load_contacts(self, data: bytes) -> list[dict[str, Any]]:
        return _lines(data)

    def _dump_actions(self, rows: Iterable[dict[str, Any]], *, header: bool) -> bytes:
        return b"".join(orjson.dumps(r, option=orjson.OPT_SORT_KEYS) + b"\n" for r in rows)

    def _load_actions(self, data: bytes) -> list[dict[str, Any]]:
        return _lines(data)


def _lines(data: bytes) -> list[dict[str, Any]]:
    rows = []
    for line in data.splitlines():
        if not line.strip():
            continue
        try:
            rows.append(orjson.loads(line))
        except orjson.JSONDecodeError:
            continue  # a line cut short by a crash: its action is appended again
    return rows


class CsvDestination(_FileDestination):
    """Comma-separated values with a header row; lists joined by ``;``, ``fields`` and
    ``data`` as JSON text (for spreadsheets)."""

    Config: ClassVar[type[DestinationConfig]] = CsvConfig
    type: ClassVar[str] = "csv"

    def _dump_contacts(self, rows: Iterable[dict[str, Any]]) -> bytes:
        ordered = sorted(rows, key=lambda r: (r["email"] or "", r["contactId"]))
        return _csv(CONTACT_COLUMNS, [_flat(r) for r in ordered], header=True)

    def _load_contacts(self, data: bytes) -> list[dict[str, Any]]:
        return [_unflat(r) for r in csv.DictReader(io.StringIO(data.decode()))]

    def _dump_actions(self, rows: Iterable[dict[str, Any]], *, header: bool) -> bytes:
        return _csv(ACTION_COLUMNS, [_flat(r) for r in rows], header=header)

    def _load_actions(self, data: bytes) -> list[dict[str, Any]]:
        rows = []
        for row in csv.DictReader(io.StringIO(data.decode())):
            if row.get("actionId", "").isdigit() and row.get("contactId", "").isdigit():
                rows.append(row)
        return rows


_LISTS = {"campaigns", "refs"}
_JSONS = {"fields", "data"}
_BOOLS = {"optIn", "testing"}


def _flat(row: dict[str, Any]) -> dict[str, str]:
    out: dict[str, str] = {}
    for key, value in row.items():
        if key in _LISTS:
            out[key] = ";".join(value)
        elif key in _JSONS:
            out[key] = orjson.dumps(value, option=orjson.OPT_SORT_KEYS).decode()
        elif isinstance(value, bool):
            out[key] = "true" if value else "false"
        else:
            out[key] = "" if value is None else str(value)
    return out


def _unflat(row: dict[str, str]) -> dict[str, Any]:
    """The snapshot row back in JSON types (to compare with a new one)."""
    out: dict[str, Any] = {}
    for key, value in row.items():
        if key in _LISTS:
            out[key] = value.split(";") if value else []
        elif key in _JSONS:
            out[key] = orjson.loads(value) if value else {}
        elif key in _BOOLS:
            out[key] = value == "true"
        elif key == "contactId":
            out[key] = int(value)
        else:
            out[key] = value or None
    return out


def _csv(columns: tuple[str, ...], rows: list[dict[str, str]], *, header: bool) -> bytes:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns, lineterminator="\n")
    if header:
        writer.writeheader()
    writer.writerows(rows)
    return buffer.getvalue().encode()
