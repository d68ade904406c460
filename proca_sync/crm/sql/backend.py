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
import logging
import random
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from sqlalchemy import (
    Connection,
    Table,
    func,
    insert,
    select,
    update,
)
from sqlalchemy import exc as sa_exc

from proca_sync.crm.base import ApplyResult
from proca_sync.crm.sql.changelog import TombstoneCheck, forget, load_erasure_key, upgrade
from proca_sync.crm.sql.schema import (
    _OPT_IN_VALUES,
    SCHEMA_VERSION,
    actions,
    applied_messages,
    campaigns,
    consents,
    contact_keys,
    contacts,
    email_status_history,
    meta_table,
    metadata,
    tombstone_keys,
)
from proca_sync.crm.sql.store import (
    _translate,
    conflict,
    create_store_engine,
    lock_schema,
    missing_database,
    write_engine,
)
from proca_sync.crm.sql.writer import (
    _BatchWriter,
    _export_action,
    _RecordWriter,
    _Statements,
    lock_batch,
)
from proca_sync.errors import (
    BackendRejectedError,
    BackendUnavailableError,
    ConfigError,
    PermanentError,
)
from proca_sync.sync.contacts import normalise_email
from proca_sync.sync.records import (
    SyncRecord,
)

log = logging.getLogger("proca_sync.crm")

ANALYSE_FIRST = 1_000
"""Records written before the first ANALYZE on PostgreSQL (then at 4×, 16×, …)."""
DEFAULT_URL = "sqlite:///proca-crm.db"
CONFLICT_RETRIES = 4
"""Times a batch that clashed with another writer is tried again before the clash is
raised (as a transient error, for the consumer's retry policy)."""


