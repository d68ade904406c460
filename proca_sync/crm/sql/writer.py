"""The CRM's write path: SQL statements built once per dialect, and the batch and record
writers that merge records into the stored state."""

from __future__ import annotations

import hashlib
import math
import re
import time
from collections.abc import Iterable, Sequence
from typing import Any

import orjson

from proca_sync.crm.base import ApplyResult
from proca_sync.crm.sql.changelog import CHANGES_LOCK, TombstoneCheck
from proca_sync.crm.sql.schema import (
    _OPT_IN_TEXT,
)
from proca_sync.crm.sql.store import _now
from proca_sync.sync.contacts import ContactState, timestamp_key
from proca_sync.sync.model import COLUMN_FIELDS
from proca_sync.sync.records import (
    ActionRecord,
    CampaignFact,
    ConsentFact,
    ContactFacts,
    StatusFact,
    SyncRecord,
)


class _Statements:
    """The write path's SQL, in the driver's parameter style, built once.

    The hot path runs on the driver's cursor: building SQLAlchemy statements per
    message costs several times more than executing them.
    """

    def __init__(self, dialect: str) -> None:
        self.postgres = dialect == "postgresql"
        self._cache: dict[tuple[int, int], str] = {}
        self._in_cache: dict[tuple[str, int], str] = {}
        json = "CAST(:{} AS JSONB)" if self.postgres else ":{}"
        contact_columns = [name for name in _CONTACT_COLUMNS]
        values = ", ".join(json.format(c) if c == "fields" else f":{c}" for c in contact_columns)
        sets = ", ".join(
            f"{c} = {json.format(c) if c == 'fields' else ':' + c}" for c in contact_columns
        )
        returning = " RETURNING id" if self.postgres else ""
        self.insert_contact = self._q(
            f"INSERT INTO contacts ({', '.join(contact_columns)}) VALUES ({values}){returning}"
        )
        self.update_contact = self._q(f"UPDATE contacts SET {sets} WHERE id = :id")
        self.load_contact = self._q(f"SELECT {_STATE_COLUMNS} FROM contacts WHERE id = :id")
        self.load_keys = self._q("SELECT kind, value FROM contact_keys WHERE contact_id = :id")
        self.insert_key = self._q(
            "INSERT INTO contact_keys (kind, value, contact_id) VALUES (:kind, :value, :contact_id)"
        )
        self.move = {
            table: self._q(f"UPDATE {table} SET contact_id = :survivor WHERE contact_id = :other")
            for table in ("contact_keys", "actions", "consents")
        }
        self.copy_statuses = self._q(
            "INSERT INTO email_status_history (contact_id, status, changed_at, stamp, source) "
            "SELECT :survivor, status, changed_at, stamp, source FROM email_status_history "
            "WHERE contact_id = :other ON CONFLICT DO NOTHING"
        )
        self.delete_statuses = self._q("DELETE FROM email_status_history WHERE contact_id = :other")
        self.delete_contact = self._q("DELETE FROM contacts WHERE id = :other")
        self.insert_consent = self._q(
            "INSERT INTO consents (contact_id, action_id, opt_in, given_at) "
            "VALUES (:contact_id, :action_id, :opt_in, :given_at) ON CONFLICT DO NOTHING"
        )
        self.insert_status = self._q(
            "INSERT INTO email_status_history (contact_id, status, changed_at, stamp, source) "
            "VALUES (:contact_id, :status, :changed_at, :stamp, :source) ON CONFLICT DO NOTHING"
        )
        action_columns = "contact_id, action_type, campaign, created_at, testing, version, data"
        self.insert_action = self._q(
            f"INSERT INTO actions (action_id, {action_columns}) VALUES (:action_id, "
            f":contact_id, :action_type, :campaign, :created_at, :testing, :version, "
            f"{json.format('data')})"
        )
        self.update_action = self._q(
            "UPDATE actions SET contact_id = :contact_id, action_type = :action_type, "
            "campaign = :campaign, created_at = :created_at, testing = :testing, "
            f"version = :version, data = {json.format('data')} WHERE action_id = :action_id"
        )
        self.move_action = self._q(
            "UPDATE actions SET contact_id = :contact_id WHERE action_id = :action_id"
        )
        self.update_campaign = self._q(
            "UPDATE campaigns SET title = :title, external_id = :external_id, stamp = :stamp, "
            f"data = {json.format('data')} WHERE name = :name AND stamp < :stamp"
        )
        self.insert_campaign = self._q(
            "INSERT INTO campaigns (name, title, external_id, stamp, data) VALUES (:name, "
            f":title, :external_id, :stamp, {json.format('data')}) ON CONFLICT DO NOTHING"
        )
        self.insert_applied = self._q(
            "INSERT INTO applied_messages (key, kind, applied_at) VALUES (:key, :kind, :applied_at)"
        )
        self.action_owner = self._q(
            "SELECT contact_id, version FROM actions WHERE action_id = :action_id"
        )
        self.campaign_stamp = self._q("SELECT stamp FROM campaigns WHERE name = :name")
        self.insert_change = self._q(
            "INSERT INTO changes (kind, entity, at) VALUES (:kind, :entity, :at)"
        )
        # Change numbers in commit order on PostgreSQL: see changelog.py.
        self.lock_changes = "SELECT pg_advisory_xact_lock(%(key)s)" if self.postgres else ""
        self.insert_contact_id = self._q(
            f"INSERT INTO contacts (id, {', '.join(contact_columns)}) VALUES (:id, {values})"
        )
        self.next_contact_ids = (
            "SELECT nextval(pg_get_serial_sequence('contacts', 'id')) "
            "FROM generate_series(1, %(count)s)"
        )
        # On PostgreSQL one statement writes all the rows of a kind, sent as one JSON
        # array; SQLite runs the row statement per row (executemany), in-process.
        self.bulk: dict[str, tuple[str, tuple[tuple[str, type], ...]]] = {}
        if self.postgres:
            for name, (table, key, columns) in _BULK.items():
                sql = _bulk_update(table, key, columns) if key else _bulk_insert(table, columns)
                self.bulk[name] = (sql, tuple((c, kind[0]) for c, kind in columns.items()))

    def _q(self, sql: str) -> str:
        return re.sub(r":(\w+)", r"%(\1)s", sql) if self.postgres else sql

    def find_contacts(self, refs: int, emails: int) -> str:
        """Contacts holding any of ``refs`` contact refs or ``emails`` e-mails (:r0…, :e0…)."""
        key = (refs, emails)
        sql = self._cache.get(key)
        if sql is None:
            parts = []
            if refs:
                names = ", ".join(f":r{i}" for i in range(refs))
                parts.append(f"(kind = 'ref' AND value IN ({names}))")
            if emails:
                names = ", ".join(f":e{i}" for i in range(emails))
                parts.append(f"(kind = 'email' AND value IN ({names}))")
            sql = self._q(
                "SELECT DISTINCT contact_id FROM contact_keys WHERE " + " OR ".join(parts)
            )
            self._cache[key] = sql
        return sql

    def select(self, query: tuple[str, str], count: int) -> str:
        """``query`` (its text ends in a column; with its array type) for ``count``
        values: ``IN (:p0, …)`` on SQLite, ``= ANY(:p)`` on PostgreSQL (one array)."""
        key = (query[0], count)
        sql = self._in_cache.get(key)
        if sql is None:
            if self.postgres:
                sql = f"{query[0]} = ANY(CAST(%(p)b AS {query[1]}[]))"
            else:
                sql = f"{query[0]} IN ({', '.join(f':p{i}' for i in range(count))})"
            self._in_cache[key] = sql
        return sql


