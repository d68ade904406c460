"""What the ledger keeps per destination, and the reads that turn changes into batches.

Per destination (table ``destinations``): its **cursor** (the change number up to which
everything is done or parked), its **last success**, and a **lease** (``lease_owner``,
``lease_until``): only the holder pushes, every state write is fenced by it, and when the
holder dies another process takes over once ``lease_until`` has passed. Per entity
(``destination_items``): the change number and a digest of the state last written, so a
replay, a second push or a change that changes nothing sends nothing. Per refused item
(``destination_parked``): the API's error code and message (never personal data).

Every method is synchronous (the pusher runs them in its thread) and translates database
errors into :class:`~proca_sync.errors.TransientError`.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import orjson
from sqlalchemy import Connection, and_, delete, func, insert, select, tuple_, update
from sqlalchemy import exc as sa_exc

from proca_sync.crm.sql import SqlBackend
from proca_sync.crm.sql.changelog import log_change, scrub_propagated
from proca_sync.crm.sql.schema import (
    actions,
    campaigns,
    changes,
    contact_keys,
    contacts,
    destination_items,
    destination_parked,
    destinations,
    tombstones,
)
from proca_sync.crm.sql.store import _translate
from proca_sync.destinations.base import (
    ActionView,
    Batch,
    CampaignView,
    ContactView,
    Erasure,
    ItemKey,
)
from proca_sync.errors import TransientError

__all__ = ["LeaseLostError", "LedgerState", "Parked", "Plan", "Status", "digest"]

_CHUNK = 500


class LeaseLostError(TransientError):
    """Another process holds this destination's lease now: stop pushing it."""


@dataclass(frozen=True, slots=True)
class Parked:
    id: int
    destination: str
    kind: str
    entity: str
    version: int
    code: str
    message: str
    parked_at: float


@dataclass(frozen=True, slots=True)
class Status:
    name: str
    cursor: int
    pending: int
    lag: float | None
    last_success: float | None
    parked: int
    lease_owner: str | None
    lease_until: float | None


@dataclass(slots=True)
class Plan:
    """One window of changes turned into what the destination lacks."""

    last_seq: int
    contacts: list[ContactView] = field(default_factory=list)
    actions: dict[int, list[ActionView]] = field(default_factory=dict)  # by contact id
    erasures: list[Erasure] = field(default_factory=list)
    campaigns: dict[str, CampaignView] = field(default_factory=dict)
    digests: dict[ItemKey, tuple[int, str]] = field(default_factory=dict)  # key → version, digest

    def batches(self, size: int) -> Iterator[Batch]:
        """Batches of at most ``size`` contacts (each with its actions), then erasures."""
        for start in range(0, len(self.contacts), size):
            chunk = self.contacts[start : start + size]
            acts = [a for c in chunk for a in self.actions.get(c.contact_id, [])]
            names = {a.campaign for a in acts} | {n for c in chunk for n in c.campaigns}
            yield Batch(
                contacts=chunk,
                actions=acts,
                campaigns={n: self.campaigns[n] for n in sorted(names) if n in self.campaigns},
            )
        for start in range(0, len(self.erasures), size):
            yield Batch(erasures=self.erasures[start : start + size])


def digest(value: Any) -> str:
    return hashlib.sha256(orjson.dumps(value, option=orjson.OPT_SORT_KEYS)).hexdigest()[:32]


def _contact_digest(view: ContactView) -> str:
    return digest(
        [
            view.email,
            view.first_name,
            view.last_name,
            view.postcode,
            view.country,
            dict(view.fields),
            view.refs,
            view.subscribed,
            view.opted_in,
            view.opt_in_at,
            view.email_status,
            view.email_status_changed,
            view.testing,
            view.campaigns,
        ]
    )


def _action_digest(view: ActionView) -> str:
    return digest(
        [
            view.contact_id,
            view.action_type,
            view.campaign,
            view.created_at,
            view.testing,
            dict(view.data),
        ]
    )


def _json(value: Any) -> Any:
    return orjson.loads(value) if isinstance(value, str | bytes) else value


def _chunks(values: Sequence[Any]) -> Iterator[Sequence[Any]]:
    for start in range(0, len(values), _CHUNK):
        yield values[start : start + _CHUNK]


