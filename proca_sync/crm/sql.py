"""The embedded CRM: contacts, refs, actions, campaigns, consent and e-mail-status history
in SQL through SQLAlchemy Core — SQLite by default, PostgreSQL with a ``postgresql://`` URL.

Each batch of records is applied in one transaction together with the keys of the
messages it came from (``applied_messages``), so a redelivered message whose ack was lost
is recognised and changes nothing. Contacts are merged with the joins of
:mod:`proca_sync.sync.contacts`; the stored state is therefore the same whatever the order
in which records arrive.

Database errors are translated at this boundary: an unreachable, locked or restarting
database is a :class:`~proca_sync.errors.BackendUnavailableError`; a value the database
refuses is a :class:`~proca_sync.errors.BackendRejectedError`. Statement parameters (which
hold personal data) are never part of an error message.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from typing import Any

import orjson
from sqlalchemy import (
    BigInteger,
    Boolean,
    Column,
    Connection,
    Engine,
    ForeignKey,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    UniqueConstraint,
    create_engine,
    event,
    func,
    insert,
    select,
)
from sqlalchemy import exc as sa_exc
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.engine import make_url
from sqlalchemy.types import JSON

from proca_sync.crm.base import ApplyResult
from proca_sync.errors import (
    BackendRejectedError,
    BackendUnavailableError,
    ConfigError,
    PermanentError,
)
from proca_sync.sync.contacts import ContactState, normalise_email
from proca_sync.sync.records import ActionRecord, CampaignFact, ContactFacts, SyncRecord

__all__ = ["SCHEMA_VERSION", "SqlBackend", "create_store_engine", "normalise_url"]

SCHEMA_VERSION = 1
DEFAULT_URL = "sqlite:///proca-crm.db"

_JSON = JSON().with_variant(JSONB(), "postgresql")

metadata = MetaData()

meta_table = Table(
    "proca_meta",
    metadata,
    Column("key", String(64), primary_key=True),
    Column("value", Text, nullable=False),
)

contacts = Table(
    "contacts",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("admitted", Boolean, nullable=False, default=False),
    Column("email", Text),
    Column("first_name", Text),
    Column("last_name", Text),
    Column("postcode", Text),
    Column("country", Text),
    Column("fields", _JSON, nullable=False),
    Column("real", Boolean, nullable=False, default=False),
    Column("opted_in", Boolean, nullable=False, default=False),
    Column("opt_in_at", Text),
    Column("email_status", Text),
    Column("email_status_changed", Text),
    Column("email_status_stamp", Text, nullable=False, default=""),
    Column("subscribed", Boolean, nullable=False, default=False),
    Column("updated_at", Text, nullable=False),
)

contact_keys = Table(
    "contact_keys",
    metadata,
    Column("kind", String(8), primary_key=True),
    Column("value", String(512), primary_key=True),
    Column("contact_id", Integer, ForeignKey("contacts.id"), nullable=False, index=True),
)

actions = Table(
    "actions",
    metadata,
    Column("action_id", BigInteger, primary_key=True, autoincrement=False),
    Column("contact_id", Integer, ForeignKey("contacts.id"), nullable=False, index=True),
    Column("action_type", Text, nullable=False),
    Column("campaign", Text, nullable=False),
    Column("created_at", Text, nullable=False),
    Column("testing", Boolean, nullable=False),
    Column("version", Text, nullable=False),
    Column("data", _JSON, nullable=False),
)

campaigns = Table(
    "campaigns",
    metadata,
    Column("name", String(255), primary_key=True),
    Column("title", Text),
    Column("external_id", BigInteger),
    Column("stamp", Text, nullable=False),
    Column("data", _JSON, nullable=False),
)

consents = Table(
    "consents",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("contact_id", Integer, ForeignKey("contacts.id"), nullable=False, index=True),
    Column("action_id", BigInteger, nullable=False),
    # Not null, so the unique constraint also collapses repeats of "not asked" consents.
    Column("opt_in", String(5), nullable=False),
    Column("given_at", String(40), nullable=False),
    UniqueConstraint("action_id", "opt_in", "given_at", name="uq_consent_fact"),
)

email_status_history = Table(
    "email_status_history",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("contact_id", Integer, ForeignKey("contacts.id"), nullable=False, index=True),
    Column("status", Text),
    Column("changed_at", Text),
    Column("stamp", String(200), nullable=False),
    Column("source", Text, nullable=False),
    UniqueConstraint("contact_id", "stamp", name="uq_status_fact"),
)

applied_messages = Table(
    "applied_messages",
    metadata,
    Column("key", String(200), primary_key=True),
    Column("kind", String(32), nullable=False),
    Column("applied_at", Text, nullable=False),
)


def normalise_url(url: str) -> str:
    """Accept the URLs users write: ``postgresql://`` means psycopg 3."""
    if url.startswith(("postgresql://", "postgres://")):
        return "postgresql+psycopg://" + url.split("://", 1)[1]
    return url


