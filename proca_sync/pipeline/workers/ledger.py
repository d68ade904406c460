"""The e-mail worker's sent-ledger: no action gets the same e-mail twice.

One row per (action id, e-mail kind), written **before** the SMTP transaction
(``sending``) and updated after it (``sent``; ``failed`` when the server surely did not
take it, so a retry may send; ``rejected`` for a permanent refusal). A ``sending`` row
found later means a process died inside the window where the SMTP server may have
accepted the message: it is turned into ``ambiguous`` and never sent again (resolved
towards not sending twice), and the caller logs and counts it.

The ledger also remembers which (contact ref, action page) pairs were delivered, to tell a
``repeat`` action (processing.md §5: a duplicate on the *same* page) from a cross-page
duplicate, which the message alone cannot say (both carry ``dupeRank > 0``).

SQLAlchemy Core on its own database (SQLite file by default, PostgreSQL works too), used
from one worker thread; ``synchronous=FULL`` on SQLite (an ack follows each commit). No
personal data is stored: ids, the contact *ref* (a hash) and states only.
"""

from __future__ import annotations

import asyncio
import datetime as dt
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from enum import StrEnum
from typing import Any

from sqlalchemy import (
    BigInteger,
    Column,
    Index,
    MetaData,
    String,
    Table,
    func,
    insert,
    select,
    update,
)
from sqlalchemy import exc as sa_exc

from proca_sync.crm.sql import create_store_engine
from proca_sync.errors import BackendUnavailableError, ConfigError

__all__ = ["Claim", "SentLedger", "SentState"]

DEFAULT_LEDGER_URL = "sqlite:///proca-email-ledger.db"

metadata = MetaData()

email_sent = Table(
    "email_sent",
    metadata,
    Column("action_id", BigInteger, primary_key=True, autoincrement=False),
    Column("kind", String(32), primary_key=True),
    Column("state", String(16), nullable=False),
    Column("message_id", String(255), nullable=False),
    Column("org_id", BigInteger, nullable=True),
    Column("updated_at", String(40), nullable=False),
)

email_seen = Table(
    "email_seen",
    metadata,
    Column("action_id", BigInteger, primary_key=True, autoincrement=False),
    Column("contact_ref", String(64), nullable=False),
    Column("page_id", BigInteger, nullable=False),
    Index("ix_email_seen_ref_page", "contact_ref", "page_id"),
)


class SentState(StrEnum):
    SENDING = "sending"
    SENT = "sent"
    FAILED = "failed"
    REJECTED = "rejected"
    AMBIGUOUS = "ambiguous"


class Claim(StrEnum):
    """What :meth:`SentLedger.claim` found."""

    CLAIMED = "claimed"
    """No earlier send: the caller sends now."""
    SENT = "sent"
    """Already sent: do nothing."""
    AMBIGUOUS = "ambiguous"
    """A process died while sending it: do not send again (counted)."""


def _now() -> str:
    return dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _mark_sent(conn: Any, sent: Sequence[tuple[int, str]]) -> None:
    now = _now()
    for action_id, kind in sent:
        conn.execute(
            update(email_sent)
            .where(email_sent.c.action_id == action_id, email_sent.c.kind == kind)
            .values(state=SentState.SENT.value, updated_at=now)
        )


