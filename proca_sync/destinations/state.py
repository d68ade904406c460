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
import operator
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import orjson
from sqlalchemy import (
    ARRAY,
    Connection,
    String,
    Table,
    and_,
    any_,
    bindparam,
    delete,
    func,
    insert,
    select,
    text,
    update,
)
from sqlalchemy import exc as sa_exc

from proca_sync.crm.sql import SqlBackend
from proca_sync.crm.sql.changelog import log_change, scrub_propagated
from proca_sync.crm.sql.schema import (
    actions,
    campaigns,
    changes,
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

__all__ = ["LeaseLostError", "LedgerState", "Parked", "Plan", "Status", "address", "digest"]

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
    retirements: list[Erasure] = field(default_factory=list)
    campaigns: dict[str, CampaignView] = field(default_factory=dict)
    digests: dict[ItemKey, tuple[int, str]] = field(default_factory=dict)  # key → version, digest
    addresses: dict[str, tuple[int, str]] = field(default_factory=dict)
    """Contact id → (version, hash of the address it is pushed under), kept once written."""
    forgotten: list[str] = field(default_factory=list)
    """Merged-away contacts whose remote record is the merged contact's own: their
    records are dropped when the window is done (nothing to remove remotely)."""
    projections: dict[str, str] = field(default_factory=dict)
    """Campaign name → digest of what destinations project of it, kept once done."""
    first_at: float | None = None
    """When the window's oldest change was committed (for the lag)."""
    pending: int = 0
    """Changes after the cursor (or after ``after``) when the plan was read."""
    touched: set[int] = field(default_factory=set)
    """Every ledger contact id the window's changes led to (merged-away ones included)."""
    parked: bool = False
    """Something of this window was parked (set by the pusher)."""
    assumed: Mapping[tuple[str, str], str | None] = field(default_factory=dict)
    """Records taken as written though the ledger does not hold them yet (``None``:
    taken as gone): what the window being pushed will record, when this plan is read
    ahead of it (:meth:`assumptions`)."""

    def assumptions(self) -> dict[tuple[str, str], str | None]:
        """What this window records once every item is written: its contacts'
        addresses, the retired contacts' records gone, its campaigns' projections (for
        the plan of the next window, read while this one is pushed). Contact and action
        digests are not assumed: :meth:`without` drops what was actually written."""
        assumed: dict[tuple[str, str], str | None] = {}
        for ident in [str(r.tombstone_id) for r in self.retirements] + self.forgotten:
            assumed[("address", ident)] = None
            assumed[("contact", ident)] = None
        for ident, (_version, value) in self.addresses.items():
            assumed[("address", ident)] = value
        for name, value in self.projections.items():
            assumed[("campaign", name)] = value
        return assumed

    def phases(self, size: int) -> list[list[Batch]]:
        """The window's batches in the order they must go: the retirements first (an
        activity recorded under a retired address may be removed with it, and is then
        recorded again under the merged contact), then the contacts and erasures. The
        batches of one phase hold distinct contacts and may be in flight together."""
        retire = [
            Batch(erasures=self.retirements[start : start + size])
            for start in range(0, len(self.retirements), size)
        ]
        rest = list(self.batches(size))
        return [phase for phase in (retire, rest) if phase]

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

    def take(self, busy: set[int], size: int) -> list[Batch]:
        """Take out of the plan the batches of the contacts not in ``busy`` (with their
        actions), to push early; the plan keeps the rest (and its erasures)."""
        free = [c for c in self.contacts if c.contact_id not in busy]
        if not free:
            return []
        self.contacts = [c for c in self.contacts if c.contact_id in busy]
        taken = Plan(last_seq=self.last_seq, contacts=free, campaigns=self.campaigns)
        for contact in free:
            acts = self.actions.pop(contact.contact_id, None)
            if acts:
                taken.actions[contact.contact_id] = acts
        return list(taken.batches(size))

    def without(self, written: dict[ItemKey, str]) -> None:
        """Leave out what an earlier window wrote since this plan was read (the plan of
        the next window is read while the current one is pushed): items whose digest
        is the one just written."""
        if not written:
            return
        for cid, acts in list(self.actions.items()):
            kept = [a for a in acts if written.get(a.key) != self.digests[a.key][1]]
            if kept:
                self.actions[cid] = kept
            else:
                del self.actions[cid]
        self.contacts = [
            c
            for c in self.contacts
            if c.contact_id in self.actions or written.get(c.key) != self.digests[c.key][1]
        ]
        self.erasures = [e for e in self.erasures if e.key not in written]
        self.retirements = [r for r in self.retirements if r.key not in written]


_CONTACTS_SQL = text(
    "SELECT id, admitted, email, first_name, last_name, postcode, country, fields, real, "
    "opted_in, opt_in_at, email_status, email_status_changed, subscribed, updated_at "
    "FROM contacts WHERE id IN :ids"
).bindparams(bindparam("ids", expanding=True))
_KEYS_SQL = text(
    "SELECT contact_id, kind, value FROM contact_keys WHERE contact_id IN :ids"
).bindparams(bindparam("ids", expanding=True))
_LIVE_SQL = text("SELECT id FROM contacts WHERE id IN :ids").bindparams(
    bindparam("ids", expanding=True)
)
_CAMPAIGN_CONTACTS_SQL = text(
    "SELECT DISTINCT contact_id FROM actions WHERE campaign IN :names"
).bindparams(bindparam("names", expanding=True))
_MERGED_INTO_SQL = text(
    "SELECT entity FROM changes WHERE kind = 'merge' AND entity LIKE :prefix "
    "ORDER BY seq DESC LIMIT 1"
)
_MERGE_HOPS = 32
"""How many merges in a row :meth:`LedgerState._survivor` follows."""
_ACTIONS_SQL = text(
    "SELECT action_id, contact_id, action_type, campaign, created_at, testing, data "
    "FROM actions WHERE contact_id IN :ids ORDER BY created_at, action_id"
).bindparams(bindparam("ids", expanding=True))


def digest(value: Any) -> str:
    return hashlib.sha256(orjson.dumps(value, option=orjson.OPT_SORT_KEYS)).hexdigest()[:32]


def address(email: str) -> str:
    """What the ledger keeps of the address a contact was pushed under (a hash)."""
    return digest(["address", email])


def _projection(view: CampaignView) -> str:
    return digest([view.name, view.title, view.external_id])


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


def _insert_rows(conn: Connection, table: Table, rows: list[dict[str, Any]]) -> None:
    """Insert ``rows`` (dicts with the same keys, plain values: text, numbers) with the
    driver's own ``executemany``. SQLAlchemy's per-row parameter processing was a fifth
    of a large backfill's CPU (the pusher records every item it wrote); these columns
    need no conversion, so the statement is compiled once for the connection's dialect
    and the rows go to the driver as they are."""
    if not rows:
        return
    keys = list(rows[0])
    compiled = insert(table).compile(dialect=conn.dialect, column_keys=keys)
    params: list[Any]
    if compiled.positional:
        order = compiled.positiontup or []
        if len(order) == 1:
            params = [(row[order[0]],) for row in rows]
        else:
            params = list(map(operator.itemgetter(*order), rows))
    else:
        params = rows
    conn.exec_driver_sql(str(compiled), params)


def _delete_entities(
    conn: Connection, table: Table, destination: str, kind: str, entities: Sequence[str]
) -> None:
    """Delete the rows of ``table`` of these entities of one kind, by the driver: on
    PostgreSQL one statement with an array (an index lookup per entity), elsewhere one
    statement per entity through ``executemany`` (SQLite runs them in-process). An
    ``IN`` list built by SQLAlchemy cost more CPU than the deletes themselves."""
    if not entities:
        return
    if conn.dialect.name == "postgresql":
        one_of = table.c.entity == any_(bindparam("e", type_=ARRAY(String)))
        statement = _where_entity(table, one_of).compile(dialect=conn.dialect)
        conn.exec_driver_sql(str(statement), {"d": destination, "k": kind, "e": list(entities)})
    else:
        statement = _where_entity(table, table.c.entity == bindparam("e")).compile(
            dialect=conn.dialect
        )
        order = statement.positiontup or []
        values = {"d": destination, "k": kind}
        conn.exec_driver_sql(
            str(statement),
            [tuple(values.get(k, entity) for k in order) for entity in entities],
        )


def _where_entity(table: Table, entity: Any) -> Any:
    return delete(table).where(
        table.c.destination == bindparam("d"), table.c.kind == bindparam("k"), entity
    )


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
        self,
        *,
        limit: int,
        include_testing: bool,
        erasure: bool,
        after: int | None = None,
        assumed: Mapping[tuple[str, str], str | None] | None = None,
    ) -> Plan | None:
        """What the destination lacks of the next ``limit`` changes after its cursor (or
        after change ``after``); ``None`` when there are none. Contacts not admitted,
        without an e-mail or (unless ``include_testing``) testing are left out, as are
        testing actions; an entity whose digest equals the one last written is left out
        too. With ``erasure``, the plan also holds the erasures, and the retirements:
        the address a contact was pushed under when that contact was merged away or its
        address changed (unless the address is the merged contact's own). A changed
        campaign the destination had already received offers its contacts again.
        ``assumed`` records are taken as written (see :attr:`Plan.assumed`)."""
        with self._connect() as conn:
            cursor = self._cursor(conn) if after is None else after
            rows = conn.execute(
                select(changes.c.seq, changes.c.kind, changes.c.entity, changes.c.at)
                .where(changes.c.seq > cursor)
                .order_by(changes.c.seq)
                .limit(limit)
            ).all()
            if not rows:
                return None
            plan = Plan(
                last_seq=int(rows[-1].seq),
                first_at=float(rows[0].at),
                pending=self._pending(conn, cursor),
                assumed=assumed or {},
            )
            contact_seq: dict[int, int] = {}
            action_seq: dict[int, int] = {}
            erasure_seq: dict[int, int] = {}
            campaign_seq: dict[str, int] = {}
            merged: dict[int, tuple[int, int]] = {}  # other → (seq, survivor)
            retired: dict[int, int] = {}  # a parked retirement offered again
            for seq, kind, entity, _at in rows:
                if kind == "contact":
                    contact_seq[int(entity)] = seq
                elif kind == "action":
                    action_seq[int(entity)] = seq
                elif kind == "erasure":
                    erasure_seq[int(entity)] = seq
                elif kind == "campaign":
                    campaign_seq[entity] = seq
                elif kind == "merge":
                    other, _, survivor = entity.partition(":")
                    merged[int(other)] = (seq, int(survivor))
                elif kind == "retired":
                    retired[int(entity)] = seq
            # Actions lead to their (current) contacts.
            for chunk in _chunks(list(action_seq)):
                for action_id, contact_id in conn.execute(
                    select(actions.c.action_id, actions.c.contact_id).where(
                        actions.c.action_id.in_(chunk)
                    )
                ):
                    seq = action_seq[int(action_id)]
                    contact_seq[contact_id] = max(contact_seq.get(contact_id, 0), seq)
            forced: set[int] = set()
            if campaign_seq:
                forced = self._campaign_contacts(conn, plan, campaign_seq, contact_seq)
            rehome: set[int] = set()
            retiring: dict[int, tuple[int, int, str]] = {}  # other → (seq, survivor, hash)
            if erasure and (merged or retired):
                retiring = self._merged(conn, plan, merged, retired, contact_seq)
                for _seq, survivor, _hash in retiring.values():
                    rehome.add(survivor)
            plan.touched = set(contact_seq) | set(merged) | set(retired)
            self._load_contacts(
                conn, plan, contact_seq, action_seq, include_testing,
                retiring=retiring, rehome=rehome, forced=forced, retire=erasure,
            )
            if erasure and erasure_seq:
                self._load_erasures(conn, plan, erasure_seq)
            return plan

    def _campaign_contacts(
        self,
        conn: Connection,
        plan: Plan,
        campaign_seq: dict[str, int],
        contact_seq: dict[int, int],
    ) -> set[int]:
        """Offer again the contacts of each changed campaign whose projection (title,
        external id) differs from the one last pushed; a campaign the destination never
        had goes out with its contacts' own changes."""
        names = sorted(campaign_seq)
        known = self._known(conn, "campaign", names, plan)
        changed: list[str] = []
        for chunk in _chunks(names):
            for row in conn.execute(select(campaigns).where(campaigns.c.name.in_(chunk))):
                view = CampaignView(name=row.name, title=row.title, external_id=row.external_id)
                value = _projection(view)
                plan.projections[row.name] = value
                if row.name in known and known[row.name] != value:
                    changed.append(row.name)
        forced: set[int] = set()
        for chunk in _chunks(changed):
            seq = max(campaign_seq[n] for n in chunk)
            for (cid,) in conn.execute(_CAMPAIGN_CONTACTS_SQL, {"names": list(chunk)}):
                contact_seq[cid] = max(contact_seq.get(cid, 0), seq)
                forced.add(cid)
        return forced

    def _merged(
        self,
        conn: Connection,
        plan: Plan,
        merged: dict[int, tuple[int, int]],
        retired: dict[int, int],
        contact_seq: dict[int, int],
    ) -> dict[int, tuple[int, int, str]]:
        """The merged-away contacts this destination has an address of → (change
        number, the contact they live on in, that address's hash). Their survivors join
        the plan."""
        ids = sorted(set(merged) | set(retired))
        known = self._known(conn, "address", [str(i) for i in ids], plan)
        out: dict[int, tuple[int, int, str]] = {}
        for other in ids:
            value = known.get(str(other))
            if value is None:
                continue  # never pushed here (or before addresses were kept)
            seq, survivor = merged.get(other, (retired.get(other, 0), other))
            live = self._survivor(conn, survivor)
            if live is None:
                continue  # erased since: the erasure removes the person
            seq = max(seq, retired.get(other, 0))
            if live == other:
                contact_seq[other] = max(contact_seq.get(other, 0), seq)
                continue  # a live contact's retirement: found by _load_contacts
            out[other] = (seq, live, value)
            contact_seq[live] = max(contact_seq.get(live, 0), seq)
        return out

    def _survivor(self, conn: Connection, cid: int) -> int | None:
        """The contact ``cid`` lives on in (itself while it exists), following merges."""
        for _ in range(_MERGE_HOPS):
            if conn.execute(_LIVE_SQL, {"ids": [cid]}).first() is not None:
                return cid
            entity = conn.execute(_MERGED_INTO_SQL, {"prefix": f"{cid}:%"}).scalar()
            if entity is None:
                return None
            cid = int(str(entity).partition(":")[2])
        return None

    def _known(
        self, conn: Connection, kind: str, entities: Sequence[str], plan: Plan
    ) -> dict[str, str]:
        """The digests last written of these entities (with what ``plan`` assumes)."""
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
        if plan.assumed:
            for entity in entities:
                if (kind, entity) in plan.assumed:
                    value = plan.assumed[(kind, entity)]
                    if value is None:
                        known.pop(entity, None)
                    else:
                        known[entity] = value
        return known

    def _load_contacts(
        self,
        conn: Connection,
        plan: Plan,
        contact_seq: dict[int, int],
        action_seq: dict[int, int],
        include_testing: bool,
        *,
        retiring: dict[int, tuple[int, int, str]],
        rehome: set[int],
        forced: set[int],
        retire: bool,
    ) -> None:
        ids = sorted(contact_seq)
        rows: dict[int, Any] = {}
        refs: dict[int, list[str]] = {}
        emails: dict[int, list[str]] = {}
        acts: dict[int, list[Any]] = {}
        for chunk in _chunks(ids):
            # Plain text statements: rows without SQLAlchemy's per-value processing (the
            # JSON columns are decoded by orjson in _json).
            for row in conn.execute(_CONTACTS_SQL, {"ids": list(chunk)}):
                rows[row.id] = row
            for cid, kind, value in conn.execute(_KEYS_SQL, {"ids": list(chunk)}):
                (refs if kind == "ref" else emails).setdefault(cid, []).append(value)
            for row in conn.execute(_ACTIONS_SQL, {"ids": list(chunk)}):
                acts.setdefault(row.contact_id, []).append(row)
        eligible = [
            cid
            for cid in ids
            if cid in rows
            and rows[cid].admitted
            and rows[cid].email
            and (include_testing or rows[cid].real)
        ]
        known_contacts = self._known(conn, "contact", [str(c) for c in eligible], plan)
        known_addresses = self._known(conn, "address", [str(c) for c in eligible], plan)
        pushable = set(eligible)
        retired: set[str] = set()

        def retirement(cid: int, version: int, hashed: str, owner: int) -> None:
            """Retire the address of ``cid`` with this hash: one of ``owner``'s keys."""
            email = next((e for e in emails.get(owner, []) if address(e) == hashed), None)
            if email is None or email in retired:
                return  # not the person's any more (erased meanwhile), or retired already
            retired.add(email)
            view = Erasure(tombstone_id=cid, email=email, refs=(), retired=True)
            plan.retirements.append(view)
            plan.digests[view.key] = (version, "retired")
            rehome.add(owner)

        for other, (seq, survivor, hashed) in sorted(retiring.items()):
            found = rows.get(survivor)
            if survivor in pushable and found is not None and address(found.email) == hashed:
                plan.forgotten.append(str(other))  # the same remote record as the survivor's
            else:
                retirement(other, seq, hashed, survivor)
        if retire:
            for cid in eligible:
                pushed = known_addresses.get(str(cid))
                if pushed is not None and pushed != address(rows[cid].email):
                    retirement(cid, contact_seq[cid], pushed, cid)
        action_ids = [str(a.action_id) for c in eligible for a in acts.get(c, [])]
        known_actions = self._known(conn, "action", action_ids, plan)
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
                if cid in rehome or known_actions.get(str(view.action_id)) != value:
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
            if known_contacts.get(str(cid)) == value and not lacking and cid not in forced:
                continue
            plan.contacts.append(contact)
            plan.digests[contact.key] = (version, value)
            plan.addresses[str(cid)] = (version, address(contact.email))
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
        known = self._known(conn, "erasure", [str(i) for i in ids], plan)
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
        addresses: dict[str, tuple[int, str]] | None = None,
    ) -> None:
        """Items written (version, digest) and items refused for good (version, code,
        message), in one transaction under the lease; ``addresses`` (contact id →
        version, address hash) of the contacts written. A retirement done forgets the
        retired contact's records (nothing is kept of it)."""
        if not done and not parked:
            return
        with self._begin() as conn:
            self._fence(conn, owner)
            by_kind: dict[str, list[str]] = {}
            for item_kind, entity in [*done, *parked]:
                by_kind.setdefault(item_kind, []).append(entity)
            retired = [entity for kind, entity in done if kind == "retired"]
            for kind in ("contact", "address"):
                by_kind.setdefault(kind, []).extend(retired)
            if addresses:
                by_kind.setdefault("address", []).extend(addresses)
            # Per kind, so that the primary key (destination, kind, entity) finds the rows.
            for kind, entities in by_kind.items():
                for table in (destination_items, destination_parked):
                    _delete_entities(conn, table, self.name, kind, entities)
            rows = [
                {
                    "destination": self.name,
                    "kind": kind,
                    "entity": entity,
                    "version": version,
                    "digest": value,
                }
                for (kind, entity), (version, value) in done.items()
                if kind != "retired"
            ]
            rows += [
                {
                    "destination": self.name,
                    "kind": "address",
                    "entity": entity,
                    "version": version,
                    "digest": value,
                }
                for entity, (version, value) in (addresses or {}).items()
            ]
            if rows:
                _insert_rows(conn, destination_items, rows)
            if parked:
                now = time.time()
                _insert_rows(
                    conn,
                    destination_parked,
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

    def advance(
        self,
        owner: str,
        seq: int,
        *,
        forgotten: Sequence[str] = (),
        projections: dict[str, str] | None = None,
    ) -> None:
        """Move the cursor to ``seq`` (everything up to it done or parked); drop the
        records of the ``forgotten`` merged-away contacts and keep the campaigns'
        ``projections`` (name → digest) the window pushed."""
        with self._begin() as conn:
            cursor = self._fence(conn, owner)
            if seq > cursor:
                conn.execute(
                    update(destinations)
                    .where(destinations.c.name == self.name)
                    .values(cursor=seq, last_success=time.time())
                )
            for kind, entities in (
                ("contact", list(forgotten)),
                ("address", list(forgotten)),
                ("campaign", sorted(projections or {})),
            ):
                for chunk in _chunks(entities):
                    conn.execute(
                        delete(destination_items).where(
                            destination_items.c.destination == self.name,
                            destination_items.c.kind == kind,
                            destination_items.c.entity.in_(chunk),
                        )
                    )
            if projections:
                _insert_rows(
                    conn,
                    destination_items,
                    [
                        {
                            "destination": self.name,
                            "kind": "campaign",
                            "entity": name,
                            "version": seq,
                            "digest": value,
                        }
                        for name, value in projections.items()
                    ],
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