def create_store_engine(
    url: str, *, what: str, echo: bool = False, synchronous: str = "NORMAL"
) -> tuple[Engine, str]:
    """An engine for one of our SQL stores (CRM, parked messages) and its dialect name.

    SQLite runs in WAL mode with the given ``synchronous`` level and waits up to 15 s on
    a lock (``?timeout=S`` in the URL overrides it); PostgreSQL connections are checked
    before use. Statement parameters never appear in errors or logs. Raises
    :class:`ConfigError` for an unusable URL or a missing driver.
    """
    url = normalise_url(url)
    try:
        parsed = make_url(url)
    except sa_exc.ArgumentError:
        raise ConfigError(f"{what} URL is not a database URL") from None
    dialect = parsed.get_backend_name()
    if dialect not in {"sqlite", "postgresql"}:
        raise ConfigError(f"unsupported {what} database {dialect!r} (sqlite or postgresql)")
    kwargs: dict[str, Any] = {"echo": echo, "hide_parameters": True}
    if dialect == "sqlite":
        # A locked database waits this long before failing (a transient error).
        if "timeout" not in parsed.query:
            kwargs["connect_args"] = {"timeout": 15}
    else:
        kwargs["pool_pre_ping"] = True
        kwargs["connect_args"] = {"connect_timeout": 5}
    try:
        engine = create_engine(url, **kwargs)
    except ModuleNotFoundError:
        raise ConfigError(
            "PostgreSQL needs the 'postgres' extra: pip install 'proca-sync[postgres]'"
        ) from None
    if dialect == "sqlite":

        def pragmas(dbapi_connection: Any, _record: Any) -> None:
            cursor = dbapi_connection.cursor()
            cursor.execute("PRAGMA journal_mode=WAL")
            cursor.execute(f"PRAGMA synchronous={synchronous}")
            cursor.execute("PRAGMA foreign_keys=ON")
            cursor.close()

        event.listen(engine, "connect", pragmas)
    return engine, dialect


def _now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _translate(exc: sa_exc.SQLAlchemyError) -> Exception:
    """Map a database error to our tree, naming its class only (no parameters)."""
    name = type(getattr(exc, "orig", None) or exc).__name__
    if isinstance(exc, sa_exc.DataError):
        return BackendRejectedError(f"database refused a value ({name})")
    if isinstance(exc, sa_exc.IntegrityError):
        # Another writer raced us on the same key: trying again sees its row.
        return BackendUnavailableError(f"concurrent write conflict ({name})")
    return BackendUnavailableError(f"database unavailable ({name})")