# The batch's up-front reads: a query ending in a column, and the column's array type
# (the values are appended by _Statements.select).
_STATE_COLUMNS = (
    "admitted, fields, real, opted_in, opt_in_at, email_status, email_status_changed, "
    "email_status_stamp"
)
_KEY_COLUMNS = "SELECT kind, value, contact_id FROM contact_keys WHERE"
_APPLIED_KEYS = ("SELECT key FROM applied_messages WHERE key", "TEXT")
_KEYS_BY_REF = (f"{_KEY_COLUMNS} kind = 'ref' AND value", "TEXT")
_KEYS_BY_EMAIL = (f"{_KEY_COLUMNS} kind = 'email' AND value", "TEXT")
_KEYS_BY_CONTACT = (f"{_KEY_COLUMNS} contact_id", "INTEGER")
_CONTACTS_BY_ID = (f"SELECT id, {_STATE_COLUMNS} FROM contacts WHERE id", "INTEGER")
_ACTIONS_BY_ID = ("SELECT action_id, contact_id, version FROM actions WHERE action_id", "BIGINT")
_CAMPAIGNS_BY_NAME = ("SELECT name, stamp FROM campaigns WHERE name", "TEXT")
_TOMBSTONES_BY_HASH = ("SELECT hash, erased_at FROM tombstone_keys WHERE hash", "TEXT")
_IN_CHUNK = 500
"""Values per ``IN`` list on SQLite."""

# The batched writes on PostgreSQL: table, key column of an update ("" for an insert),
# and each column's Python type and PostgreSQL type. The rows travel as one JSON array
# (serialised by orjson, unpacked by json_to_recordset); JSONB values travel as text. A
# value of another Python type (a personal field may be a number) sends the rows one by
# one instead, with the row statement, so that the database converts it as ever.
_TEXT = (str, "TEXT")
_JSON_TEXT = (str, "JSONB")
_BOOL = (bool, "BOOLEAN")
_INT = (int, "INTEGER")
_BIGINT = (int, "BIGINT")
_FLOAT = (float, "DOUBLE PRECISION")
_CONTACT_TYPES = {
    "admitted": _BOOL,
    "email": _TEXT,
    "first_name": _TEXT,
    "last_name": _TEXT,
    "postcode": _TEXT,
    "country": _TEXT,
    "fields": _JSON_TEXT,
    "real": _BOOL,
    "opted_in": _BOOL,
    "opt_in_at": _TEXT,
    "email_status": _TEXT,
    "email_status_changed": _TEXT,
    "email_status_stamp": _TEXT,
    "subscribed": _BOOL,
    "updated_at": _TEXT,
}
_ACTION_TYPES = {
    "action_id": _BIGINT,
    "contact_id": _INT,
    "action_type": _TEXT,
    "campaign": _TEXT,
    "created_at": _TEXT,
    "testing": _BOOL,
    "version": _TEXT,
    "data": _JSON_TEXT,
}
_BULK: dict[str, tuple[str, str, dict[str, tuple[type, str]]]] = {
    "insert_contact_id": ("contacts", "", {"id": _INT, **_CONTACT_TYPES}),
    "update_contact": ("contacts", "id", {"id": _INT, **_CONTACT_TYPES}),
    "insert_key": ("contact_keys", "", {"kind": _TEXT, "value": _TEXT, "contact_id": _INT}),
    "insert_consent": (
        "consents",
        "",
        {"contact_id": _INT, "action_id": _BIGINT, "opt_in": _TEXT, "given_at": _TEXT},
    ),
    "insert_status": (
        "email_status_history",
        "",
        {
            "contact_id": _INT,
            "status": _TEXT,
            "changed_at": _TEXT,
            "stamp": _TEXT,
            "source": _TEXT,
        },
    ),
    "insert_action": ("actions", "", _ACTION_TYPES),
    "update_action": ("actions", "action_id", _ACTION_TYPES),
    "move_action": ("actions", "action_id", {"action_id": _BIGINT, "contact_id": _INT}),
    "insert_applied": (
        "applied_messages",
        "",
        {"key": _TEXT, "kind": _TEXT, "applied_at": _TEXT},
    ),
    "insert_change": ("changes", "", {"kind": _TEXT, "entity": _TEXT, "at": _FLOAT}),
}
_ON_CONFLICT = {"consents", "email_status_history"}