class SqlBackend:
    """The embedded CRM. One writer thread; SQLite in WAL mode or PostgreSQL.

    Any number of processes may write into one database at once and reach the state
    one process reaches (the merge does not depend on order): on SQLite a batch holds
    the write lock from its first read (``BEGIN IMMEDIATE``); on PostgreSQL it locks
    the keys it names and the contacts they lead to (:func:`~proca_sync.crm.sql.writer.
    lock_batch`). A clash with another writer (deadlock, serialization failure, a busy
    SQLite file, a key taken first) is tried again here a few times before it surfaces
    as a :class:`~proca_sync.errors.BackendUnavailableError`.
    """

    name = "sql"
    max_batches = 1
    """One writer thread applies the batches one at a time: the consumer hands it the
    next batch when it is free (see :func:`proca_sync.consumer.runner.batch_slots`)."""

    def __init__(
        self, url: str = DEFAULT_URL, *, echo: bool = False, erasure_key: bytes | None = None
    ) -> None:
        self.engine, self.dialect = create_store_engine(url, what="CRM", echo=echo)
        self._writes = write_engine(self.engine)
        self.tombstones = TombstoneCheck(erasure_key) if erasure_key else None
        self.has_tombstones = False
        self._key_file: Path | None = None
        self.commit_hooks: list[Callable[[], None]] = []
        """Called (in the writer thread) after each commit that logged changes."""
        self.url = str(self.engine.url)
        self.conflicts = 0
        """Transactions tried again after a clash with another writer (for tests, bench)."""
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="crm-sql")
        self._campaign_stamps: dict[str, str] = {}
        self._statements = _Statements(self.dialect)
        self._ready = False
        self._written = 0
        self._analyse_at = ANALYSE_FIRST

    # ---- lifecycle --------------------------------------------------------------------

    def attach_erasure_key(self, key: bytes) -> None:
        """The key of the tombstones' hashes (see :mod:`proca_sync.crm.sql.changelog`)."""
        self.tombstones = TombstoneCheck(key)

    def watch_erasure_key(self, path: Path) -> None:
        """Load the erasure key from ``path`` now if it exists, else as soon as it does
        (``crm forget`` creates it): checked before each batch, so a process started
        before the first erasure keeps erased people erased without a restart."""
        self._key_file = path
        self._load_key_file()

    def _load_key_file(self) -> None:
        path = self._key_file
        if self.tombstones is None and path is not None and path.exists():
            key = load_erasure_key(path, create=False)
            if key is not None:
                self.attach_erasure_key(key)

    async def open(self) -> None:
        await self._run(self.open_sync)
        self._load_key_file()
        if self.has_tombstones and self.tombstones is None:
            raise ConfigError(
                "the CRM holds erased contacts: give the erasure key "
                "(--erasure-key / PROCA_ERASURE_KEY_FILE) so they are not brought back"
            )

    def open_sync(self) -> None:
        """Create the schema on first use and check its version.

        Raises :class:`ConfigError` when the PostgreSQL database does not exist or the
        schema is newer than this code; :class:`BackendUnavailableError` when the
        database is down or locked (transient).
        """
        if self._ready:
            return
        try:
            with self._writes.begin() as conn:
                lock_schema(conn)
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
                elif int(version) < SCHEMA_VERSION:
                    upgrade(conn, int(version))
                    conn.execute(
                        update(meta_table)
                        .where(meta_table.c.key == "schema_version")
                        .values(value=str(SCHEMA_VERSION))
                    )
                self.has_tombstones = bool(
                    conn.execute(select(tombstone_keys.c.hash).limit(1)).first()
                )
        except sa_exc.SQLAlchemyError as exc:
            # A database that does not exist is a typo, not an outage: refuse to start.
            raise (missing_database(exc, what="CRM") or _translate(exc)) from None
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
        self._load_key_file()
        results = self._apply_isolating(records)
        self._written += len(records)
        if self._statements.postgres and self._written >= self._analyse_at:
            self._analyse_at *= 4
            self._analyse()
        return results

    def _apply_isolating(self, records: Sequence[SyncRecord]) -> list[ApplyResult]:
        try:
            return self._retrying(records)
        except Exception as exc:
            error = self._translate_any(exc)
            if not isinstance(error, PermanentError):
                raise error from None
            if len(records) == 1:
                return [error]
        results: list[ApplyResult] = []
        for record in records:
            try:
                results.extend(self._retrying([record]))
            except Exception as exc:
                error = self._translate_any(exc)
                if not isinstance(error, PermanentError):
                    raise error from None
                results.append(error)
        return results

    def _analyse(self) -> None:
        """Refresh PostgreSQL's statistics of the CRM tables (after 1k, 4k, 16k… records
        written by this process). A batch looks up a few hundred keys; without statistics
        (autovacuum off, or not yet run on young tables) the planner estimates the tables
        tiny and scans them whole, once per batch: quadratic in the CRM's size. Best
        effort: a failure here is logged and changes nothing."""
        tables = ", ".join(table.name for table in metadata.sorted_tables)
        try:
            with self.engine.connect() as conn:
                conn = conn.execution_options(isolation_level="AUTOCOMMIT")
                conn.exec_driver_sql(f"ANALYZE {tables}")
        except sa_exc.SQLAlchemyError as exc:
            log.warning("ANALYZE of the CRM tables failed (%s)", type(exc).__name__)

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

    def _retrying(self, records: Sequence[SyncRecord]) -> list[ApplyResult]:
        """:meth:`_transaction`, tried again (after a short random pause) while it
        clashes with another writer, at most :data:`CONFLICT_RETRIES` times."""
        for attempt in range(CONFLICT_RETRIES + 1):
            try:
                return self._transaction(records)
            except Exception as exc:
                orig = getattr(exc, "orig", None) or exc
                if attempt == CONFLICT_RETRIES or not conflict(orig):
                    raise
                self.conflicts += 1
                self._campaign_stamps.clear()
                # On the writer thread: the pause holds this batch only. Random, so two
                # clashing writers do not meet again at once.
                time.sleep(random.uniform(0.005, 0.02) * 2**attempt)
        raise AssertionError("unreachable")

    def _transaction(self, records: Sequence[SyncRecord]) -> list[ApplyResult]:
        with self._writes.begin() as conn:
            cursor = conn.connection.dbapi_connection.cursor()  # type: ignore[union-attr]
            try:
                if self._statements.postgres:
                    lock_batch(cursor, self._statements, records)
                check = self.tombstones
                batch = _BatchWriter(cursor, self._statements, self._campaign_stamps, check)
                if batch.accepts(records):
                    results = batch.apply(records)
                else:
                    writer = _RecordWriter(cursor, self._statements, self._campaign_stamps, check)
                    results = writer.apply(records)
            finally:
                cursor.close()
        for hook in self.commit_hooks:
            hook()
        return results

    # ---- erasure ----------------------------------------------------------------------

    def forget_sync(self, *, email: str | None = None, ref: str | None = None) -> int | None:
        """Erase one contact (see :func:`proca_sync.crm.sql.changelog.forget`); returns
        the tombstone id, ``None`` when no contact holds that e-mail or ref. Needs the
        erasure key (:class:`ConfigError` without)."""
        self.open_sync()
        if self.tombstones is None:
            raise ConfigError("crm forget needs the erasure key")
        key = normalise_email(email) if email is not None else None
        try:
            with self._writes.begin() as conn:
                tombstone = forget(conn, self.tombstones, email=key, ref=ref)
        except sa_exc.SQLAlchemyError as exc:
            raise _translate(exc) from None
        self.has_tombstones = self.has_tombstones or tombstone is not None
        for hook in self.commit_hooks:
            hook()
        return tombstone

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