class SqlBackend:
    """The embedded CRM. One writer thread; SQLite in WAL mode or PostgreSQL."""

    name = "sql"

    def __init__(self, url: str = DEFAULT_URL, *, echo: bool = False) -> None:
        self.engine, self.dialect = create_store_engine(url, what="CRM", echo=echo)
        self.url = str(self.engine.url)
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="crm-sql")
        self._campaign_stamps: dict[str, str] = {}
        self._statements = _Statements(self.dialect)
        self._ready = False

    # ---- lifecycle --------------------------------------------------------------------

    async def open(self) -> None:
        await self._run(self.open_sync)

    def open_sync(self) -> None:
        """Create the schema on first use and check its version."""
        if self._ready:
            return
        try:
            with self.engine.begin() as conn:
                metadata.create_all(conn, checkfirst=True)
                version = conn.execute(
                    select(meta_table.c.value).where(meta_table.c.key == "schema_version")
                ).scalar()
                if version is None:
                    conn.execute(
                        insert(meta_table).values(key="schema_version", value=str(SCHEMA_VERSION))
                    )
                elif int(version) > SCHEMA_VERSION:
                    raise ConfigError(
                        f"CRM schema version {version} is newer than this proca-sync "
                        f"({SCHEMA_VERSION}); upgrade proca-sync"
                    )
        except sa_exc.SQLAlchemyError as exc:
            raise _translate(exc) from None
        self._ready = True

    async def close(self) -> None:
        await self._run(self.engine.dispose)
        self._executor.shutdown(wait=True)

    def close_sync(self) -> None:
        """Release connections when used without an event loop (CLI reads, tests)."""
        self.engine.dispose()
        self._executor.shutdown(wait=True)

    def __enter__(self) -> SqlBackend:
        self.open_sync()
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close_sync()

    async def ping(self) -> None:
        await self._run(self._ping_sync)

    def _ping_sync(self) -> None:
        """Succeed only if a write could start now: a locked SQLite file is not "up"."""
        try:
            with self.engine.connect() as conn:
                if self.dialect == "sqlite":
                    raw = conn.connection.dbapi_connection
                    assert raw is not None
                    raw.execute("BEGIN IMMEDIATE")
                    raw.execute("ROLLBACK")
                else:
                    conn.execute(select(1))
        except sa_exc.SQLAlchemyError as exc:
            raise _translate(exc) from None
        except Exception as exc:
            raise self._translate_any(exc) from None

    async def _run(self, fn: Any, *args: Any) -> Any:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, fn, *args)

    # ---- writing ----------------------------------------------------------------------

    async def apply(self, records: Sequence[SyncRecord]) -> Sequence[ApplyResult]:
        return await self._run(self.apply_sync, records)  # type: ignore[no-any-return]

    def apply_sync(self, records: Sequence[SyncRecord]) -> list[ApplyResult]:
        """Apply a batch in one transaction; isolate a refused record by retrying singly."""
        self.open_sync()
        if not records:
            return []
        try:
            return self._transaction(records)
        except Exception as exc:
            error = self._translate_any(exc)
            if not isinstance(error, PermanentError):
                raise error from None
            if len(records) == 1:
                return [error]
        results: list[ApplyResult] = []
        for record in records:
            try:
                results.extend(self._transaction([record]))
            except Exception as exc:
                error = self._translate_any(exc)
                if not isinstance(error, PermanentError):
                    raise error from None
                results.append(error)
        return results

    def _translate_any(self, exc: Exception) -> Exception:
        """Database errors of SQLAlchemy or of the driver (PEP 249) → our error tree."""
        self._campaign_stamps.clear()
        if isinstance(exc, sa_exc.SQLAlchemyError):
            return _translate(exc)
        dbapi = self.engine.dialect.loaded_dbapi
        name = type(exc).__name__
        if isinstance(exc, dbapi.DataError):
            return BackendRejectedError(f"database refused a value ({name})")
        if isinstance(exc, dbapi.IntegrityError):
            return BackendUnavailableError(f"concurrent write conflict ({name})")
        if isinstance(exc, dbapi.Error):
            return BackendUnavailableError(f"database unavailable ({name})")
        raise exc

    def _transaction(self, records: Sequence[SyncRecord]) -> list[ApplyResult]:
        with self.engine.begin() as conn:
            cursor = conn.connection.dbapi_connection.cursor()  # type: ignore[union-attr]
            try:
                writer = _BatchWriter(cursor, self._statements, self._campaign_stamps)
                return writer.apply(records)
            finally:
                cursor.close()

    # ---- reading ----------------------------------------------------------------------

    @contextlib.contextmanager
    def _reading(self) -> Iterator[Connection]:
        self.open_sync()
        try:
            with self.engine.connect() as conn:
                yield conn
        except sa_exc.SQLAlchemyError as exc:
            raise _translate(exc) from None

    def export(self) -> dict[str, Any]:
        """The whole CRM as JSON-ready data, in a stable order (see ``crm export``)."""
        with self._reading() as conn:
            keys: dict[int, dict[str, list[str]]] = {}
            for kind, value, cid in conn.execute(
                select(contact_keys.c.kind, contact_keys.c.value, contact_keys.c.contact_id)
            ):
                keys.setdefault(cid, {"ref": [], "email": []})[kind].append(value)
            by_contact: dict[int, list[dict[str, Any]]] = {}
            for row in conn.execute(select(actions)):
                by_contact.setdefault(row.contact_id, []).append(_export_action(row))
            consent_rows: dict[int, list[dict[str, Any]]] = {}
            for row in conn.execute(select(consents)):
                consent_rows.setdefault(row.contact_id, []).append(
                    {
                        "actionId": row.action_id,
                        "optIn": _OPT_IN_VALUES[row.opt_in],
                        "givenAt": row.given_at or None,
                    }
                )
            status_rows: dict[int, list[dict[str, Any]]] = {}
            for row in conn.execute(select(email_status_history)):
                status_rows.setdefault(row.contact_id, []).append(
                    {"status": row.status, "changedAt": row.changed_at, "stamp": row.stamp}
                )
            out_contacts = []
            for row in conn.execute(select(contacts).where(contacts.c.admitted.is_(True))):
                contact_keys_of = keys.get(row.id, {"ref": [], "email": []})
                statuses = sorted(status_rows.get(row.id, []), key=lambda s: s["stamp"])
                out_contacts.append(
                    {
                        "email": row.email,
                        "firstName": row.first_name,
                        "lastName": row.last_name,
                        "postcode": row.postcode,
                        "country": row.country,
                        "contactRefs": sorted(contact_keys_of["ref"]),
                        "emails": sorted(contact_keys_of["email"]),
                        "subscribed": row.subscribed,
                        "optIn": row.opted_in,
                        "optInAt": row.opt_in_at,
                        "emailStatus": row.email_status,
                        "emailStatusChanged": row.email_status_changed,
                        "testing": not row.real,
                        "fields": {name: pair[0] for name, pair in sorted(row.fields.items())},
                        "consents": sorted(
                            consent_rows.get(row.id, []),
                            key=lambda c: (c["actionId"], str(c["givenAt"]), str(c["optIn"])),
                        ),
                        "emailStatusHistory": [
                            {"status": s["status"], "changedAt": s["changedAt"]} for s in statuses
                        ],
                        "actions": sorted(
                            by_contact.get(row.id, []),
                            key=lambda a: (a["createdAt"], a["actionId"]),
                        ),
                    }
                )
            out_contacts.sort(
                key=lambda c: (c["email"] or "", c["contactRefs"][0] if c["contactRefs"] else "")
            )
            out_campaigns = [
                {
                    "name": row.name,
                    "title": row.title,
                    "externalId": row.external_id,
                    "contactSchema": row.data.get("contactSchema"),
                    "campaignId": row.data.get("campaignId", row.data.get("id")),
                    "config": row.data.get("config"),
                }
                for row in conn.execute(select(campaigns).order_by(campaigns.c.name))
            ]
            pending = conn.execute(
                select(func.count()).select_from(contacts).where(contacts.c.admitted.is_(False))
            ).scalar()
        return {"contacts": out_contacts, "campaigns": out_campaigns, "pendingContacts": pending}

    def find_contact(self, email: str) -> dict[str, Any] | None:
        """The exported form of the contact holding this e-mail, or ``None``."""
        key = normalise_email(email)
        with self._reading() as conn:
            cid = conn.execute(
                select(contact_keys.c.contact_id).where(
                    contact_keys.c.kind == "email", contact_keys.c.value == key
                )
            ).scalar()
        if cid is None:
            return None
        contacts_out: list[dict[str, Any]] = self.export()["contacts"]
        return next((c for c in contacts_out if key in c["emails"]), None)

    def stats(self) -> dict[str, Any]:
        """Counts for summaries (no personal data): contacts, consent, statuses, actions."""
        admitted = contacts.c.admitted.is_(True)
        with self._reading() as conn:

            def count(table: Table, *where: Any) -> int:
                query = select(func.count()).select_from(table).where(*where)
                return int(conn.execute(query).scalar() or 0)

            statuses = {
                str(status): int(n)
                for status, n in conn.execute(
                    select(contacts.c.email_status, func.count())
                    .where(admitted, contacts.c.email_status.is_not(None))
                    .group_by(contacts.c.email_status)
                )
            }
            per_campaign = [
                {"campaign": campaign, "actionType": kind, "actions": int(n)}
                for campaign, kind, n in conn.execute(
                    select(actions.c.campaign, actions.c.action_type, func.count())
                    .group_by(actions.c.campaign, actions.c.action_type)
                    .order_by(actions.c.campaign, actions.c.action_type)
                )
            ]
            return {
                "contacts": count(contacts, admitted),
                "subscribed": count(contacts, admitted, contacts.c.subscribed.is_(True)),
                "testing_contacts": count(contacts, admitted, contacts.c.real.is_(False)),
                "pending_contacts": count(contacts, contacts.c.admitted.is_(False)),
                "email_statuses": statuses,
                "actions": count(actions),
                "testing_actions": count(actions, actions.c.testing.is_(True)),
                "actions_per_campaign": per_campaign,
                "campaigns": count(campaigns),
                "applied_messages": count(applied_messages),
            }