def _recordset(columns: dict[str, tuple[type, str]], alias: str = "") -> str:
    """``json_to_recordset`` of the ``rows`` parameter, with its column definitions."""
    defs = ", ".join(f"{c} {'TEXT' if pg == 'JSONB' else pg}" for c, (_, pg) in columns.items())
    return f"json_to_recordset(CAST(%(rows)s AS JSON)) AS {alias}({defs})"


def _column(column: str, pg_type: str) -> str:
    return f"CAST(t.{column} AS JSONB)" if pg_type == "JSONB" else f"t.{column}"


def _bulk_insert(table: str, columns: dict[str, tuple[type, str]]) -> str:
    """Insert the rows in order (so serial ids are drawn in that order, as row by row)."""
    names = ", ".join(columns)
    values = ", ".join(_column(c, pg) for c, (_, pg) in columns.items())
    conflict = " ON CONFLICT DO NOTHING" if table in _ON_CONFLICT else ""
    return (
        f"INSERT INTO {table} ({names}) SELECT {values} FROM ROWS FROM ({_recordset(columns)}) "
        f"WITH ORDINALITY AS t({names}, ord) ORDER BY t.ord{conflict}"
    )


def _bulk_update(table: str, key: str, columns: dict[str, tuple[type, str]]) -> str:
    """Update each row found by ``key`` (the batch updates a row at most once)."""
    sets = ", ".join(f"{c} = {_column(c, pg)}" for c, (_, pg) in columns.items() if c != key)
    source = _recordset(columns, "t")
    return f"UPDATE {table} SET {sets} FROM {source} WHERE {table}.{key} = t.{key}"


_CONTACT_COLUMNS = (
    "admitted",
    "email",
    "first_name",
    "last_name",
    "postcode",
    "country",
    "fields",
    "real",
    "opted_in",
    "opt_in_at",
    "email_status",
    "email_status_changed",
    "email_status_stamp",
    "subscribed",
    "updated_at",
)


def _json_value(value: Any) -> Any:
    """JSON columns come back as text from SQLite and decoded from PostgreSQL."""
    return orjson.loads(value) if isinstance(value, str | bytes) else value


_LOCK_KEYS = "SELECT count(pg_advisory_xact_lock(k)) FROM unnest(CAST(%(p)s AS BIGINT[])) AS k"
_LOCK_CONTACTS = (
    "SELECT id FROM contacts WHERE id = ANY(CAST(%(p)s AS INTEGER[])) ORDER BY id FOR UPDATE"
)


def _lock_id(kind: str, value: object) -> int:
    """A 64-bit advisory lock id for one key (collisions only serialise more)."""
    text = f"{kind}\x00{value}".encode("utf-8", "backslashreplace")
    return int.from_bytes(hashlib.blake2b(text, digest_size=8).digest(), "big", signed=True)


def lock_batch(cursor: Any, sql: _Statements, records: Sequence[SyncRecord]) -> int:
    """Lock, on PostgreSQL, everything a batch reads before it merges: concurrent
    writers into one ledger then reach the state one writer reaches.

    Why locks and not ``SERIALIZABLE``: a batch reads a few hundred keys with ``= ANY``
    index scans and writes hundreds of rows; under SSI its predicate locks span index
    pages, so two batches of *different* contacts fail each other often (each failure
    costs a whole batch again), while locks make only batches that share a contact wait.
    Why not one global lock: the write would run one process at a time, and the write
    is half of a message's cost into PostgreSQL.

    Two steps, in the transaction of the batch (READ COMMITTED):

    1. Advisory transaction locks on every key the batch *names* — message keys (so an
       idempotency key is checked and written by one transaction at a time), contact
       refs and e-mails, action ids, campaign names — in one sorted statement (a fixed
       order: two batches never wait on each other in a cycle here). No other writer
       can now attach, create or re-point those keys.
    2. Row locks (``FOR UPDATE``) on the contacts those keys and actions lead to, and
       again on whatever they lead to once locked, until nothing new turns up: a merge
       by another batch (which needed the same row locks) may have moved a key to
       another contact while this one waited. A contact's row, its keys and its history
       change only under its row lock, so everything the batch reads next is stable.

    A cycle the second step can still form (rare: it needs two batches each reaching a
    contact the other locked first) is a deadlock PostgreSQL breaks by failing one; the
    backend retries it. Returns the number of contacts locked."""
    ids: set[int] = set()
    refs: list[str] = []
    emails: list[str] = []
    actions: list[object] = []
    for record in records:
        ids.add(_lock_id("key", record.key))
        if record.contact is not None:
            refs.extend(record.contact.refs)
            emails.extend(record.contact.emails)
            ids.update(_lock_id("ref", r) for r in record.contact.refs)
            ids.update(_lock_id("email", e) for e in record.contact.emails)
        if record.action is not None:
            actions.append(record.action.action_id)
            ids.add(_lock_id("action", record.action.action_id))
        if record.campaign is not None:
            ids.add(_lock_id("campaign", record.campaign.name))
    cursor.execute(_LOCK_KEYS, {"p": sorted(ids)})
    cursor.fetchall()
    refs = [r for r in dict.fromkeys(refs) if type(r) is str]
    emails = [e for e in dict.fromkeys(emails) if type(e) is str]
    action_ids = [a for a in dict.fromkeys(actions) if _bigint(a)]
    locked: set[int] = set()
    while True:
        found: set[int] = set()
        for query, values in ((_KEYS_BY_REF, refs), (_KEYS_BY_EMAIL, emails)):
            found.update(row[2] for row in _select_all(cursor, sql, query, values))
        found.update(row[1] for row in _select_all(cursor, sql, _ACTIONS_BY_ID, action_ids))
        new = sorted(found - locked)
        if not new:
            return len(locked)
        cursor.execute(_LOCK_CONTACTS, {"p": new})
        cursor.fetchall()
        locked.update(new)


def _select_all(
    cursor: Any, sql: _Statements, query: tuple[str, str], values: Iterable[Any]
) -> Any:
    values = list(values)
    if not values:
        return []
    cursor.execute(sql.select(query, 0), {"p": values})
    return cursor.fetchall()


