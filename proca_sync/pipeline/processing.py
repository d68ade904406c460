"""Action processing: the state machine of processing.md §4, run with store-before-publish.

:func:`decide` is the transition table, pure. :class:`Processor` applies it inside the
caller's database transaction: it changes the statuses, ranks duplicates (§5) and writes
every message to emit into the ``outbox`` table **in the same transaction**, so a status
change and its message are committed together or not at all
(:mod:`proca_sync.pipeline.outbox` publishes them afterwards). Running it again on an
unchanged action does nothing (§2).

It also holds the other state changes that emit messages: supporter confirmation and
double opt-in (§7), moderation of single actions (which the Proca server lacks, §13),
bounces and complaints (§10) and campaign updates (§12).

Nothing here logs personal data; errors carry ids only.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any

import orjson
from sqlalchemy import Connection, bindparam, func, insert, select, update

from proca_sync.crypto import b64encode
from proca_sync.pipeline.instance import InstanceSecrets
from proca_sync.pipeline.producers import (
    CampaignInfo,
    Consent,
    ContactData,
    Encryption,
    NonceCounter,
    OrgInfo,
    PageInfo,
    PrivacyData,
    StageName,
    action_route,
    build_action,
    build_campaign_updated,
    build_email_status_event,
    event_route,
)
from proca_sync.pipeline.state import (
    ActionStatus,
    EmailStatusValue,
    SupporterStatus,
    actions,
    campaigns,
    contacts,
    moderations,
    org_keys,
    orgs,
    outbox,
    pages,
    supporters,
)

__all__ = [
    "Emit",
    "LinkOutcome",
    "Processor",
    "Settings",
    "Transition",
    "contact_ref",
    "decide",
    "effective_settings",
]


class Emit(StrEnum):
    SUPPORTER_CONFIRM = "supporter_confirm"
    ACTION_CONFIRM = "action_confirm"
    DELIVER = "deliver"


@dataclass(frozen=True)
class Settings:
    """Effective confirmation settings of an action (processing.md §3)."""

    supporter_confirm: bool
    action_confirm: bool


@dataclass(frozen=True)
class Transition:
    action: ActionStatus | None = None
    supporter: SupporterStatus | None = None
    emit: Emit | None = None

    @property
    def changes(self) -> bool:
        return self.action is not None or self.supporter is not None


NOTHING = Transition()
A, S = ActionStatus, SupporterStatus


def decide(
    action: ActionStatus,
    supporter: SupporterStatus | None,
    *,
    with_consent: bool,
    settings: Settings,
) -> Transition:
    """The transition table of processing.md §4 (first matching row wins).

    ``supporter`` is ``None`` for an action not linked to a supporter yet (row 2). A
    transition with ``action == DELIVERED`` may still become ``REPEAT`` (§5, the caller
    ranks duplicates).
    """
    if action in (A.DELIVERED, A.REPEAT):  # rows 1, 10, 11
        return NOTHING
    if supporter is None:  # row 2
        return NOTHING
    if action == A.NEW and supporter == S.NEW:  # rows 3, 3b, 3c
        if settings.supporter_confirm:
            return Transition(A.NEW, S.CONFIRMING, Emit.SUPPORTER_CONFIRM)
        if settings.action_confirm:
            return Transition(A.CONFIRMING, S.ACCEPTED, Emit.ACTION_CONFIRM)
        return Transition(A.DELIVERED, S.ACCEPTED, Emit.DELIVER)
    if action == A.NEW and supporter == S.CONFIRMING:  # row 4
        return NOTHING
    if action in (A.NEW, A.REJECTED) and supporter == S.REJECTED:  # row 5
        return Transition(A.REJECTED, S.REJECTED) if action != A.REJECTED else NOTHING
    if supporter == S.ACCEPTED:
        if action == A.NEW and with_consent and settings.action_confirm:  # row 6
            return Transition(A.CONFIRMING, S.ACCEPTED, Emit.ACTION_CONFIRM)
        if action in (A.CONFIRMING, A.REJECTED):  # rows 7, 8
            return NOTHING
        if action in (A.NEW, A.ACCEPTED):  # row 9
            return Transition(A.DELIVERED, S.ACCEPTED, Emit.DELIVER)
    return NOTHING


def effective_settings(campaign: Mapping[str, Any], owner: Mapping[str, Any]) -> Settings:
    """Campaign values win; unset (``None``) falls back to the page owner's org flags."""
    supporter_confirm = campaign["supporter_confirm"]
    if supporter_confirm is None:
        supporter_confirm = bool(owner["supporter_confirm"] or owner["custom_supporter_confirm"])
    action_confirm = campaign["action_confirm"]
    if action_confirm is None:
        action_confirm = bool(owner["custom_action_confirm"])
    return Settings(bool(supporter_confirm), bool(action_confirm))


