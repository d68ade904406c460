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
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from typing import Any

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
    and_,
    create_engine,
    delete,
    event,
    func,
    insert,
    or_,
    select,
    update,
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

__all__ = ["SCHEMA_VERSION", "SqlBackend", "normalise_url"]

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
    Column("opt_in", Boolean),
    Column("given_at", String(40)),
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
        self.url = normalise_url(url)
        try:
            parsed = make_url(self.url)
        except sa_exc.ArgumentError:
            raise ConfigError("CRM URL is not a database URL") from None
        self.dialect = parsed.get_backend_name()
        if self.dialect not in {"sqlite", "postgresql"}:
            raise ConfigError(f"unsupported CRM database {self.dialect!r} (sqlite or postgresql)")
        kwargs: dict[str, Any] = {"echo": echo, "hide_parameters": True}
        if self.dialect == "sqlite":
            # A locked database waits this long before failing (transient); ?timeout=S
            # in the URL overrides it.
            if "timeout" not in parsed.query:
                kwargs["connect_args"] = {"timeout": 15}
        else:
            kwargs["pool_pre_ping"] = True
            kwargs["connect_args"] = {"connect_timeout": 5}
        try:
            self.engine: Engine = create_engine(self.url, **kwargs)
        except ModuleNotFoundError:
            raise ConfigError(
                "PostgreSQL needs the 'postgres' extra: pip install 'proca-sync[postgres]'"
            ) from None
        if self.dialect == "sqlite":
            event.listen(self.engine, "connect", _sqlite_pragmas)
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="crm-sql")
        self._campaign_stamps: dict[str, str] = {}
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
        try:
            with self.engine.connect() as conn:
                conn.execute(select(1))
        except sa_exc.SQLAlchemyError as exc:
            raise _translate(exc) from None

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
            with self.engine.begin() as conn:
                return [self._apply_one(conn, record) for record in records]
        except sa_exc.SQLAlchemyError as exc:
            error = _translate(exc)
            self._campaign_stamps.clear()
            if not isinstance(error, PermanentError) or len(records) == 1:
                if isinstance(error, PermanentError):
                    return [error]
                raise error from None
        results: list[ApplyResult] = []
        for record in records:
            try:
                with self.engine.begin() as conn:
                    results.append(self._apply_one(conn, record))
            except sa_exc.SQLAlchemyError as exc:
                self._campaign_stamps.clear()
                error = _translate(exc)
                if not isinstance(error, PermanentError):
                    raise error from None
                results.append(error)
        return results

    def _apply_one(self, conn: Connection, record: SyncRecord) -> ApplyResult:
        seen = conn.execute(
            select(applied_messages.c.key).where(applied_messages.c.key == record.key)
        ).first()
        if seen is not None:
            return "duplicate"
        contact_id = None
        if record.contact is not None:
            contact_id = self._apply_contact(conn, record.contact, record.action)
        if record.action is not None and contact_id is not None:
            self._apply_action(conn, record.action, contact_id)
        if record.campaign is not None:
            self._apply_campaign(conn, record.campaign)
        conn.execute(
            insert(applied_messages).values(key=record.key, kind=record.kind, applied_at=_now())
        )
        return "applied"

    def _apply_contact(
        self, conn: Connection, facts: ContactFacts, action: ActionRecord | None
    ) -> int:
        conditions = []
        if facts.refs:
            conditions.append(
                and_(contact_keys.c.kind == "ref", contact_keys.c.value.in_(facts.refs))
            )
        if facts.emails:
            conditions.append(
                and_(contact_keys.c.kind == "email", contact_keys.c.value.in_(facts.emails))
            )
        ids = set(conn.execute(select(contact_keys.c.contact_id).where(or_(*conditions))).scalars())
        if action is not None:
            owner = conn.execute(
                select(actions.c.contact_id).where(actions.c.action_id == action.action_id)
            ).scalar()
            if owner is not None:
                ids.add(owner)
        state = ContactState()
        for contact_id in sorted(ids):
            state.join(self._load_state(conn, contact_id))
        known_keys = {("ref", ref) for ref in state.refs} | {("email", e) for e in state.emails}
        state.absorb(facts)
        row = _state_row(state)
        if not ids:
            inserted = conn.execute(insert(contacts).values(**row)).inserted_primary_key
            assert inserted is not None
            survivor = int(inserted[0])
        else:
            survivor = min(ids)
            for other in sorted(ids - {survivor}):
                self._merge_into(conn, other, survivor)
            conn.execute(update(contacts).where(contacts.c.id == survivor).values(**row))
        new_keys = [
            {"kind": kind, "value": value, "contact_id": survivor}
            for kind, value in sorted(
                {("ref", ref) for ref in facts.refs} | {("email", e) for e in facts.emails}
            )
            if (kind, value) not in known_keys
        ]
        if new_keys:
            conn.execute(insert(contact_keys), new_keys)
        if facts.consent is not None:
            self._insert_ignore(
                conn,
                consents,
                {
                    "contact_id": survivor,
                    "action_id": facts.consent.action_id,
                    "opt_in": facts.consent.opt_in,
                    "given_at": facts.consent.given_at,
                },
                ["action_id", "opt_in", "given_at"],
            )
        if facts.status is not None:
            self._insert_ignore(
                conn,
                email_status_history,
                {
                    "contact_id": survivor,
                    "status": facts.status.status,
                    "changed_at": facts.status.changed_at,
                    "stamp": facts.status.stamp,
                    "source": facts.status.source,
                },
                ["contact_id", "stamp"],
            )
        return survivor

    def _load_state(self, conn: Connection, contact_id: int) -> ContactState:
        row = conn.execute(select(contacts).where(contacts.c.id == contact_id)).one()
        state = ContactState(
            fields={name: (pair[0], pair[1]) for name, pair in row.fields.items()},
            admitted=row.admitted,
            real=row.real,
            opted_in=row.opted_in,
            opt_in_at=row.opt_in_at,
            status=row.email_status,
            status_changed=row.email_status_changed,
            status_stamp=row.email_status_stamp,
        )
        for kind, value in conn.execute(
            select(contact_keys.c.kind, contact_keys.c.value).where(
                contact_keys.c.contact_id == contact_id
            )
        ):
            (state.refs if kind == "ref" else state.emails).add(value)
        return state

    def _merge_into(self, conn: Connection, other: int, survivor: int) -> None:
        """Move everything of contact ``other`` to ``survivor`` and delete ``other``."""
        for table in (contact_keys, actions, consents):
            conn.execute(
                update(table).where(table.c.contact_id == other).values(contact_id=survivor)
            )
        statuses = conn.execute(
            select(email_status_history).where(email_status_history.c.contact_id == other)
        ).mappings()
        for status in list(statuses):
            values = dict(status)
            values.pop("id")
            values["contact_id"] = survivor
            self._insert_ignore(conn, email_status_history, values, ["contact_id", "stamp"])
        conn.execute(delete(email_status_history).where(email_status_history.c.contact_id == other))
        conn.execute(delete(contacts).where(contacts.c.id == other))

    def _apply_action(self, conn: Connection, record: ActionRecord, contact_id: int) -> None:
        current = conn.execute(
            select(actions.c.version, actions.c.contact_id).where(
                actions.c.action_id == record.action_id
            )
        ).first()
        values = {
            "contact_id": contact_id,
            "action_type": record.action_type,
            "campaign": record.campaign,
            "created_at": record.created_at,
            "testing": record.testing,
            "version": record.version,
            "data": record.data,
        }
        if current is None:
            conn.execute(insert(actions).values(action_id=record.action_id, **values))
        elif record.version > current.version:
            conn.execute(
                update(actions).where(actions.c.action_id == record.action_id).values(**values)
            )
        elif current.contact_id != contact_id:
            conn.execute(
                update(actions)
                .where(actions.c.action_id == record.action_id)
                .values(contact_id=contact_id)
            )

    def _apply_campaign(self, conn: Connection, fact: CampaignFact) -> None:
        known = self._campaign_stamps.get(fact.name)
        if known is not None and known >= fact.stamp:
            return
        values = {
            "title": fact.data.get("title"),
            "external_id": fact.data.get("externalId"),
            "stamp": fact.stamp,
            "data": fact.data,
        }
        changed = conn.execute(
            update(campaigns)
            .where(campaigns.c.name == fact.name, campaigns.c.stamp < fact.stamp)
            .values(**values)
        ).rowcount
        if not changed:
            self._insert_ignore(conn, campaigns, {"name": fact.name, **values}, ["name"])
        stored = conn.execute(
            select(campaigns.c.stamp).where(campaigns.c.name == fact.name)
        ).scalar()
        # Only remember what is committed-to-be: a rollback clears the cache.
        self._campaign_stamps[fact.name] = stored or fact.stamp

    def _insert_ignore(
        self, conn: Connection, table: Table, values: dict[str, Any], conflict: list[str]
    ) -> None:
        if self.dialect == "postgresql":
            from sqlalchemy.dialects.postgresql import insert as pg_insert

            conn.execute(pg_insert(table).values(**values).on_conflict_do_nothing())
        else:
            from sqlalchemy.dialects.sqlite import insert as sqlite_insert

            conn.execute(
                sqlite_insert(table)
                .values(**values)
                .on_conflict_do_nothing(index_elements=conflict)
            )

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
                    {"actionId": row.action_id, "optIn": row.opt_in, "givenAt": row.given_at}
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

    def stats(self) -> dict[str, int]:
        with self._reading() as conn:

            def count(table: Table, *where: Any) -> int:
                return int(
                    conn.execute(select(func.count()).select_from(table).where(*where)).scalar()
                    or 0
                )

            return {
                "contacts": count(contacts, contacts.c.admitted.is_(True)),
                "subscribed": count(
                    contacts, contacts.c.admitted.is_(True), contacts.c.subscribed.is_(True)
                ),
                "actions": count(actions),
                "campaigns": count(campaigns),
                "applied_messages": count(applied_messages),
            }


def _state_row(state: ContactState) -> dict[str, Any]:
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
        "updated_at": _now(),
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


def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.close()