class _Writer:
    """One batch on one driver cursor, inside one transaction: the loop both writers
    share. Each record is skipped when its key was applied before, else its contact,
    action and campaign are applied through the writer's own methods."""

    def __init__(
        self,
        cursor: Any,
        sql: _Statements,
        campaign_stamps: dict[str, str],
        tombstones: TombstoneCheck | None = None,
    ) -> None:
        self.cursor = cursor
        self.sql = sql
        self.campaign_stamps = campaign_stamps
        self.tombstones = tombstones
        self.now = _now()
        # What the batch changed, for the change log (contacts by handle or id).
        self.touched_contacts: dict[int, None] = {}
        self.touched_actions: dict[int, None] = {}
        self.touched_campaigns: dict[str, None] = {}
        # Contacts merged into another (deleted), by handle or id → the one they joined.
        self.merged: dict[int, int] = {}

    def apply(self, records: Sequence[SyncRecord]) -> list[ApplyResult]:
        keys = list(dict.fromkeys(r.key for r in records))
        seen = {row[0] for row in self._select(_APPLIED_KEYS, keys)}
        erased = self._erased(records, seen)
        self._begin(records)
        results: list[ApplyResult] = []
        applied: list[dict[str, Any]] = []
        for index, record in enumerate(records):
            if record.key in seen:
                results.append("duplicate")
                continue
            seen.add(record.key)
            contact_id = None
            if record.contact is not None and index not in erased:
                contact_id = self._contact(record.contact, record.action)
                self.touched_contacts[contact_id] = None
            if record.action is not None and contact_id is not None:
                self._action(index, record.action, contact_id)
            if record.campaign is not None:
                self._campaign(index, record.campaign)
            applied.append({"key": record.key, "kind": record.kind, "applied_at": self.now})
            results.append("applied")
        self._end(applied)
        self._log_changes()
        return results

    def _erased(self, records: Sequence[SyncRecord], seen: set[str]) -> set[int]:
        """Indexes of the records about an erased person that are not newer than the
        erasure (their contact and action are not written; the message counts as applied)."""
        check = self.tombstones
        if check is None:
            return set()
        hashes: dict[str, list[int]] = {}
        for index, record in enumerate(records):
            facts = record.contact
            if facts is None or record.key in seen:
                continue
            for value in (*facts.refs, *facts.emails):
                hashes.setdefault(check.digest(value), []).append(index)
        if not hashes:
            return set()
        erased: set[int] = set()
        for digest, erased_at in self._select(_TOMBSTONES_BY_HASH, list(hashes)):
            for index in hashes[digest]:
                if _record_time(records[index]) <= erased_at:
                    erased.add(index)
        return erased

    def _changed_contact_ids(self) -> list[int]:
        return list(self.touched_contacts)

    def _merged_ids(self) -> list[tuple[int, int]]:
        return list(self.merged.items())

    def _log_changes(self) -> None:
        """One change row per contact, action and campaign the batch changed, in the
        batch's transaction, as its last statement (on PostgreSQL after taking the change
        log's lock, held until the commit: change numbers are drawn in commit order)."""
        at = time.time()
        rows = [
            {"kind": "contact", "entity": str(cid), "at": at}
            for cid in self._changed_contact_ids()
        ]
        rows += [{"kind": "action", "entity": str(a), "at": at} for a in self.touched_actions]
        rows += [{"kind": "campaign", "entity": c, "at": at} for c in self.touched_campaigns]
        # A merged-away contact: ``other:survivor`` (the destinations retire its address).
        rows += [
            {"kind": "merge", "entity": f"{other}:{survivor}", "at": at}
            for other, survivor in self._merged_ids()
        ]
        if not rows:
            return
        if self.sql.postgres:
            self.cursor.execute(self.sql.lock_changes, {"key": CHANGES_LOCK})
        bulk = self.sql.bulk.get("insert_change")
        if bulk is not None:
            self.cursor.execute(bulk[0], {"rows": orjson.dumps(rows).decode()})
        else:
            self.cursor.executemany(self.sql.insert_change, rows)

    def _select(self, query: tuple[str, str], values: list[Any]) -> list[Any]:
        """The rows of ``query`` for ``values`` (in chunks on SQLite)."""
        if not values:
            return []
        if self.sql.postgres:
            self.cursor.execute(self.sql.select(query, 0), {"p": values})
            return self.cursor.fetchall()  # type: ignore[no-any-return]
        rows: list[Any] = []
        for start in range(0, len(values), _IN_CHUNK):
            chunk = values[start : start + _IN_CHUNK]
            params = {f"p{i}": value for i, value in enumerate(chunk)}
            self.cursor.execute(self.sql.select(query, len(chunk)), params)
            rows.extend(self.cursor.fetchall())
        return rows

    def _begin(self, records: Sequence[SyncRecord]) -> None:
        """Before the loop (the records not yet known to be new)."""

    def _contact(self, facts: ContactFacts, action: ActionRecord | None) -> int:
        raise NotImplementedError

    def _action(self, index: int, record: ActionRecord, contact_id: int) -> None:
        raise NotImplementedError

    def _campaign(self, index: int, fact: CampaignFact) -> None:
        raise NotImplementedError

    def _end(self, applied: list[dict[str, Any]]) -> None:
        """After the loop: the remaining writes and the applied keys."""
        raise NotImplementedError