def contact_ref(seed: bytes, identity: str) -> str:
    """SHA-256 over seed + identity, base64url without padding (messages.md §2.7.1)."""
    return b64encode(hashlib.sha256(seed + identity.encode("utf-8")).digest())


def aware(moment: datetime) -> datetime:
    """SQLite hands timestamps back naive; they were stored in UTC."""
    return moment if moment.tzinfo is not None else moment.replace(tzinfo=UTC)


class LinkOutcome(StrEnum):
    OK = "ok"
    NOT_FOUND = "not_found"  # action id and ref do not match
    NOT_ALLOWED = "not_allowed"  # supporter new or rejected


@dataclass(frozen=True)
class Recipient:
    """One org that gets a contact record (processing.md §6)."""

    org_id: int
    opt_in: bool | None
    delivery: bool


def recipients(
    *,
    page_org: int,
    lead_org: int,
    page_delivery: bool,
    force_delivery: bool,
    opt_in: bool | None,
    lead_opt_in: bool | None,
) -> list[Recipient]:
    """Who receives the data of a page owned by ``page_org`` in ``lead_org``'s campaign."""
    if page_org == lead_org:
        return [Recipient(page_org, opt_in, True)]
    out: list[Recipient] = []
    if page_delivery or opt_in is True:
        out.append(Recipient(page_org, opt_in, page_delivery))
    lead_delivers = (not page_delivery) or force_delivery
    if lead_delivers or lead_opt_in is True:
        out.append(Recipient(lead_org, lead_opt_in, lead_delivers))
    return out


Row = dict[str, Any]

# Hot-path statements built once: SQLAlchemy then reuses their compiled form, which is
# most of the cost of a statement (see BENCHMARKS.md, pipeline intake).
SET_ACTION_STATUS = (
    update(actions).where(actions.c.id == bindparam("b_id")).values(status=bindparam("b_status"))
)
SET_SUPPORTER_STATUS = (
    update(supporters)
    .where(supporters.c.id == bindparam("b_id"))
    .values(status=bindparam("b_status"), dupe_rank=bindparam("b_rank"))
)
SET_SUPPORTER_STATUS_CLEAR = SET_SUPPORTER_STATUS.values(email=None)
EARLIER_ACCEPTED = select(supporters.c.page_id).where(
    supporters.c.contact_ref == bindparam("b_ref"),
    supporters.c.campaign_id == bindparam("b_campaign"),
    supporters.c.status == str(SupporterStatus.ACCEPTED),
    supporters.c.id < bindparam("b_id"),
)
WAITING_ACTIONS = (
    select(actions.c.id)
    .join(pages, pages.c.id == actions.c.page_id)
    .where(
        actions.c.contact_ref == bindparam("b_ref"),
        actions.c.supporter_id.is_(None),
        pages.c.org_id == bindparam("b_org"),
    )
    .order_by(actions.c.id)
)
INSERT_OUTBOX = insert(outbox)


@dataclass
class _Ctx:
    """One action with its supporter, page, campaign and page owner, as plain dicts (the
    processing updates them in place so messages show the new statuses)."""

    action: Row
    supporter: Row | None
    page: Row
    campaign: Row
    owner: Row
    contacts: list[Row] | None = None