_OPT_IN_TEXT = {True: "true", False: "false", None: "null"}
_OPT_IN_VALUES = {text: value for value, text in _OPT_IN_TEXT.items()}


class _Statements:
    """The write path's SQL, in the driver's parameter style, built once.

    The hot path runs on the driver's cursor: building SQLAlchemy statements per
    message costs several times more than executing them.
    """

    def __init__(self, dialect: str) -> None:
        self.postgres = dialect == "postgresql"
        self._cache: dict[tuple[int, int], str] = {}
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
        self.load_contact = self._q(
            "SELECT admitted, fields, real, opted_in, opt_in_at, email_status, "
            "email_status_changed, email_status_stamp FROM contacts WHERE id = :id"
        )
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
        self.action_owner = self._q(
            "SELECT contact_id, version FROM actions WHERE action_id = :action_id"
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
        self.campaign_stamp = self._q("SELECT stamp FROM campaigns WHERE name = :name")
        self.insert_applied = self._q(
            "INSERT INTO applied_messages (key, kind, applied_at) VALUES (:key, :kind, :applied_at)"
        )

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

    def applied(self, count: int) -> str:
        names = ", ".join(f":k{i}" for i in range(count))
        return self._q(f"SELECT key FROM applied_messages WHERE key IN ({names})")


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


class _BatchWriter:
    """Applies one batch of records on one driver cursor, inside one transaction."""

    def __init__(self, cursor: Any, sql: _Statements, campaign_stamps: dict[str, str]) -> None:
        self.cursor = cursor
        self.sql = sql
        self.campaign_stamps = campaign_stamps
        self.now = _now()

    def _one(self, sql: str, params: dict[str, Any]) -> Any:
        self.cursor.execute(sql, params)
        return self.cursor.fetchone()

    def apply(self, records: Sequence[SyncRecord]) -> list[ApplyResult]:
        seen: set[str] = set()
        keys = list(dict.fromkeys(r.key for r in records))
        for start in range(0, len(keys), 500):
            chunk = keys[start : start + 500]
            self.cursor.execute(
                self.sql.applied(len(chunk)), {f"k{i}": key for i, key in enumerate(chunk)}
            )
            seen.update(row[0] for row in self.cursor.fetchall())
        results: list[ApplyResult] = []
        applied: list[dict[str, Any]] = []
        for record in records:
            if record.key in seen:
                results.append("duplicate")
                continue
            seen.add(record.key)
            contact_id = None
            if record.contact is not None:
                contact_id = self._contact(record.contact, record.action)
            if record.action is not None and contact_id is not None:
                self._action(record.action, contact_id)
            if record.campaign is not None:
                self._campaign(record.campaign)
            applied.append({"key": record.key, "kind": record.kind, "applied_at": self.now})
            results.append("applied")
        if applied:
            self.cursor.executemany(self.sql.insert_applied, applied)
        return results

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
            self.cursor.execute(
                self.sql.insert_consent,
                {
                    "contact_id": survivor,
                    "action_id": facts.consent.action_id,
                    "opt_in": _OPT_IN_TEXT[facts.consent.opt_in],
                    "given_at": facts.consent.given_at or "",
                },
            )
        if facts.status is not None:
            self.cursor.execute(
                self.sql.insert_status,
                {
                    "contact_id": survivor,
                    "status": facts.status.status,
                    "changed_at": facts.status.changed_at,
                    "stamp": facts.status.stamp,
                    "source": facts.status.source,
                },
            )
        return survivor

    def _load(self, contact_id: int) -> ContactState:
        row = self._one(self.sql.load_contact, {"id": contact_id})
        fields = _json_value(row[1])
        state = ContactState(
            fields={name: (pair[0], pair[1]) for name, pair in fields.items()},
            admitted=bool(row[0]),
            real=bool(row[2]),
            opted_in=bool(row[3]),
            opt_in_at=row[4],
            status=row[5],
            status_changed=row[6],
            status_stamp=row[7],
        )
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

    def _action(self, record: ActionRecord, contact_id: int) -> None:
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

    def _campaign(self, fact: CampaignFact) -> None:
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
        if self.cursor.rowcount == 0:
            self.cursor.execute(self.sql.insert_campaign, values)
        stored = self._one(self.sql.campaign_stamp, {"name": fact.name})
        # Cleared by the backend when the transaction fails, so it never runs ahead of
        # what is committed.
        self.campaign_stamps[fact.name] = stored[0] if stored else fact.stamp


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