class _BatchWriter(_Writer):
    """Applies one batch of records on one driver cursor, inside one transaction, with
    a few statements per batch rather than several per record.

    The batch is read up front with set queries (the applied message keys, the contact
    keys and actions the records name, the contacts found and all their keys), applied
    record by record to an in-memory view of those rows, and written with one statement
    (PostgreSQL) or one ``executemany`` (SQLite) per kind of row. Each record sees the
    effects of the earlier ones exactly as if they had been written at once: a record
    reaches contacts only through its keys and its action, all of which the view holds.
    The result is the state :class:`_RecordWriter` reaches, row for row, ids included:

    * Contacts created by the batch are known by a *handle* below zero until inserted.
      They are inserted in creation order, so they get the ids that inserting each at
      once would give (and those ids sort after every stored one, as handles do).
    * Everything pending is written before contacts are merged, so that a merge moves
      complete rows with the same statements as ever.
    * A contact's row is written once, in its final state; an action's once, with the
      outcome of all its records; a campaign's once, with the fact that would be left.

    Skipping the intermediate rows is only sound when none of them could fail to be
    written, and when a contact state read back from the database equals the one kept
    in memory: :meth:`accepts` checks that of every value, and a batch it refuses goes to
    :class:`_RecordWriter`.
    """

    def __init__(
        self,
        cursor: Any,
        sql: _Statements,
        campaign_stamps: dict[str, str],
        tombstones: TombstoneCheck | None = None,
    ) -> None:
        super().__init__(cursor, sql, campaign_stamps, tombstones)
        # The view of the stored rows the batch reaches, as the batch changes them.
        self.states: dict[int, ContactState] = {}
        self.key_owners: dict[tuple[str, str], int] = {}
        self.action_owners: dict[int, list[Any]] = {}  # action id → [handle, version]
        # Writes not yet sent.
        self.last_handle = 0
        self.created: dict[int, None] = {}  # handles to insert, in creation order
        self.ids: dict[int, int] = {}  # handle → id, once inserted
        self.changed: dict[int, None] = {}  # contacts whose row to update at the end
        self.new_keys: list[tuple[str, str, int]] = []
        self.consents: list[dict[str, Any]] = []
        self.statuses: list[dict[str, Any]] = []
        # action id → ("insert" | "update" | "move", record, its data as JSON, handle)
        self.actions: dict[int, tuple[str, ActionRecord, str, int]] = {}
        self.campaigns: dict[str, tuple[CampaignFact, str]] = {}  # name → winning fact
        # The records' action and campaign data as JSON (made by accepts()).
        self.texts: list[tuple[str, str]] = []

    def accepts(self, records: Sequence[SyncRecord]) -> bool:
        """Whether every value of the batch is one each statement takes as it is, and
        that reads back from the JSON columns as it was written (no NUL character or
        lone surrogate in a string, no string over its column's length, no integer
        beyond 64 bits, no object where a column wants text, no float that JSONB gives
        back otherwise, no contact without ref or e-mail). Serialises the actions' and
        campaigns' data on the way."""
        texts = self.texts
        for record in records:
            if not (_text(record.key, 200) and _text(record.kind, 32)):
                return False
            if record.contact is not None and not _plain_contact(record.contact):
                return False
            action_text = campaign_text = ""
            action = record.action
            if action is not None:
                text = _json_text(action.data)
                if text is None or not (
                    _bigint(action.action_id)
                    and type(action.testing) is bool
                    and _text(action.action_type)
                    and _text(action.campaign)
                    and _text(action.created_at)
                    and _text(action.version)
                ):
                    return False
                action_text = text
            fact = record.campaign
            if fact is not None:
                text = _json_text(fact.data)
                title = fact.data.get("title")
                external_id = fact.data.get("externalId")
                if text is None or not (
                    _text(fact.name, 255)
                    and _text(fact.stamp)
                    and (title is None or _text(title))
                    and (external_id is None or _bigint(external_id))
                ):
                    return False
                campaign_text = text
            texts.append((action_text, campaign_text))
        return True

    # apply() is _Writer's, for records that :meth:`accepts` accepted.

    def _changed_contact_ids(self) -> list[int]:
        return list(dict.fromkeys(self._id(h) for h in self.touched_contacts))

    def _merged_ids(self) -> list[tuple[int, int]]:
        return [(self._id(o), self._id(s)) for o, s in self.merged.items()]

    def _begin(self, records: Sequence[SyncRecord]) -> None:
        self._read(records)

    def _end(self, applied: list[dict[str, Any]]) -> None:
        self._flush()
        self._many(
            "update_contact",
            [{**self._row(self.states[h]), "id": self._id(h)} for h in self.changed],
        )
        self._write_campaigns()
        self._many("insert_applied", applied)

    # ---- reading ------------------------------------------------------------------------

    def _many(self, name: str, rows: list[dict[str, Any]]) -> None:
        """Run statement ``name`` for each row: a single statement where possible."""
        if not rows:
            return
        bulk = self.sql.bulk.get(name)
        if bulk is not None:
            sql, columns = bulk
            for column, kind in columns:
                if not {type(row[column]) for row in rows} <= {kind, type(None)}:
                    break
            else:
                self.cursor.execute(sql, {"rows": orjson.dumps(rows).decode()})
                return
        self.cursor.executemany(getattr(self.sql, name), rows)

    def _read(self, records: Sequence[SyncRecord]) -> None:
        """Load the stored keys and actions the batch names, and their contacts."""
        refs: dict[str, None] = {}
        emails: dict[str, None] = {}
        action_ids: dict[int, None] = {}
        for record in records:
            if record.contact is not None:
                refs.update(dict.fromkeys(sorted(record.contact.refs)))
                emails.update(dict.fromkeys(sorted(record.contact.emails)))
            if record.action is not None:
                action_ids[record.action.action_id] = None
        found: set[int] = set()
        for query, values in ((_KEYS_BY_REF, refs), (_KEYS_BY_EMAIL, emails)):
            for _kind, _value, contact_id in self._select(query, list(values)):
                found.add(contact_id)
        for action_id, contact_id, version in self._select(_ACTIONS_BY_ID, list(action_ids)):
            self.action_owners[action_id] = [contact_id, version]
            found.add(contact_id)
        ids = sorted(found)
        for row in self._select(_CONTACTS_BY_ID, ids):
            self.states[row[0]] = _stored_state(row[1:])
        for kind, value, contact_id in self._select(_KEYS_BY_CONTACT, ids):
            self._own(kind, value, contact_id)

    def _own(self, kind: str, value: str, contact_id: int) -> None:
        """A stored key of a loaded contact: into the contact's state and the key map."""
        self.key_owners[kind, value] = contact_id
        state = self.states[contact_id]
        (state.refs if kind == "ref" else state.emails).add(value)

    def _state(self, handle: int) -> ContactState:
        state = self.states.get(handle)
        if state is None:
            # Not reached: every contact a record can reach was loaded by _read. Should
            # that ever change, reading the stored row here keeps the result right.
            self.cursor.execute(self.sql.load_contact, {"id": handle})
            state = self.states[handle] = _stored_state(self.cursor.fetchone())
            self.cursor.execute(self.sql.load_keys, {"id": handle})
            for kind, value in self.cursor.fetchall():
                self._own(kind, value, handle)
        return state

    # ---- applying, in memory ------------------------------------------------------------

    def _contact(self, facts: ContactFacts, action: ActionRecord | None) -> int:
        owners = self.key_owners
        keys = [("ref", ref) for ref in sorted(facts.refs)]
        keys += [("email", email) for email in sorted(facts.emails)]
        handles = {owners[key] for key in keys if key in owners}
        if action is not None:
            owner = self.action_owners.get(action.action_id)
            if owner is not None:
                handles.add(owner[0])
        ordered = sorted(handles, key=_handle_order)
        state = ContactState()
        for handle in ordered:
            state.join(self._state(handle))
        state.absorb(facts)
        if not ordered:
            self.last_handle -= 1
            survivor = self.last_handle
            self.created[survivor] = None
        else:
            survivor = ordered[0]
            if len(ordered) > 1:
                self._flush()
                for other in ordered[1:]:
                    self._merge(other, survivor)
            if survivor not in self.created:
                self.changed[survivor] = None
        self.states[survivor] = state
        for key in keys:
            if key not in owners:
                owners[key] = survivor
                self.new_keys.append((*key, survivor))
        if facts.consent is not None:
            self.consents.append(_consent_row(facts.consent, survivor))
        if facts.status is not None:
            self.statuses.append(_status_row(facts.status, survivor))
        return survivor

    def _merge(self, other: int, survivor: int) -> None:
        """Move everything of contact ``other`` to ``survivor`` and delete ``other``."""
        params = {"other": self._id(other), "survivor": self._id(survivor)}
        for sql in self.sql.move.values():
            self.cursor.execute(sql, params)
        self.cursor.execute(self.sql.copy_statuses, params)
        self.cursor.execute(self.sql.delete_statuses, {"other": params["other"]})
        self.cursor.execute(self.sql.delete_contact, {"other": params["other"]})
        self.merged[other] = survivor
        for key, owner in self.key_owners.items():
            if owner == other:
                self.key_owners[key] = survivor
        for entry in self.action_owners.values():
            if entry[0] == other:
                entry[0] = survivor
        del self.states[other]
        self.changed.pop(other, None)

    def _action(self, index: int, record: ActionRecord, contact: int) -> None:
        """Insert, update (a newer version) or move (to this record's contact)."""
        data = self.texts[index][0]
        action_id = record.action_id
        current = self.action_owners.get(action_id)
        pending = self.actions.get(action_id)
        if current is None:
            self.action_owners[action_id] = [contact, record.version]
            self.actions[action_id] = ("insert", record, data, contact)
            self.touched_actions[action_id] = None
        elif record.version > current[1]:
            current[:] = [contact, record.version]
            kind = "insert" if pending is not None and pending[0] == "insert" else "update"
            self.actions[action_id] = (kind, record, data, contact)
            self.touched_actions[action_id] = None
        elif current[0] != contact:
            current[0] = contact
            self.touched_actions[action_id] = None
            if pending is None:
                self.actions[action_id] = ("move", record, data, contact)
            else:
                self.actions[action_id] = (*pending[:3], contact)

    def _campaign(self, index: int, fact: CampaignFact) -> None:
        data = self.texts[index][1]
        known = self.campaign_stamps.get(fact.name)
        if known is not None and known >= fact.stamp:
            return
        # Applied one by one, the first of the facts with the greatest stamp stays.
        best = self.campaigns.get(fact.name)
        if best is None or fact.stamp > best[0].stamp:
            self.campaigns[fact.name] = (fact, data)

    # ---- writing ------------------------------------------------------------------------

    def _id(self, handle: int) -> int:
        return handle if handle > 0 else self.ids[handle]

    def _row(self, state: ContactState) -> dict[str, Any]:
        row = _state_row(state, self.now)
        row["fields"] = orjson.dumps(row["fields"]).decode()
        return row

    def _flush(self) -> None:
        """Send every pending insert, and the actions' updates."""
        if self.created:
            handles = list(self.created)
            rows = [self._row(self.states[h]) for h in handles]
            if self.sql.postgres:
                # The ids inserting row by row would draw from the sequence, in order.
                self.cursor.execute(self.sql.next_contact_ids, {"count": len(handles)})
                ids = sorted(int(row[0]) for row in self.cursor.fetchall())
                for handle, row, contact_id in zip(handles, rows, ids, strict=True):
                    row["id"] = self.ids[handle] = contact_id
                self._many("insert_contact_id", rows)
            else:
                for handle, row in zip(handles, rows, strict=True):
                    self.cursor.execute(self.sql.insert_contact, row)
                    self.ids[handle] = int(self.cursor.lastrowid)
            self.created.clear()
        self._many(
            "insert_key",
            [
                {"kind": kind, "value": value, "contact_id": self._id(handle)}
                for kind, value, handle in self.new_keys
            ],
        )
        self.new_keys.clear()
        for name, rows in (("insert_consent", self.consents), ("insert_status", self.statuses)):
            for row in rows:
                row["contact_id"] = self._id(row["contact_id"])
            self._many(name, rows)
            rows.clear()
        if self.actions:
            by_kind: dict[str, list[dict[str, Any]]] = {"insert": [], "update": [], "move": []}
            for action_id, (kind, record, data, handle) in self.actions.items():
                values: dict[str, Any] = {"action_id": action_id, "contact_id": self._id(handle)}
                if kind != "move":
                    values.update(
                        action_type=record.action_type,
                        campaign=record.campaign,
                        created_at=record.created_at,
                        testing=record.testing,
                        version=record.version,
                        data=data,
                    )
                by_kind[kind].append(values)
            for kind, rows in by_kind.items():
                self._many(f"{kind}_action", rows)
            self.actions.clear()

    def _write_campaigns(self) -> None:
        if not self.campaigns:
            return
        stored = dict(self._select(_CAMPAIGNS_BY_NAME, list(self.campaigns)))
        inserts: list[dict[str, Any]] = []
        updates: list[dict[str, Any]] = []
        for name, (fact, data) in self.campaigns.items():
            values = {
                "name": name,
                "title": fact.data.get("title"),
                "external_id": fact.data.get("externalId"),
                "stamp": fact.stamp,
                "data": data,
            }
            stamp = stored.get(name)
            if stamp is None:
                inserts.append(values)
                self.touched_campaigns[name] = None
            elif stamp < fact.stamp:
                updates.append(values)
                self.touched_campaigns[name] = None
            # What the database now holds. Cleared by the backend when the transaction
            # fails, so it never runs ahead of what is committed.
            self.campaign_stamps[name] = (
                fact.stamp if stamp is None or stamp < fact.stamp else stamp
            )
        if updates:
            self.cursor.executemany(self.sql.update_campaign, updates)
        if inserts:
            self.cursor.executemany(self.sql.insert_campaign, inserts)


