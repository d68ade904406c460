"""The ledger's change log (a transactional outbox) and erasure.

Every commit of the writers that changes a contact, an action or a campaign adds one row
per changed entity to ``changes`` in the same transaction (``kind``, ``entity``: a ledger
contact id, an action id or a campaign name). The destinations' pusher reads the rows
after its cursor and pushes the entities' *current* state, so one row per entity is
enough and a row for an entity since deleted (merged, erased) is skipped.

A contact merged into another by deduplication is deleted; its commit adds a ``merge``
row (``entity``: ``"<merged-away id>:<merged contact id>"``), from which the pusher
retires the address a destination had for the merged-away contact (see
:meth:`~proca_sync.destinations.state.LedgerState.plan`). A campaign's row makes the
pusher offer the campaign's contacts again when what destinations project of it (title,
external id) changed.

**Order.** A reader advances its cursor to the highest change number it read, so it must
never see number *n+1* committed while *n* is still to come. SQLite serialises writers,
so numbers are drawn in commit order. On PostgreSQL two transactions may draw numbers in
one order and commit in the other; the writers therefore take a transaction-level
advisory lock (:data:`CHANGES_LOCK`) just before inserting their change rows, as the last
statement of the transaction, and hold it until the commit: numbers are drawn in commit
order, and a transaction that rolls back leaves a gap, which the cursor steps over. The
lock is held only from that insert to the commit, so writers still run in parallel.

**Erasure.** ``crm forget`` deletes a contact with its keys, actions, consent and
e-mail-status history and leaves a *tombstone*: a keyed hash (HMAC-SHA256, key from a
file created 0600 when absent) of each of its e-mails and refs, with the erasure time. The
writers drop the contact part (and the action) of a record naming a tombstoned key whose
data is not newer than the erasure, so an older redelivered message does not bring the
person back, while a newer action creates them afresh. The tombstone keeps the address
(and refs) only until every destination has propagated the erasure, then is scrubbed.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
import time
from pathlib import Path

from sqlalchemy import Connection, delete, func, insert, select, text, update

from proca_sync.crm.sql.schema import (
    actions,
    consents,
    contact_keys,
    contacts,
    destination_items,
    destination_parked,
    destinations,
    email_status_history,
    tombstone_keys,
    tombstones,
)
from proca_sync.crm.sql.store import _now
from proca_sync.errors import ConfigError

__all__ = [
    "CHANGES_LOCK",
    "DEFAULT_ERASURE_KEY_FILE",
    "TombstoneCheck",
    "forget",
    "load_erasure_key",
    "log_change",
    "scrub_propagated",
    "upgrade",
]

CHANGES_LOCK = 0x70726F6361  # "proca": the advisory lock that orders change numbers
DEFAULT_ERASURE_KEY_FILE = Path("proca-erasure.key")


class TombstoneCheck:
    """The keyed hash of e-mails and refs that tombstones hold."""

    def __init__(self, key: bytes) -> None:
        self._key = key

    def __repr__(self) -> str:
        return "TombstoneCheck(<key>)"

    def digest(self, value: str) -> str:
        return hmac.new(self._key, value.encode(), hashlib.sha256).hexdigest()


def load_erasure_key(path: Path, *, create: bool) -> bytes | None:
    """The erasure key in ``path``; created (32 random bytes, hex, mode 0600) when absent
    and ``create``, else ``None`` when absent. :class:`ConfigError` when unreadable."""
    try:
        data = path.read_text(encoding="ascii").strip()
    except FileNotFoundError:
        if not create:
            return None
        data = secrets.token_hex(32)
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:
            return load_erasure_key(path, create=False)
        except OSError as exc:
            raise ConfigError(f"cannot create erasure key {path} ({type(exc).__name__})") from None
        with os.fdopen(fd, "w", encoding="ascii") as handle:
            handle.write(data + "\n")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read erasure key {path} ({type(exc).__name__})") from None
    if len(data) < 32:
        raise ConfigError(f"erasure key {path} is too short (32+ characters)")
    return data.encode()


def log_change(conn: Connection, kind: str, entity: str) -> None:
    """Record one change in the caller's transaction (its last statement on PostgreSQL:
    the lock ordering change numbers is held until the commit)."""
    if conn.dialect.name == "postgresql":
        conn.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": CHANGES_LOCK})
    conn.execute(
        text("INSERT INTO changes (kind, entity, at) VALUES (:kind, :entity, :at)"),
        {"kind": kind, "entity": entity, "at": time.time()},
    )

def upgrade(conn: Connection, version: int) -> None:
    """Bring a database of schema ``version`` to the current one, in place (the new
    tables exist already: ``create_all``). 1 → 2: seed the change log with every stored
    contact, action and campaign, so that destinations receive what was there before."""
    if version < 2:
        at = time.time()
        for kind, column, table in (
            ("contact", "id", "contacts"),
            ("action", "action_id", "actions"),
            ("campaign", "name", "campaigns"),
        ):
            conn.execute(
                text(
                    f"INSERT INTO changes (kind, entity, at) SELECT '{kind}', "
                    f"CAST({column} AS TEXT), :at FROM {table} ORDER BY {column}"
                ),
                {"at": at},
            )


def forget(
    conn: Connection, check: TombstoneCheck, *, email: str | None = None, ref: str | None = None
) -> int | None:
    """Erase the contact holding ``email`` (normalised) or ``ref``, in the caller's
    transaction: its keys, actions, consent and status history and the destinations'
    records of them. Leaves a tombstone and an ``erasure`` change; returns the tombstone
    id, or ``None`` when no contact holds that key."""
    kind, value = ("email", email) if email is not None else ("ref", ref)
    contact_id = conn.execute(
        select(contact_keys.c.contact_id).where(
            contact_keys.c.kind == kind, contact_keys.c.value == value
        )
    ).scalar()
    if contact_id is None:
        return None
    keys = conn.execute(
        select(contact_keys.c.kind, contact_keys.c.value).where(
            contact_keys.c.contact_id == contact_id
        )
    ).all()
    current = conn.execute(select(contacts.c.email).where(contacts.c.id == contact_id)).scalar()
    action_ids = [
        str(a)
        for a in conn.execute(
            select(actions.c.action_id).where(actions.c.contact_id == contact_id)
        ).scalars()
    ]
    refs = sorted(v for k, v in keys if k == "ref")
    emails = sorted(v for k, v in keys if k == "email")
    erased_at = _now()
    tombstone_id = conn.execute(
        insert(tombstones)
        .values(erased_at=erased_at, email=current or (emails[0] if emails else None), refs=refs)
        .returning(tombstones.c.id)
    ).scalar_one()
    digests = sorted({check.digest(v) for v in (*refs, *emails)})
    if digests:
        conn.execute(delete(tombstone_keys).where(tombstone_keys.c.hash.in_(digests)))
        conn.execute(
            insert(tombstone_keys),
            [{"hash": d, "tombstone_id": tombstone_id, "erased_at": erased_at} for d in digests],
        )
    for table in (consents, email_status_history, actions, contact_keys):
        conn.execute(delete(table).where(table.c.contact_id == contact_id))
    conn.execute(delete(contacts).where(contacts.c.id == contact_id))
    for table in (destination_items, destination_parked):
        conn.execute(
            delete(table).where(
                (
                    table.c.kind.in_(["contact", "address", "retired"])
                    & (table.c.entity == str(contact_id))
                )
                | ((table.c.kind == "action") & table.c.entity.in_(action_ids))
            )
        )
    if not conn.execute(select(func.count()).select_from(destinations)).scalar():
        # No destination to propagate to: nothing to keep the address for.
        _scrub(conn, [tombstone_id])
    log_change(conn, "erasure", str(tombstone_id))
    return int(tombstone_id)


def _scrub(conn: Connection, ids: list[int]) -> None:
    if ids:
        conn.execute(update(tombstones).where(tombstones.c.id.in_(ids)).values(email=None, refs=[]))


def scrub_propagated(conn: Connection) -> int:
    """Scrub the tombstones every registered destination is past (its cursor beyond the
    erasure's change, not parked there); returns how many were scrubbed."""
    pending = conn.execute(
        select(tombstones.c.id).where(tombstones.c.email.is_not(None))
    ).all()
    if not pending:
        return 0
    rows = conn.execute(
        text(
            "SELECT c.seq, c.entity FROM changes c WHERE c.kind = 'erasure' AND c.entity IN "
            "(SELECT CAST(id AS TEXT) FROM tombstones WHERE email IS NOT NULL)"
        )
    ).all()
    lowest = conn.execute(select(func.min(destinations.c.cursor))).scalar()
    parked = set(
        conn.execute(
            select(destination_parked.c.entity).where(destination_parked.c.kind == "erasure")
        ).scalars()
    )
    done = [
        int(entity)
        for seq, entity in rows
        if (lowest is None or seq <= lowest) and entity not in parked
    ]
    _scrub(conn, done)
    return len(done)