class Catalog:
    """Orgs, campaigns, pages and active keys, cached in memory for ``ttl`` seconds.

    They change rarely (CLI, management API) and every action needs them; a change made
    by another process is seen within ``ttl``, one made through :meth:`invalidate` at once.
    """

    def __init__(self, ttl: float = 1.0) -> None:
        self._ttl = ttl
        self._loaded = -1e9
        self.orgs: dict[int, Row] = {}
        self.campaigns: dict[int, Row] = {}
        self.pages: dict[int, Row] = {}
        self.keys: dict[int, Row] = {}

    def invalidate(self) -> None:
        self._loaded = -1e9

    def fresh(self, conn: Connection, *, force: bool = False) -> Catalog:
        if force or time.monotonic() - self._loaded > self._ttl:
            self.orgs = {int(r["id"]): dict(r) for r in conn.execute(select(orgs)).mappings()}
            self.campaigns = {
                int(r["id"]): dict(r) for r in conn.execute(select(campaigns)).mappings()
            }
            self.pages = {int(r["id"]): dict(r) for r in conn.execute(select(pages)).mappings()}
            keys: dict[int, Row] = {}
            query = select(org_keys).where(org_keys.c.active.is_(True)).order_by(org_keys.c.id)
            for row in conn.execute(query).mappings():
                keys[int(row["org_id"])] = dict(row)
            self.keys = keys
            self._loaded = time.monotonic()
        return self

    def page(self, conn: Connection, page_id: int) -> Row | None:
        """The page (reloading once on a miss: it may have been created a moment ago)."""
        page = self.fresh(conn).pages.get(page_id)
        if page is None:
            page = self.fresh(conn, force=True).pages.get(page_id)
        return page