class _RecordWriter(_Writer):
    """Applies one batch record by record, each with its own statements (the writer
    before _BatchWriter, unchanged): for a batch :meth:`_BatchWriter.accepts` refuses,
    so that it fails, or not, at the same record and in the same way as ever."""

    def _one(self, sql: str, params: dict[str, Any]) -> Any:
        self.cursor.execute(sql, params)
        return self.cursor.fetchone()

    def _end(self, applied: list[dict[str, Any]]) -> None:
        if applied:
            self.cursor.executemany(self.sql.insert_applied, applied)

    def _contact(self, facts: ContactFacts, action: ActionRecord | None) -> int:
        refs, emails = sorted(facts.refs), sorted(facts.emails)
        params = {f"r{i}": ref for i, ref in enumerate(refs)}
        params.update({f"e{i}": email for i, email in enumerate(emails)})
        self.cursor.execute(self.sql.find_contacts(len(refs), len(emails)), params)
        ids = {row[0] for row in self.cursor.fetchall()}
        if action is not None:
            owner = self._one(self.sql.action_owner, {"action_id": action.action_id})
            if owner is not None:
                ids.add(owner[0])
        state = ContactState()
        for contact_id in sorted(ids):
            state.join(self._load(contact_id))
        known = {("ref", ref) for ref in state.refs} | {("email", e) for e in state.emails}
        state.absorb(facts)
        row = _state_row(state, self.now)
        row["fields"] = orjson.dumps(row["fields"]).decode()
        if not ids:
            self.cursor.execute(self.sql.insert_contact, row)
            survivor = int(
                self.cursor.fetchone()[0] if self.sql.postgres else self.cursor.lastrowid
            )
        else:
            survivor = min(ids)
            for other in sorted(ids - {survivor}):
                self._merge(other, survivor)
            self.cursor.execute(self.sql.update_contact, {**row, "id": survivor})
        new_keys = [
            {"kind": kind, "value": value, "contact_id": survivor}
            for kind, value in [("ref", r) for r in refs] + [("email", e) for e in emails]
            if (kind, value) not in known
        ]
        if new_keys:
            self.cursor.executemany(self.sql.insert_key, new_keys)
        if facts.consent is not None:
            self.cursor.execute(self.sql.insert_consent, _consent_row(facts.consent, survivor))
        if facts.status is not None:
            self.cursor.execute(self.sql.insert_status, _status_row(facts.status, survivor))
        return survivor

    def _load(self, contact_id: int) -> ContactState:
        state = _stored_state(self._one(self.sql.load_contact, {"id": contact_id}))
        self.cursor.execute(self.sql.load_keys, {"id": contact_id})
        for kind, value in self.cursor.fetchall():
            (state.refs if kind == "ref" else state.emails).add(value)
        return state

    def _merge(self, other: int, survivor: int) -> None:
        """Move everything of contact ``other`` to ``survivor`` and delete ``other``."""
        params = {"other": other, "survivor": survivor}
        for sql in self.sql.move.values():
            self.cursor.execute(sql, params)
        self.cursor.execute(self.sql.copy_statuses, params)
        self.cursor.execute(self.sql.delete_statuses, {"other": other})
        self.cursor.execute(self.sql.delete_contact, {"other": other})
        self.merged[other] = survivor

    def _action(self, index: int, record: ActionRecord, contact_id: int) -> None:
        current = self._one(self.sql.action_owner, {"action_id": record.action_id})
        values = {
            "action_id": record.action_id,
            "contact_id": contact_id,
            "action_type": record.action_type,
            "campaign": record.campaign,
            "created_at": record.created_at,
            "testing": record.testing,
            "version": record.version,
            "data": orjson.dumps(record.data).decode(),
        }
        if current is None:
            self.cursor.execute(self.sql.insert_action, values)
        elif record.version > current[1]:
            self.cursor.execute(self.sql.update_action, values)
        elif current[0] != contact_id:
            self.cursor.execute(
                self.sql.move_action, {"action_id": record.action_id, "contact_id": contact_id}
            )
        else:
            return
        self.touched_actions[record.action_id] = None

    def _campaign(self, index: int, fact: CampaignFact) -> None:
        known = self.campaign_stamps.get(fact.name)
        if known is not None and known >= fact.stamp:
            return
        values = {
            "name": fact.name,
            "title": fact.data.get("title"),
            "external_id": fact.data.get("externalId"),
            "stamp": fact.stamp,
            "data": orjson.dumps(fact.data).decode(),
        }
        self.cursor.execute(self.sql.update_campaign, values)
        written = self.cursor.rowcount > 0
        if not written:
            self.cursor.execute(self.sql.insert_campaign, values)
            written = self.cursor.rowcount > 0
        if written:
            self.touched_campaigns[fact.name] = None
        stored = self._one(self.sql.campaign_stamp, {"name": fact.name})
        # Cleared by the backend when the transaction fails, so it never runs ahead of
        # what is committed.
        self.campaign_stamps[fact.name] = stored[0] if stored else fact.stamp