class LedgerState:
    """One destination's state in the ledger (see the module docstring)."""

    def __init__(self, backend: SqlBackend, name: str) -> None:
        self.backend = backend
        self.engine = backend.engine
        self.name = name

    # ---- plumbing -----------------------------------------------------------------------

    def _begin(self) -> Any:
        return _Guard(self.engine.begin())

    def _connect(self) -> Any:
        return _Guard(self.engine.connect())

    # ---- registration and lease ---------------------------------------------------------

    def register(self) -> None:
        """Create the destination's row (cursor 0: it lacks everything) if absent."""
        with self._begin() as conn:
            found = conn.execute(
                select(destinations.c.name).where(destinations.c.name == self.name)
            ).first()
            if found is None:
                try:
                    with conn.begin_nested():
                        conn.execute(insert(destinations).values(name=self.name, cursor=0))
                except sa_exc.IntegrityError:
                    pass  # registered by another process meanwhile

    def acquire(self, owner: str, ttl: float) -> bool:
        """Take or renew the lease; ``False`` while another live holder has it."""
        now = time.time()
        with self._begin() as conn:
            result = conn.execute(
                update(destinations)
                .where(
                    destinations.c.name == self.name,
                    (destinations.c.lease_owner.is_(None))
                    | (destinations.c.lease_owner == owner)
                    | (destinations.c.lease_until < now),
                )
                .values(lease_owner=owner, lease_until=now + ttl)
            )
            return bool(result.rowcount)

    def release(self, owner: str) -> None:
        with self._begin() as conn:
            conn.execute(
                update(destinations)
                .where(destinations.c.name == self.name, destinations.c.lease_owner == owner)
                .values(lease_owner=None, lease_until=None)
            )

    def _fence(self, conn: Connection, owner: str) -> int:
        """The cursor, under the lease (:class:`LeaseLostError` if another holds it)."""
        row = conn.execute(
            select(destinations.c.cursor, destinations.c.lease_owner).where(
                destinations.c.name == self.name
            )
        ).first()
        if row is None or row.lease_owner != owner:
            raise LeaseLostError(f"destination {self.name}: lease taken by another process")
        return int(row.cursor)

    # ---- reading changes ----------------------------------------------------------------

    def cursor(self) -> int:
        with self._connect() as conn:
            value = conn.execute(
                select(destinations.c.cursor).where(destinations.c.name == self.name)
            ).scalar()
        return int(value or 0)

    def pending(self) -> int:
        with self._connect() as conn:
            return self._pending(conn, self._cursor(conn))

    def _cursor(self, conn: Connection) -> int:
        value = conn.execute(
            select(destinations.c.cursor).where(destinations.c.name == self.name)
        ).scalar()
        return int(value or 0)

    def _pending(self, conn: Connection, cursor: int) -> int:
        return int(
            conn.execute(
                select(func.count()).select_from(changes).where(changes.c.seq > cursor)
            ).scalar()
            or 0
        )

    def plan(
        self, *, limit: int, include_testing: bool, erasure: bool
    ) -> Plan | None:
        """What the destination lacks of the next ``limit`` changes after its cursor;
        ``None`` when there are none. Contacts not admitted, without an e-mail or
        (unless ``include_testing``) testing are left out, as are testing actions; an
        entity whose digest equals the one last written is left out too."""
        with self._connect() as conn:
            cursor = self._cursor(conn)
            rows = conn.execute(
                select(changes.c.seq, changes.c.kind, changes.c.entity)
                .where(changes.c.seq > cursor)
                .order_by(changes.c.seq)
                .limit(limit)
            ).all()
            if not rows:
                return None
            plan = Plan(last_seq=int(rows[-1].seq))
            contact_seq: dict[int, int] = {}
            action_seq: dict[int, int] = {}
            erasure_seq: dict[int, int] = {}
            for seq, kind, entity in rows:
                if kind == "contact":
                    contact_seq[int(entity)] = seq
                elif kind == "action":
                    action_seq[int(entity)] = seq
                elif kind == "erasure":
                    erasure_seq[int(entity)] = seq
            # Actions lead to their (current) contacts.
            for chunk in _chunks(list(action_seq)):
                for action_id, contact_id in conn.execute(
                    select(actions.c.action_id, actions.c.contact_id).where(
                        actions.c.action_id.in_(chunk)
                    )
                ):
                    seq = action_seq[int(action_id)]
                    contact_seq[contact_id] = max(contact_seq.get(contact_id, 0), seq)
            self._load_contacts(conn, plan, contact_seq, action_seq, include_testing)
            if erasure and erasure_seq:
                self._load_erasures(conn, plan, erasure_seq)
            return plan

    def _known(self, conn: Connection, kind: str, entities: Sequence[str]) -> dict[str, str]:
        known: dict[str, str] = {}
        for chunk in _chunks(entities):
            for entity, value in conn.execute(
                select(destination_items.c.entity, destination_items.c.digest).where(
                    destination_items.c.destination == self.name,
                    destination_items.c.kind == kind,
                    destination_items.c.entity.in_(chunk),
                )
            ):
                known[entity] = value
        return known

    def _load_contacts(
        self,
        conn: Connection,
        plan: Plan,
        contact_seq: dict[int, int],
        action_seq: dict[int, int],
        include_testing: bool,
    ) -> None:
        ids = sorted(contact_seq)
        rows: dict[int, Any] = {}
        refs: dict[int, list[str]] = {}
        acts: dict[int, list[Any]] = {}
        for chunk in _chunks(ids):
            for row in conn.execute(select(contacts).where(contacts.c.id.in_(chunk))):
                rows[row.id] = row
            for cid, value in conn.execute(
                select(contact_keys.c.contact_id, contact_keys.c.value).where(
                    contact_keys.c.contact_id.in_(chunk), contact_keys.c.kind == "ref"
                )
            ):
                refs.setdefault(cid, []).append(value)
            for row in conn.execute(
                select(actions).where(actions.c.contact_id.in_(chunk)).order_by(
                    actions.c.created_at, actions.c.action_id
                )
            ):
                acts.setdefault(row.contact_id, []).append(row)
        eligible = [
            cid
            for cid in ids
            if cid in rows
            and rows[cid].admitted
            and rows[cid].email
            and (include_testing or rows[cid].real)
        ]
        known_contacts = self._known(conn, "contact", [str(c) for c in eligible])
        action_ids = [str(a.action_id) for c in eligible for a in acts.get(c, [])]
        known_actions = self._known(conn, "action", action_ids)
        names: set[str] = set()
        for cid in eligible:
            row = rows[cid]
            version = contact_seq[cid]
            lacking: list[ActionView] = []
            for act in acts.get(cid, []):
                if act.testing and not include_testing:
                    continue
                view = ActionView(
                    action_id=int(act.action_id),
                    contact_id=cid,
                    action_type=act.action_type,
                    campaign=act.campaign,
                    created_at=act.created_at,
                    testing=bool(act.testing),
                    data=_json(act.data),
                )
                value = _action_digest(view)
                if known_actions.get(str(view.action_id)) != value:
                    lacking.append(view)
                    seq = action_seq.get(view.action_id, version)
                    plan.digests[view.key] = (seq, value)
            fields = {name: pair[0] for name, pair in sorted(_json(row.fields).items())}
            for column in ("email", "firstName", "lastName", "postcode", "country"):
                fields.pop(column, None)
            contact = ContactView(
                contact_id=cid,
                version=version,
                email=row.email,
                first_name=row.first_name,
                last_name=row.last_name,
                postcode=row.postcode,
                country=row.country,
                fields=fields,
                refs=tuple(sorted(refs.get(cid, []))),
                subscribed=bool(row.subscribed),
                opted_in=bool(row.opted_in),
                opt_in_at=row.opt_in_at,
                email_status=row.email_status,
                email_status_changed=row.email_status_changed,
                testing=not row.real,
                campaigns=tuple(sorted({a.campaign for a in acts.get(cid, [])})),
                updated_at=row.updated_at,
            )
            value = _contact_digest(contact)
            if known_contacts.get(str(cid)) == value and not lacking:
                continue
            plan.contacts.append(contact)
            plan.digests[contact.key] = (version, value)
            if lacking:
                plan.actions[cid] = lacking
            names.update(contact.campaigns)
        for chunk in _chunks(sorted(names)):
            for row in conn.execute(select(campaigns).where(campaigns.c.name.in_(chunk))):
                plan.campaigns[row.name] = CampaignView(
                    name=row.name, title=row.title, external_id=row.external_id
                )

    def _load_erasures(self, conn: Connection, plan: Plan, erasure_seq: dict[int, int]) -> None:
        ids = sorted(erasure_seq)
        known = self._known(conn, "erasure", [str(i) for i in ids])
        for chunk in _chunks(ids):
            for row in conn.execute(select(tombstones).where(tombstones.c.id.in_(chunk))):
                if row.email is None or str(row.id) in known:
                    continue  # scrubbed (propagated everywhere) or done here
                view = Erasure(tombstone_id=int(row.id), email=row.email, refs=tuple(row.refs))
                plan.erasures.append(view)
                plan.digests[view.key] = (erasure_seq[row.id], "erased")

    # ---- recording outcomes -------------------------------------------------------------

    def record(
        self,
        owner: str,
        done: dict[ItemKey, tuple[int, str]],
        parked: dict[ItemKey, tuple[int, str, str]],
    ) -> None:
        """Items written (version, digest) and items refused for good (version, code,
        message), in one transaction under the lease."""
        if not done and not parked:
            return
        with self._begin() as conn:
            self._fence(conn, owner)
            keys = list(done) + list(parked)
            for chunk in _chunks(keys):
                pairs = [(kind, entity) for kind, entity in chunk]
                for table in (destination_items, destination_parked):
                    conn.execute(
                        delete(table).where(
                            table.c.destination == self.name,
                            tuple_(table.c.kind, table.c.entity).in_(pairs),
                        )
                    )
            if done:
                conn.execute(
                    insert(destination_items),
                    [
                        {
                            "destination": self.name,
                            "kind": kind,
                            "entity": entity,
                            "version": version,
                            "digest": value,
                        }
                        for (kind, entity), (version, value) in done.items()
                    ],
                )
            if parked:
                now = time.time()
                conn.execute(
                    insert(destination_parked),
                    [
                        {
                            "destination": self.name,
                            "kind": kind,
                            "entity": entity,
                            "version": version,
                            "code": code[:128],
                            "message": message[:500],
                            "parked_at": now,
                        }
                        for (kind, entity), (version, code, message) in parked.items()
                    ],
                )

    def advance(self, owner: str, seq: int) -> None:
        """Move the cursor to ``seq`` (everything up to it done or parked)."""
        with self._begin() as conn:
            cursor = self._fence(conn, owner)
            if seq > cursor:
                conn.execute(
                    update(destinations)
                    .where(destinations.c.name == self.name)
                    .values(cursor=seq, last_success=time.time())
                )
            scrub_propagated(conn)

    def touch(self, owner: str) -> None:
        """Note a successful contact with the destination (nothing to push)."""
        with self._begin() as conn:
            self._fence(conn, owner)
            conn.execute(
                update(destinations)
                .where(destinations.c.name == self.name)
                .values(last_success=time.time())
            )

    # ---- status, parked, retry -----------------------------------------------------------

    def status(self) -> Status:
        with self._connect() as conn:
            row = conn.execute(
                select(destinations).where(destinations.c.name == self.name)
            ).first()
            cursor = int(row.cursor) if row is not None else 0
            oldest = conn.execute(
                select(func.min(changes.c.at)).where(changes.c.seq > cursor)
            ).scalar()
            parked = conn.execute(
                select(func.count())
                .select_from(destination_parked)
                .where(destination_parked.c.destination == self.name)
            ).scalar()
            return Status(
                name=self.name,
                cursor=cursor,
                pending=self._pending(conn, cursor),
                lag=None if oldest is None else max(0.0, time.time() - float(oldest)),
                last_success=None if row is None else row.last_success,
                parked=int(parked or 0),
                lease_owner=None if row is None else row.lease_owner,
                lease_until=None if row is None else row.lease_until,
            )

    def parked(self) -> list[Parked]:
        with self._connect() as conn:
            return [
                Parked(
                    id=row.id,
                    destination=row.destination,
                    kind=row.kind,
                    entity=row.entity,
                    version=row.version,
                    code=row.code,
                    message=row.message,
                    parked_at=row.parked_at,
                )
                for row in conn.execute(
                    select(destination_parked)
                    .where(destination_parked.c.destination == self.name)
                    .order_by(destination_parked.c.id)
                )
            ]

    def retry(self, ids: Iterable[int] | None) -> int:
        """Offer parked items again (all when ``ids`` is ``None``): each is unparked and
        logged as changed, so the next push sends it. Returns how many."""
        with self._begin() as conn:
            query = select(destination_parked).where(
                destination_parked.c.destination == self.name
            )
            if ids is not None:
                query = query.where(destination_parked.c.id.in_(list(ids)))
            rows = conn.execute(query).all()
            if not rows:
                return 0
            conn.execute(
                delete(destination_parked).where(
                    destination_parked.c.id.in_([r.id for r in rows])
                )
            )
            for row in rows:
                # Forget what was written, so an item whose state did not change goes too.
                conn.execute(
                    delete(destination_items).where(
                        and_(
                            destination_items.c.destination == self.name,
                            destination_items.c.kind == row.kind,
                            destination_items.c.entity == row.entity,
                        )
                    )
                )
            for row in rows:
                log_change(conn, row.kind, row.entity)
        self.backend_changed()
        return len(rows)

    def backend_changed(self) -> None:
        for hook in self.backend.commit_hooks:
            hook()


def registered(backend: SqlBackend) -> list[str]:
    """The names of the destinations the ledger keeps state for."""
    try:
        with backend.engine.connect() as conn:
            query = select(destinations.c.name).order_by(destinations.c.name)
            return [str(n) for n in conn.execute(query).scalars()]
    except sa_exc.SQLAlchemyError as exc:
        raise _translate(exc) from None


class _Guard:
    """A connection context whose database errors become our error tree."""

    def __init__(self, context: Any) -> None:
        self._context = context

    def __enter__(self) -> Connection:
        try:
            return self._context.__enter__()  # type: ignore[no-any-return]
        except sa_exc.SQLAlchemyError as exc:
            raise _translate(exc) from None

    def __exit__(self, kind: Any, value: Any, trace: Any) -> bool:
        try:
            suppressed = self._context.__exit__(kind, value, trace)
        except sa_exc.SQLAlchemyError as error:
            raise _translate(error) from None
        if isinstance(value, sa_exc.SQLAlchemyError):
            raise _translate(value) from None
        return bool(suppressed)