class SentLedger:
    """Durable (action id, kind) → state. Thread-confined: every call runs on one thread."""

    def __init__(self, url: str = DEFAULT_LEDGER_URL) -> None:
        self.engine, self.dialect = create_store_engine(
            url, what="e-mail ledger", synchronous="FULL"
        )
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="email-ledger")
        self._ready = False

    async def _run(self, fn: Any, *args: Any) -> Any:
        loop = asyncio.get_running_loop()
        try:
            return await loop.run_in_executor(self._executor, fn, *args)
        except sa_exc.SQLAlchemyError as exc:
            raise BackendUnavailableError(
                f"e-mail ledger unavailable ({type(exc).__name__})"
            ) from None

    def open_sync(self) -> None:
        """Create the tables on first use. Raises :class:`ConfigError` if unusable."""
        if self._ready:
            return
        try:
            with self.engine.begin() as conn:
                metadata.create_all(conn, checkfirst=True)
        except sa_exc.SQLAlchemyError as exc:
            raise ConfigError(f"e-mail ledger unusable ({type(exc).__name__})") from None
        self._ready = True

    async def open(self) -> None:
        await self._run(self.open_sync)

    async def close(self) -> None:
        await self._run(self.engine.dispose)
        self._executor.shutdown(wait=True)

    # ---- sends --------------------------------------------------------------------------

    async def claim(
        self, action_id: int, kind: str, message_id: str, org_id: int | None,
        *, sent: Sequence[tuple[int, str]] = (),
    ) -> Claim:
        """Record ``sending`` for (action, kind) unless it was sent or may have been.

        ``sent``: e-mails sent since the last commit, marked ``sent`` in the same
        transaction (one commit per e-mail, and a sent e-mail stays unrecorded no longer
        than until the next claim)."""
        result: Claim = await self._run(
            self.claim_sync, action_id, kind, message_id, org_id, sent
        )
        return result

    def claim_sync(
        self, action_id: int, kind: str, message_id: str, org_id: int | None,
        sent: Sequence[tuple[int, str]] = (),
    ) -> Claim:
        key = (email_sent.c.action_id == action_id, email_sent.c.kind == kind)
        try:
            with self.engine.begin() as conn:
                _mark_sent(conn, sent)
                conn.execute(insert(email_sent).values(
                    action_id=action_id, kind=kind, state=SentState.SENDING.value,
                    message_id=message_id, org_id=org_id, updated_at=_now(),
                ))
            return Claim.CLAIMED
        except sa_exc.IntegrityError:
            pass
        with self.engine.begin() as conn:
            _mark_sent(conn, sent)
            state = conn.execute(select(email_sent.c.state).where(*key)).scalar_one()
            if state in (SentState.FAILED, SentState.REJECTED):
                taken = conn.execute(
                    update(email_sent).where(*key, email_sent.c.state == state)
                    .values(state=SentState.SENDING.value, updated_at=_now())
                ).rowcount
                return Claim.CLAIMED if taken else Claim.AMBIGUOUS
            if state == SentState.SENT:
                return Claim.SENT
            if state == SentState.SENDING:
                conn.execute(
                    update(email_sent).where(*key, email_sent.c.state == state)
                    .values(state=SentState.AMBIGUOUS.value, updated_at=_now())
                )
            return Claim.AMBIGUOUS

    async def mark(self, action_id: int, kind: str, state: SentState) -> None:
        await self._run(self.mark_sync, action_id, kind, state)

    def mark_sync(self, action_id: int, kind: str, state: SentState) -> None:
        with self.engine.begin() as conn:
            conn.execute(
                update(email_sent)
                .where(email_sent.c.action_id == action_id, email_sent.c.kind == kind)
                .values(state=state.value, updated_at=_now())
            )

    # ---- batch end and repeats --------------------------------------------------------

    async def finish(
        self, sent: Sequence[tuple[int, str]], seen: Sequence[tuple[int, str, int]]
    ) -> None:
        """One commit for a batch: ``sent`` (action id, kind) marked sent, and the
        delivered (action id, contact ref, page id) noted for :meth:`earlier_on_page`."""
        if sent or seen:
            await self._run(self.finish_sync, sent, seen)

    def finish_sync(
        self, sent: Sequence[tuple[int, str]], seen: Sequence[tuple[int, str, int]]
    ) -> None:
        with self.engine.begin() as conn:
            _mark_sent(conn, sent)
            if seen:
                ids = [action_id for action_id, _ref, _page in seen]
                known = set(conn.execute(
                    select(email_seen.c.action_id).where(email_seen.c.action_id.in_(ids))
                ).scalars())
                rows = [{"action_id": a, "contact_ref": r, "page_id": p}
                        for a, r, p in dict.fromkeys(seen) if a not in known]
                if rows:
                    conn.execute(insert(email_seen), rows)

    async def earlier_on_page(self, action_id: int, contact_ref: str, page_id: int) -> bool:
        """Whether an earlier action of the same contact on the same page was delivered
        (noted by :meth:`finish`): the action is a ``repeat``."""
        result: bool = await self._run(self.earlier_on_page_sync, action_id, contact_ref,
                                       page_id)
        return result

    def earlier_on_page_sync(self, action_id: int, contact_ref: str, page_id: int) -> bool:
        with self.engine.connect() as conn:
            earlier = conn.execute(
                select(email_seen.c.action_id).where(
                    email_seen.c.contact_ref == contact_ref,
                    email_seen.c.page_id == page_id,
                    email_seen.c.action_id < action_id,
                ).limit(1)
            ).first()
        return earlier is not None

    # ---- reading ------------------------------------------------------------------------

    def states(self) -> dict[tuple[int, str], str]:
        """Every (action id, kind) and its state (for tests and ``status`` output)."""
        self.open_sync()
        with self.engine.connect() as conn:
            rows = conn.execute(select(email_sent.c.action_id, email_sent.c.kind,
                                       email_sent.c.state))
            return {(int(a), str(k)): str(s) for a, k, s in rows}

    def counts(self) -> dict[str, int]:
        self.open_sync()
        with self.engine.connect() as conn:
            rows = conn.execute(
                select(email_sent.c.state, func.count()).group_by(email_sent.c.state)
            )
            return {str(state): int(n) for state, n in rows}