_I64 = 1 << 63


def _plain_contact(facts: ContactFacts) -> bool:
    """The contact part of :meth:`_BatchWriter.accepts`."""
    if not (facts.refs or facts.emails) or not _text(facts.stamp):
        return False  # without ref or e-mail, _RecordWriter's lookup is malformed SQL
    if type(facts.admit) is not bool or type(facts.real) is not bool:
        return False
    for key in (*facts.refs, *facts.emails):
        if not _text(key, 512):
            return False
    # Serialises (so not nested beyond orjson's 254 levels), without NUL or surrogates.
    if _json_text(facts.fields) is None:
        return False
    for name, value in facts.fields.items():
        if type(value) is not str and not (
            _json(value) and (name not in COLUMN_FIELDS or type(value) not in (list, dict))
        ):
            return False
    consent = facts.consent
    if consent is not None and not (
        _bigint(consent.action_id)
        and (consent.given_at is None or _text(consent.given_at, 40))
        and (consent.opt_in is None or type(consent.opt_in) is bool)
    ):
        return False
    status = facts.status
    return status is None or (
        (status.status is None or _text(status.status))
        and (status.changed_at is None or _text(status.changed_at))
        and _text(status.stamp, 200)
        and _text(status.source)
    )


def _text(value: object, limit: int | None = None) -> bool:
    """A string any text column takes: no NUL, encodable, within ``limit`` characters."""
    if type(value) is not str or "\x00" in value:
        return False
    if limit is not None and len(value) > limit:
        return False
    if value.isascii():
        return True
    try:
        value.encode()
    except UnicodeEncodeError:
        return False
    return True