class Processor:
    """Applies the state machine and the other message-emitting changes in a transaction.

    Every method takes an open connection inside a transaction (``engine.begin()``) and
    returns the number of outbox rows it wrote; the caller commits.
    """

    def __init__(
        self,
        instance: InstanceSecrets,
        *,
        nonces: NonceCounter | None = None,
        catalog: Catalog | None = None,
    ) -> None:
        self._instance = instance
        self._nonces = nonces or NonceCounter()
        self.catalog = catalog or Catalog()
        # Whether unlinked follow-up actions may exist (None: not checked yet). This
        # process is the only writer of actions (one pipeline per database).
        self._unlinked: bool | None = None

    def note_unlinked(self) -> None:
        """A follow-up action was stored without a supporter."""
        self._unlinked = True

    # ---- sealing -------------------------------------------------------------------------

    def seal_for(
        self, conn: Connection, org_id: int, record: Mapping[str, Any]
    ) -> dict[str, Any] | None:
        """The ``personalInfo`` of ``record`` for ``org_id``'s active key, or ``None``."""
        key = self.catalog.fresh(conn).keys.get(org_id)
        if key is None:
            return None
        encryption = Encryption(
            recipient_public=key["public"],
            sender=self._instance.instance_key,
            nonces=self._nonces,
            recipient_key_id=int(key["id"]),
            sender_key_id=self._instance.instance_key_id,
        )
        return encryption.seal(record)

    def contact_ref(self, identity: str) -> str:
        return contact_ref(self._instance.seed, identity)

    # ---- loading -------------------------------------------------------------------------

    def context(self, conn: Connection, action: Row, supporter: Row | None) -> _Ctx:
        """A context from rows the caller already holds (the intake's fast path)."""
        catalog = self.catalog.fresh(conn)
        page = catalog.page(conn, int(action["page_id"]))
        assert page is not None
        campaign = catalog.campaigns[int(action["campaign_id"])]
        owner = catalog.orgs[int(page["org_id"])]
        return _Ctx(action, supporter, page, campaign, owner)

    def _ctx(self, conn: Connection, action_id: int) -> _Ctx | None:
        action = conn.execute(select(actions).where(actions.c.id == action_id)).mappings().first()
        if action is None:
            return None
        supporter = None
        if action["supporter_id"] is not None:
            row = (
                conn.execute(select(supporters).where(supporters.c.id == action["supporter_id"]))
                .mappings()
                .first()
            )
            supporter = None if row is None else dict(row)
        return self.context(conn, dict(action), supporter)

    # ---- the state machine ---------------------------------------------------------------

    def process(
        self, conn: Connection, action_id: int, now: datetime, *, ctx: _Ctx | None = None
    ) -> int:
        """Run §4 once for ``action_id``; write its statuses and messages (same transaction).

        ``ctx`` saves the reads when the caller has just written the rows itself.
        """
        ctx = ctx or self._ctx(conn, action_id)
        if ctx is None:
            return 0
        supporter = ctx.supporter
        transition = decide(
            ActionStatus(ctx.action["status"]),
            None if supporter is None else SupporterStatus(supporter["status"]),
            with_consent=bool(ctx.action["with_consent"]),
            settings=effective_settings(ctx.campaign, ctx.owner),
        )
        if not transition.changes or supporter is None:
            return 0
        new_action = transition.action
        if transition.emit is not None:
            rank, same_page = self._rank(conn, supporter)
            supporter["dupe_rank"] = rank
            if new_action == A.DELIVERED and rank > 0 and same_page:
                new_action = A.REPEAT
        old_action = ctx.action["status"]
        if new_action is not None:
            ctx.action["status"] = str(new_action)
        if transition.supporter is not None:
            supporter["status"] = str(transition.supporter)
        written = 0
        clear_email = False
        if transition.emit == Emit.DELIVER:
            for contact in self._contacts(conn, ctx):
                written += self._emit_action(conn, ctx, "deliver", int(contact["org_id"]), now)
            # processing.md §9: the clear e-mail is not needed after delivery.
            clear_email = not ctx.owner["high_security"] and supporter["email"] is not None
        elif transition.emit is not None:
            stage: StageName = (
                "supporter_confirm"
                if transition.emit == Emit.SUPPORTER_CONFIRM
                else "action_confirm"
            )
            written += self._emit_action(conn, ctx, stage, int(ctx.page["org_id"]), now)
        if ctx.action["status"] != old_action:
            conn.execute(SET_ACTION_STATUS, {"b_id": action_id, "b_status": ctx.action["status"]})
        if clear_email:
            supporter["email"] = None
        conn.execute(
            SET_SUPPORTER_STATUS_CLEAR if clear_email else SET_SUPPORTER_STATUS,
            {
                "b_id": supporter["id"],
                "b_status": supporter["status"],
                "b_rank": supporter["dupe_rank"],
            },
        )
        return written

    def _rank(self, conn: Connection, supporter: Row) -> tuple[int, bool]:
        earlier = conn.execute(
            EARLIER_ACCEPTED,
            {
                "b_ref": supporter["contact_ref"],
                "b_campaign": supporter["campaign_id"],
                "b_id": supporter["id"],
            },
        ).all()
        return len(earlier), any(row.page_id == supporter["page_id"] for row in earlier)

    def _contacts(self, conn: Connection, ctx: _Ctx) -> list[Row]:
        if ctx.contacts is None:
            assert ctx.supporter is not None
            ctx.contacts = [
                dict(row)
                for row in conn.execute(
                    select(contacts)
                    .where(contacts.c.supporter_id == ctx.supporter["id"])
                    .order_by(contacts.c.id)
                ).mappings()
            ]
        return ctx.contacts

    # ---- message construction -----------------------------------------------------------

    def _layer1(self, ctx: _Ctx, contact: Row | None) -> ContactData:
        supporter = ctx.supporter
        assert supporter is not None
        record = contact["record"] if contact is not None and contact["record"] else {}
        return ContactData(
            contact_ref=supporter["contact_ref"],
            record=record,
            dupe_rank=supporter["dupe_rank"],
            first_name=supporter["first_name"],
            email=supporter["email"],
            area=supporter["area"],
        )

    def _privacy(self, ctx: _Ctx, contact: Row | None, *, with_consent: bool) -> PrivacyData:
        supporter = ctx.supporter
        assert supporter is not None
        changed = supporter["email_status_changed"]
        return PrivacyData(
            consent=None
            if contact is None
            else Consent(contact["opt_in"], aware(contact["created_at"])),
            with_consent=with_consent and contact is not None,
            email_status=supporter["email_status"],
            email_status_changed=None if changed is None else aware(changed),
        )

    @staticmethod
    def _infos(ctx: _Ctx, owner: Row) -> tuple[PageInfo, CampaignInfo, OrgInfo]:
        page, campaign = ctx.page, ctx.campaign
        template = page["supporter_confirm_template"]
        return (
            PageInfo(
                id=int(page["id"]),
                name=page["name"],
                locale=page["locale"],
                thank_you_template=page["thank_you_template"],
                supporter_confirm_template=template,
            ),
            CampaignInfo(
                id=int(campaign["id"]),
                name=campaign["name"],
                title=campaign["title"],
                external_id=campaign["external_id"],
                contact_schema=campaign["contact_schema"],
            ),
            OrgInfo(id=int(owner["id"]), name=owner["name"], title=owner["title"]),
        )

    def _contact_of(self, conn: Connection, ctx: _Ctx, org_id: int) -> Row | None:
        for contact in self._contacts(conn, ctx):
            if int(contact["org_id"]) == org_id:
                return contact
        return None

    def action_message(
        self, conn: Connection, ctx: _Ctx, stage: StageName, org_id: int
    ) -> dict[str, Any]:
        """The ``proca:action:2`` message of ``ctx`` as built for receiving org ``org_id``."""
        assert ctx.supporter is not None
        contact = self._contact_of(conn, ctx, org_id)
        page, campaign, org = self._infos(ctx, ctx.owner)
        layer1 = self._layer1(ctx, contact)
        if ctx.owner["high_security"]:
            layer1 = ContactData(
                contact_ref=layer1.contact_ref,
                record=layer1.record,
                dupe_rank=layer1.dupe_rank,
                area=layer1.area,
            )
        action = ctx.action
        message = build_action(
            stage=stage,
            action_id=int(action["id"]),
            action_type=action["action_type"],
            created_at=aware(action["created_at"]),
            page=page,
            campaign=campaign,
            org=org,
            contact=layer1,
            privacy=self._privacy(ctx, contact, with_consent=bool(action["with_consent"])),
            custom_fields=action["custom_fields"],
            testing=bool(action["testing"]),
        )
        if action["donation"] is not None:
            message["action"]["donation"] = action["donation"]
        message["tracking"] = action["tracking"]
        if contact is not None and contact["personal_info"] is not None:
            message["personalInfo"] = contact["personal_info"]
        return message

    def _emit_action(
        self, conn: Connection, ctx: _Ctx, stage: StageName, org_id: int, now: datetime
    ) -> int:
        message = self.action_message(conn, ctx, stage, org_id)
        route = action_route(
            org_id,
            stage,
            ctx.action["action_type"],
            ctx.campaign["name"],
        )
        self._enqueue(conn, route.exchange, route.routing_key, message, int(ctx.action["id"]), now)
        return 1

    @staticmethod
    def _enqueue(
        conn: Connection,
        exchange: str,
        routing_key: str,
        message: Mapping[str, Any],
        action_id: int | None,
        now: datetime,
    ) -> None:
        conn.execute(
            INSERT_OUTBOX,
            {
                "exchange": exchange,
                "routing_key": routing_key,
                "body": orjson.dumps(dict(message)),
                "action_id": action_id,
                "created_at": now,
            },
        )

    # ---- e-mail status and events --------------------------------------------------------

    def _set_email_status(
        self,
        conn: Connection,
        action_id: int,
        status: EmailStatusValue,
        now: datetime,
        *,
        always_emit: bool,
    ) -> int:
        ctx = self._ctx(conn, action_id)
        if ctx is None or ctx.supporter is None:
            return 0
        changed = ctx.supporter["email_status"] != str(status)
        if changed:
            conn.execute(
                update(supporters)
                .where(supporters.c.id == ctx.supporter["id"])
                .values(email_status=str(status), email_status_changed=now)
            )
        if not (changed or always_emit):
            return 0
        fresh = self._ctx(conn, action_id)
        assert fresh is not None
        assert fresh.supporter is not None
        written = 0
        for contact in self._contacts(conn, fresh):
            event = self.email_status_event(fresh, contact)
            route = event_route(int(contact["org_id"]), event)
            self._enqueue(conn, route.exchange, route.routing_key, event, action_id, now)
            written += 1
        return written

    def email_status_event(self, ctx: _Ctx, contact: Row) -> dict[str, Any]:
        """An ``email_status`` event (messages.md §6.1) for the org of ``contact``."""
        supporter = ctx.supporter
        assert supporter is not None
        page, campaign, _org = self._infos(ctx, ctx.owner)
        action = ctx.action
        layer1 = self._layer1(ctx, contact)
        if ctx.owner["high_security"]:
            layer1 = ContactData(
                contact_ref=layer1.contact_ref,
                record=layer1.record,
                dupe_rank=layer1.dupe_rank,
                area=layer1.area,
            )
        changed = supporter["email_status_changed"]
        event = build_email_status_event(
            timestamp=aware(changed) if changed is not None else aware(action["created_at"]),
            contact=layer1,
            privacy=self._privacy(ctx, contact, with_consent=False),
            action_id=int(action["id"]),
            action_type=action["action_type"],
            created_at=aware(action["created_at"]),
            custom_fields=action["custom_fields"],
            testing=bool(action["testing"]),
            page=page,
            campaign=campaign,
        )
        event["tracking"] = action["tracking"]
        event["supporter"]["personalInfo"] = contact["personal_info"]
        return event

    # ---- links and moderation (processing.md §7, §10) ------------------------------------

    def _linked(self, conn: Connection, action_id: int, ref: str) -> _Ctx | None:
        ctx = self._ctx(conn, action_id)
        if ctx is None or ctx.supporter is None or ctx.supporter["contact_ref"] != ref:
            return None
        return ctx

    def double_opt_in(
        self, conn: Connection, action_id: int, ref: str, now: datetime
    ) -> LinkOutcome:
        """``/link/d/ID/REF``: e-mail status ``double_opt_in``; an event on every click."""
        if self._linked(conn, action_id, ref) is None:
            return LinkOutcome.NOT_FOUND
        self._set_email_status(
            conn, action_id, EmailStatusValue.DOUBLE_OPT_IN, now, always_emit=True
        )
        return LinkOutcome.OK

    def confirm_supporter(
        self,
        conn: Connection,
        action_id: int,
        ref: str,
        *,
        accept: bool,
        doi: bool,
        now: datetime,
    ) -> LinkOutcome:
        """``/link/s/ID/accept|reject/REF`` (processing.md §7)."""
        ctx = self._linked(conn, action_id, ref)
        if ctx is None:
            return LinkOutcome.NOT_FOUND
        assert ctx.supporter is not None
        status = SupporterStatus(ctx.supporter["status"])
        if accept and status in (S.NEW, S.REJECTED):
            return LinkOutcome.NOT_ALLOWED
        if doi:
            self._set_email_status(
                conn, action_id, EmailStatusValue.DOUBLE_OPT_IN, now, always_emit=True
            )
        supporter_id = int(ctx.supporter["id"])
        if accept:
            if status == S.CONFIRMING:
                conn.execute(
                    update(supporters)
                    .where(supporters.c.id == supporter_id)
                    .values(status=str(S.ACCEPTED))
                )
                self.process(conn, action_id, now)
                # The sweep's job (§2), done at once: the supporter's other waiting actions.
                for other in self._pending(conn, supporter_id, exclude=action_id):
                    self.process(conn, other, now)
            return LinkOutcome.OK
        self.reject(conn, action_id, now)
        refreshed = self._ctx(conn, action_id)
        assert refreshed is not None
        assert refreshed.supporter is not None
        if refreshed.supporter["email_status"] == str(EmailStatusValue.DOUBLE_OPT_IN):
            self._set_email_status(conn, action_id, EmailStatusValue.UNSUB, now, always_emit=False)
        return LinkOutcome.OK

    def reject(self, conn: Connection, action_id: int, now: datetime) -> None:
        """Supporter and this action → ``rejected`` (even when already delivered)."""
        ctx = self._ctx(conn, action_id)
        if ctx is None or ctx.supporter is None:
            return
        conn.execute(
            update(actions).where(actions.c.id == action_id).values(status=str(A.REJECTED))
        )
        conn.execute(
            update(supporters)
            .where(supporters.c.id == ctx.supporter["id"])
            .values(status=str(S.REJECTED))
        )
        for other in self._pending(conn, int(ctx.supporter["id"]), exclude=action_id):
            self.process(conn, other, now)  # row 5

    def _pending(self, conn: Connection, supporter_id: int, *, exclude: int) -> list[int]:
        rows = conn.execute(
            select(actions.c.id)
            .where(
                actions.c.supporter_id == supporter_id,
                actions.c.id != exclude,
                actions.c.status.in_([str(A.NEW), str(A.ACCEPTED)]),
            )
            .order_by(actions.c.id)
        ).all()
        return [int(row.id) for row in rows]

    def moderate(
        self,
        conn: Connection,
        action_id: int,
        *,
        accept: bool,
        now: datetime,
        by: str = "api",
    ) -> ActionStatus | None:
        """Accept or reject one action waiting in moderation (``confirming``).

        Accepting moves it to ``accepted`` and processes it (row 9 → delivered); rejecting
        makes it ``rejected`` (row 8: never delivered). The decision is recorded in
        ``moderations`` with ``by`` (who decided) in the same transaction. Returns the new
        status, or ``None`` when the action is not waiting for moderation.

        Atomic against concurrent moderators: the status changes only if it is still
        ``confirming`` (one conditional UPDATE; on PostgreSQL the second transaction waits
        for the first and then matches no row, on SQLite writers are serialised), and the
        ``moderations`` key refuses a second row for the same action. So of two
        decisions of one action exactly one takes effect; the other gets ``None``.
        """
        target = A.ACCEPTED if accept else A.REJECTED
        changed = conn.execute(
            update(actions)
            .where(actions.c.id == action_id, actions.c.status == str(A.CONFIRMING))
            .values(status=str(target))
        ).rowcount
        if changed != 1:
            return None
        conn.execute(
            insert(moderations).values(
                action_id=action_id,
                decision="accept" if accept else "reject",
                decided_by=by[:255],
                decided_at=now,
            )
        )
        if accept:
            self.process(conn, action_id, now)
        final = conn.execute(select(actions.c.status).where(actions.c.id == action_id)).scalar_one()
        return ActionStatus(final)

    def email_report(
        self, conn: Connection, action_id: int, reason: EmailStatusValue, now: datetime
    ) -> bool:
        """A provider's bounce/block/spam/unsub for the e-mail of ``action_id`` (§10)."""
        ctx = self._ctx(conn, action_id)
        if ctx is None or ctx.supporter is None:
            return False
        self.reject(conn, action_id, now)
        self._set_email_status(conn, action_id, reason, now, always_emit=False)
        return True

    # ---- campaigns -------------------------------------------------------------------------

    @staticmethod
    def campaign_updated(conn: Connection, campaign_id: int, now: datetime) -> int:
        """Queue a ``campaign_updated`` event to the campaign owner (§12)."""
        campaign = (
            conn.execute(select(campaigns).where(campaigns.c.id == campaign_id)).mappings().one()
        )
        owner = conn.execute(select(orgs).where(orgs.c.id == campaign["org_id"])).mappings().one()
        event = build_campaign_updated(
            timestamp=aware(campaign["updated_at"]),
            campaign=CampaignInfo(
                id=int(campaign["id"]),
                name=campaign["name"],
                title=campaign["title"],
                external_id=campaign["external_id"],
                contact_schema=campaign["contact_schema"],
            ),
            org=OrgInfo(id=int(owner["id"]), name=owner["name"], title=owner["title"]),
            config=campaign["config"],
        )
        route = event_route(int(owner["id"]), event)
        Processor._enqueue(conn, route.exchange, route.routing_key, event, None, now)
        return 1

    # ---- intake ---------------------------------------------------------------------------

    def link_waiting(self, conn: Connection, supporter_id: int, ref: str, org_id: int) -> list[int]:
        """Attach earlier follow-up actions that waited for a supporter with ``ref`` (§1)."""
        if self._unlinked is None:
            self._unlinked = (
                conn.execute(
                    select(actions.c.id).where(actions.c.supporter_id.is_(None)).limit(1)
                ).first()
                is not None
            )
        if not self._unlinked:
            return []  # no follow-up action waits anywhere: skip the lookup
        rows = conn.execute(WAITING_ACTIONS, {"b_ref": ref, "b_org": org_id}).all()
        ids = [int(row.id) for row in rows]
        if ids:
            conn.execute(
                update(actions).where(actions.c.id.in_(ids)).values(supporter_id=supporter_id)
            )
        return ids

    @staticmethod
    def latest_supporter(conn: Connection, ref: str, org_id: int) -> int | None:
        """The most recent supporter with ``ref`` collected by ``org_id`` (§1)."""
        value = conn.execute(
            select(func.max(supporters.c.id)).where(
                supporters.c.contact_ref == ref, supporters.c.org_id == org_id
            )
        ).scalar()
        return None if value is None else int(value)
