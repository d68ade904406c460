"""The moderation inbox: actions waiting in ``confirming`` in the pipeline's state.

The console reaches the pipeline through its state database (``--pipeline URL``, the
``PROCA_PIPELINE_DB`` of ``proca-sync pipeline serve``) and decides with the pipeline's
own :meth:`~proca_sync.pipeline.processing.Processor.moderate`: the new status, the
decision record (who, when) and the messages it implies go into the outbox in one
transaction, and the ``serve`` process's outbox publisher sends them (it polls the
table) — the console never publishes, so there is still one publisher per database.

Several moderators at once: :meth:`~proca_sync.pipeline.processing.Processor.moderate`
changes an action only while it is still waiting, so of two decisions of one action
exactly one takes effect; the other is answered 409 with who decided it and when.

Who may do what: moderators and admins (a viewer is refused). Both see the supporter's
clear first name, e-mail and area the pipeline keeps for e-mails, as they see contacts
in the CRM pages; nothing sealed is ever decrypted here. Log lines carry user names,
action ids and decisions only.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from enum import StrEnum
from pathlib import Path
from typing import Any

import orjson
from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, Response
from sqlalchemy import Engine, func, select
from sqlalchemy.exc import SQLAlchemyError
from starlette.concurrency import run_in_threadpool

from proca_sync.errors import ConfigError
from proca_sync.pipeline.instance import InstanceSecrets
from proca_sync.pipeline.processing import Processor
from proca_sync.pipeline.state import (
    ActionStatus,
    actions,
    campaigns,
    migrate,
    moderations,
    open_engine,
    orgs,
    pages,
    supporters,
)
from proca_sync.web.accounts import User

__all__ = [
    "Decided",
    "Decision",
    "ModerationDesk",
    "Taken",
    "WaitingAction",
    "add_moderation_routes",
]

log = logging.getLogger("proca_sync.web.moderation")

CONSOLE_PREFIX = "web:"
"""``decided_by`` of a decision made in the console: ``web:<user name>`` (the management
API records ``api:org <id>``)."""


WAITING = actions.c.status == str(ActionStatus.CONFIRMING)


class Verdict(StrEnum):
    ACCEPT = "accept"
    REJECT = "reject"


@dataclass(frozen=True, slots=True)
class WaitingAction:
    """One action waiting for a decision, as the inbox shows it."""

    id: int
    created_at: datetime
    action_type: str
    custom_fields: dict[str, Any]
    testing: bool
    campaign: str
    page: str
    org: str
    first_name: str | None
    email: str | None
    area: str | None


@dataclass(frozen=True, slots=True)
class Decision:
    """A recorded moderation decision (the pipeline's ``moderations`` row)."""

    action_id: int
    decision: str
    decided_by: str
    decided_at: datetime
    action_type: str | None = None
    campaign: str | None = None

    @property
    def who(self) -> str:
        """The user name for a console decision, else the recorded origin."""
        return self.decided_by.removeprefix(CONSOLE_PREFIX)


@dataclass(frozen=True, slots=True)
class Decided:
    """This request's decision took effect; ``status`` is the action's new status."""

    action_id: int
    verdict: Verdict
    status: ActionStatus


@dataclass(frozen=True, slots=True)
class Taken:
    """The action was not waiting any more: decided by someone else (``decision``), or
    left ``confirming`` another way (``status``); both ``None`` when there is no such
    action."""

    action_id: int
    decision: Decision | None
    status: str | None


def _page_count(total: int, size: int) -> int:
    return max(1, -(-total // size))


class ModerationDesk:
    """The pipeline's state as the inbox sees it; decisions go through its processor.

    ``secrets`` (the pipeline's instance secrets file) is needed to decide: accepting
    builds the delivered messages, sealed with the instance key. Without it the inbox is
    read-only (:class:`ConfigError` on :meth:`decide`).
    """

    def __init__(self, url: str, *, secrets: Path | None) -> None:
        self.url = url
        self.secrets = secrets
        self.engine: Engine = open_engine(url)
        self._processor: Processor | None = None
        # One decision at a time in this process: the processor's nonce counter (sealing
        # for orgs with a key) and catalog cache are not made for threads. Between
        # processes, the conditional update in `moderate` is what keeps decisions apart.
        self._lock = threading.Lock()

    def open_sync(self) -> None:
        """Bring the schema up to date, as every pipeline command does.

        :class:`ConfigError` (naming only the error's type) when the store is unusable.
        Alembic is not thread-safe: call it once, at start.
        """
        try:
            migrate(self.engine)
        except SQLAlchemyError as exc:
            raise ConfigError(f"pipeline store: {type(exc).__name__}") from None

    def _moderator(self) -> Processor:
        if self._processor is None:
            if self.secrets is None:
                raise ConfigError("deciding needs the pipeline's secrets (--pipeline-secrets)")
            self._processor = Processor(InstanceSecrets.load(self.secrets))
        return self._processor

    def waiting_count(self) -> int:
        """How many actions wait for a decision."""
        with self.engine.connect() as conn:
            query = select(func.count()).select_from(actions).where(WAITING)
            return int(conn.execute(query).scalar() or 0)

    def waiting(self, page: int, size: int) -> tuple[list[WaitingAction], int]:
        """The waiting actions, oldest first, one page of ``size``; and how many wait."""
        query = (
            select(
                actions.c.id, actions.c.created_at, actions.c.action_type,
                actions.c.custom_fields, actions.c.testing,
                campaigns.c.title.label("campaign"), pages.c.name.label("page"),
                orgs.c.name.label("org"), supporters.c.first_name, supporters.c.email,
                supporters.c.area,
            )
            .select_from(actions)
            .join(pages, pages.c.id == actions.c.page_id)
            .join(campaigns, campaigns.c.id == actions.c.campaign_id)
            .join(orgs, orgs.c.id == pages.c.org_id)
            .outerjoin(supporters, supporters.c.id == actions.c.supporter_id)
            .where(WAITING)
            .order_by(actions.c.id)
            .limit(size)
            .offset((page - 1) * size)
        )  # fmt: skip
        total = self.waiting_count()
        with self.engine.connect() as conn:
            rows = conn.execute(query).all()
        items = [
            WaitingAction(
                id=int(row.id),
                created_at=row.created_at,
                action_type=row.action_type,
                custom_fields=dict(row.custom_fields or {}),
                testing=bool(row.testing),
                campaign=row.campaign,
                page=row.page,
                org=row.org,
                first_name=row.first_name,
                email=row.email,
                area=row.area,
            )
            for row in rows
        ]
        return items, total

    def decision_of(self, action_id: int) -> Taken:
        """What became of ``action_id``: its decision record and current status."""
        with self.engine.connect() as conn:
            status = conn.execute(
                select(actions.c.status).where(actions.c.id == action_id)
            ).scalar()
            row = conn.execute(
                select(moderations).where(moderations.c.action_id == action_id)
            ).first()
        decision = (
            None
            if row is None
            else Decision(int(row.action_id), row.decision, row.decided_by, row.decided_at)
        )
        return Taken(action_id, decision, status)

    def decide(self, action_id: int, verdict: Verdict, *, by: str) -> Decided | Taken:
        """Accept or reject ``action_id`` as ``by`` (a console user name).

        One transaction through the pipeline's processor: status, decision record and
        outbox rows together. :class:`Taken` when the action was not waiting (any more);
        never two decisions of one action.
        """
        with self._lock:
            processor = self._moderator()
            now = datetime.now(UTC)
            with self.engine.begin() as conn:
                status = processor.moderate(
                    conn, action_id, accept=verdict is Verdict.ACCEPT, now=now,
                    by=CONSOLE_PREFIX + by,
                )  # fmt: skip
        if status is None:
            return self.decision_of(action_id)
        return Decided(action_id, verdict, status)

    def history(self, page: int, size: int) -> tuple[list[Decision], int]:
        """Recorded decisions, newest first, one page; and how many there are."""
        query = (
            select(moderations, actions.c.action_type, campaigns.c.title.label("campaign"))
            .select_from(moderations)
            .join(actions, actions.c.id == moderations.c.action_id)
            .join(campaigns, campaigns.c.id == actions.c.campaign_id)
            .order_by(moderations.c.decided_at.desc(), moderations.c.action_id.desc())
            .limit(size)
            .offset((page - 1) * size)
        )
        with self.engine.connect() as conn:
            total = int(conn.execute(select(func.count()).select_from(moderations)).scalar() or 0)
            rows = conn.execute(query).all()
        decisions = [
            Decision(
                int(row.action_id),
                row.decision,
                row.decided_by,
                row.decided_at,
                row.action_type,
                row.campaign,
            )
            for row in rows
        ]
        return decisions, total


def add_moderation_routes(
    app: FastAPI,
    settings: Any,
    *,
    render: Callable[..., HTMLResponse],
    moderator: Any,
    audit: Callable[[str, str, str], None],
    stores: dict[str, Any],
) -> None:
    """Add the inbox's routes to the console ``app`` (:func:`proca_sync.web.app.create_app`).

    Added to the app itself rather than through an ``APIRouter``, so they are ordinary
    routes of the app: its CSRF guard applies and its route list names them.

    ``moderator`` is the app's dependency that admits the moderator role and above,
    ``render`` its template renderer, ``audit`` the account store's audit log, ``stores``
    the app's open stores (closed at shutdown).
    """
    page_size: int = settings.page_size

    opened: ModerationDesk | None = None
    if settings.pipeline_url is not None:  # opened (and migrated) once, at start
        opened = ModerationDesk(settings.pipeline_url, secrets=settings.pipeline_secrets)
        opened.open_sync()
        stores["pipeline"] = opened

    def desk() -> ModerationDesk | None:
        return opened

    def inbox_page(page: int) -> tuple[list[WaitingAction], int]:
        found = desk()
        return found.waiting(page, page_size) if found is not None else ([], 0)

    async def inbox(
        request: Request, page: int, *, status_code: int = 200,
        notice: Decided | Taken | None = None,
    ) -> Response:
        items, total = await run_in_threadpool(inbox_page, page)
        return render(
            request, "moderation.html", status_code, items=items, total=total, page=page,
            pages=_page_count(total, page_size), configured=settings.pipeline_url is not None,
            can_decide=settings.pipeline_secrets is not None, notice=notice,
        )  # fmt: skip

    async def cell(request: Request, outcome: Decided | Taken, status_code: int) -> Response:
        """The row's new decision cell (htmx); the fresh waiting count rides along as an
        ``HX-Trigger`` event, so the heading follows everyone's decisions."""
        found = desk()
        count = await run_in_threadpool(found.waiting_count) if found is not None else 0
        response = render(request, "_moderation_outcome.html", status_code, outcome=outcome)
        response.headers["HX-Trigger"] = orjson.dumps({"moderationWaiting": count}).decode()
        return response

    @app.get("/moderation", response_class=HTMLResponse)
    async def moderation_inbox(request: Request, page: int = 1, user: User = moderator) -> Response:
        return await inbox(request, max(1, page))

    @app.post("/moderation/decide", response_class=HTMLResponse)
    async def moderation_decide(request: Request, user: User = moderator) -> Response:
        form = await request.form()
        raw_id, raw_verdict = form.get("action_id"), form.get("decision")
        if not (isinstance(raw_id, str) and raw_id.isdigit() and 0 < int(raw_id) < 2**53):
            return render(request, "error.html", 400, message="invalid action_id")
        try:
            verdict = Verdict(str(raw_verdict))
        except ValueError:
            return render(request, "error.html", 400, message="invalid decision")
        found = desk()
        if found is None:
            return render(request, "error.html", 403, message="no pipeline configured (--pipeline)")
        action_id = int(raw_id)
        try:
            outcome = await run_in_threadpool(found.decide, action_id, verdict, by=user.name)
        except ConfigError as exc:
            return render(request, "error.html", 403, message=str(exc))
        fragment = bool(request.headers.get("hx-request"))
        if isinstance(outcome, Taken):
            code = 404 if outcome.status is None else 409
            log.info(
                "moderation refused",
                extra={"fields": {"user": user.name, "action_id": action_id, "code": code}},
            )
            if fragment:
                return await cell(request, outcome, code)
            return await inbox(request, 1, status_code=code, notice=outcome)
        await run_in_threadpool(
            audit, user.name, f"moderate_{verdict.value}", f"action:{action_id}"
        )
        log.info(
            "action moderated",
            extra={"fields": {"user": user.name, "action_id": action_id,
                              "decision": verdict.value, "status": outcome.status.value}},
        )  # fmt: skip
        if fragment:
            return await cell(request, outcome, 200)
        return await inbox(request, 1, notice=outcome)

    @app.get("/moderation/history", response_class=HTMLResponse)
    async def moderation_history(
        request: Request, page: int = 1, user: User = moderator
    ) -> Response:
        page = max(1, page)
        found = desk()
        decisions, total = (
            await run_in_threadpool(found.history, page, page_size) if found else ([], 0)
        )
        return render(
            request, "moderation_history.html", decisions=decisions, total=total, page=page,
            pages=_page_count(total, page_size), configured=found is not None,
        )  # fmt: skip