def _bigint(value: object) -> bool:
    return type(value) is int and -_I64 <= value < _I64


def _json(value: Any) -> bool:
    """A JSON value that both databases store and give back unchanged (PostgreSQL's
    JSONB reads ``1e+16`` back as an integer and ``-0.0`` as ``0.0``)."""
    kind = type(value)
    if kind is str:
        return _text(value)
    if value is None or kind is bool:
        return True
    if kind is int:
        return _bigint(value)
    if kind is float:
        return bool(abs(value) < 1e16 and (value != 0.0 or math.copysign(1.0, value) > 0))
    if kind is list:
        return all(_json(item) for item in value)
    if kind is dict:
        return all(_text(key) and _json(item) for key, item in value.items())
    return False


def _json_text(value: Any) -> str | None:
    """``value`` as JSON; ``None`` if it does not serialise or holds a NUL character
    (which JSONB refuses)."""
    try:
        text = orjson.dumps(value)
    except orjson.JSONEncodeError:
        return None
    return None if b"\\u0000" in text else text.decode()


def _record_time(record: SyncRecord) -> str:
    """When the record's data was true (``timestamp_key`` form), to compare with an
    erasure: the action's creation, else the time part of the contact's stamp."""
    if record.action is not None:
        return timestamp_key(record.action.created_at)
    facts = record.contact
    return facts.stamp.split("|", 1)[0] if facts is not None else ""


def _handle_order(handle: int) -> tuple[bool, int]:
    """Stored ids in order, then the batch's new contacts in creation order."""
    return (handle < 0, abs(handle))


def _stored_state(row: Sequence[Any]) -> ContactState:
    """A contact's state from its row (``_STATE_COLUMNS``); keys are added by the caller."""
    fields = _json_value(row[1])
    return ContactState(
        fields={name: (pair[0], pair[1]) for name, pair in fields.items()},
        admitted=bool(row[0]),
        real=bool(row[2]),
        opted_in=bool(row[3]),
        opt_in_at=row[4],
        status=row[5],
        status_changed=row[6],
        status_stamp=row[7],
    )


def _consent_row(consent: ConsentFact, contact_id: int) -> dict[str, Any]:
    return {
        "contact_id": contact_id,
        "action_id": consent.action_id,
        "opt_in": _OPT_IN_TEXT[consent.opt_in],
        "given_at": consent.given_at or "",
    }


def _status_row(status: StatusFact, contact_id: int) -> dict[str, Any]:
    return {
        "contact_id": contact_id,
        "status": status.status,
        "changed_at": status.changed_at,
        "stamp": status.stamp,
        "source": status.source,
    }


def _state_row(state: ContactState, now: str) -> dict[str, Any]:
    return {
        "admitted": state.admitted,
        "email": state.value("email"),
        "first_name": state.value("firstName"),
        "last_name": state.value("lastName"),
        "postcode": state.value("postcode"),
        "country": state.value("country"),
        "fields": {name: [value, st] for name, (value, st) in state.fields.items()},
        "real": state.real,
        "opted_in": state.opted_in,
        "opt_in_at": state.opt_in_at,
        "email_status": state.status,
        "email_status_changed": state.status_changed,
        "email_status_stamp": state.status_stamp,
        "subscribed": state.subscribed,
        "updated_at": now,
    }


def _export_action(row: Any) -> dict[str, Any]:
    data = dict(row.data)
    return {
        "actionId": row.action_id,
        "actionType": row.action_type,
        "campaign": row.campaign,
        "createdAt": row.created_at,
        "customFields": data.get("customFields", {}),
        "testing": row.testing,
        "withConsent": data.get("withConsent"),
        "optIn": data.get("optIn"),
        "dupeRank": data.get("dupeRank"),
        "donation": data.get("donation"),
        "actionPage": (data.get("actionPage") or {}).get("name"),
        "orgId": data.get("orgId"),
        "tracking": data.get("tracking"),
    }
