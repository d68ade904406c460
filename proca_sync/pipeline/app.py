"""The pipeline's HTTP service (``proca-sync pipeline serve``): FastAPI, OpenAPI at
``/openapi.json``.

* public intake ``POST /api/actions`` (``addActionContact``) and
  ``POST /api/actions/{contactRef}`` (``addAction``), rate limited per client address;
* supporter links ``/link/s/{actionId}/accept|reject/{contactRef}`` and the double-opt-in
  link ``/link/d/{actionId}/{contactRef}`` (processing.md §7);
* management API (``X-Api-Key`` of an org): accept or reject a supporter or a single
  action (moderation), read statuses, update a campaign (``campaign_updated``);
* ``POST /webhooks/email``: an e-mail provider's bounce/complaint report, generic JSON,
  HMAC-SHA256 signed (``X-Proca-Signature: sha256=<hex>``).

Every state change commits its messages to the outbox in the same transaction, then
wakes the :class:`~proca_sync.pipeline.outbox.OutboxPublisher`. Error bodies are
``{"errors": [{"field"?, "message"}]}`` and never contain submitted values.
"""

import asyncio
import contextlib
import hashlib
import hmac
import logging
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Annotated, Any, Literal
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import orjson
from fastapi import Depends, FastAPI, Header, HTTPException, Path, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, RedirectResponse, Response
from fastapi.security import APIKeyHeader
from pydantic import BaseModel, ConfigDict, Field
from sqlalchemy import Engine, select, update
from sqlalchemy.exc import OperationalError

from proca_sync.pipeline.instance import InstanceSecrets
from proca_sync.pipeline.intake import (
    ActionContactIn,
    AddActionIn,
    IntakeProblem,
    Short,
    add_action,
    add_action_contact,
)
from proca_sync.pipeline.outbox import OutboxPublisher
from proca_sync.pipeline.processing import LinkOutcome, Processor
from proca_sync.pipeline.state import (
    EmailStatusValue,
    actions,
    api_keys,
    campaigns,
    pages,
    supporters,
)
from proca_sync.pipeline.topology import DEFAULT_RETRY_DELAY_MS

__all__ = ["PipelineConfig", "RateLimiter", "api_key_digest", "create_app", "sign_webhook"]

log = logging.getLogger("proca_sync.pipeline.app")

REF_PATTERN = r"^[A-Za-z0-9_-]{20,88}$"
SIGNATURE_HEADER = "X-Proca-Signature"


def api_key_digest(key: str) -> str:
    return hashlib.sha256(key.encode("utf-8")).hexdigest()


def sign_webhook(secret: str, body: bytes) -> str:
    """The ``X-Proca-Signature`` value of ``body``: ``sha256=<hex HMAC>``."""
    return "sha256=" + hmac.new(secret.encode("utf-8"), body, hashlib.sha256).hexdigest()


@dataclass(frozen=True)
class PipelineConfig:
    database: str
    secrets: InstanceSecrets = field(repr=False)
    amqp_url: str | None = field(default=None, repr=False)
    rate: float = 20.0  # intake requests per second and client address; 0 = no limit
    burst: int = 100
    retry_delay_ms: int = DEFAULT_RETRY_DELAY_MS


class RateLimiter:
    """A token bucket per client address (the public intake's only defence)."""

    def __init__(self, rate: float, burst: int) -> None:
        self._rate = rate
        self._burst = float(burst)
        self._buckets: dict[str, tuple[float, float]] = {}

    def allow(self, client: str) -> bool:
        if self._rate <= 0:
            return True
        now = time.monotonic()
        tokens, last = self._buckets.get(client, (self._burst, now))
        tokens = min(self._burst, tokens + (now - last) * self._rate)
        if tokens < 1:
            self._buckets[client] = (tokens, now)
            return False
        self._buckets[client] = (tokens - 1, now)
        if len(self._buckets) > 100_000:  # forget idle clients rather than grow without bound
            self._buckets.clear()
        return True


# ---- response models ----------------------------------------------------------------------


class ContactReference(BaseModel):
    contactRef: str
    actionId: int


class ErrorItem(BaseModel):
    field: str | None = None
    message: str


class Errors(BaseModel):
    errors: list[ErrorItem]


class StatusOut(BaseModel):
    actionId: int
    actionStatus: str
    supporterStatus: str | None
    emailStatus: str | None


class CampaignPatch(BaseModel):
    model_config = ConfigDict(extra="forbid")
    title: Short | None = None
    externalId: int | None = Field(default=None, ge=0, lt=2**53)
    supporterConfirm: bool | None = None
    actionConfirm: bool | None = None
    config: dict[str, Any] | None = None


class EmailReport(BaseModel):
    model_config = ConfigDict(extra="forbid")
    actionId: int = Field(gt=0, lt=2**53)
    event: Literal["bounce", "soft_bounce", "blocked", "spam", "unsub"]


class EmailReports(BaseModel):
    model_config = ConfigDict(extra="forbid")
    events: list[EmailReport] = Field(max_length=1000)


class GroupCommit:
    """Runs concurrent intake submissions in shared transactions (group commit).

    Submissions that arrive while a transaction runs wait and go together into the next
    one, up to ``max_batch``: one commit per batch instead of one per action. An
    :class:`IntakeProblem` fails only its own submission (raised before it writes); any
    other error rolls the batch back and each submission is retried alone, so one bad
    submission never takes the others with it.
    """

    def __init__(self, engine: Engine, *, max_batch: int = 200) -> None:
        self._engine = engine
        self._max = max_batch
        self._queue: asyncio.Queue[tuple[Callable[[Any], Any], asyncio.Future[Any]]] = (
            asyncio.Queue()
        )

    async def submit(self, work: Callable[[Any], Any]) -> Any:
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        await self._queue.put((work, future))
        return await future

    async def run(self, on_commit: Callable[[], None]) -> None:
        while True:
            batch = [await self._queue.get()]
            while len(batch) < self._max and not self._queue.empty():
                batch.append(self._queue.get_nowait())
            self._commit(batch)
            on_commit()

    def _commit(self, batch: list[tuple[Callable[[Any], Any], asyncio.Future[Any]]]) -> None:
        results: list[tuple[asyncio.Future[Any], Any, BaseException | None]] = []
        try:
            with self._engine.begin() as conn:
                for work, future in batch:
                    try:
                        results.append((future, work(conn), None))
                    except IntakeProblem as exc:
                        results.append((future, None, exc))
        except Exception as exc:
            if len(batch) == 1:
                work, future = batch[0]
                if not future.done():
                    log.warning("intake transaction failed: %s", type(exc).__name__)
                    future.set_exception(HTTPException(503, "state database unavailable"))
                return
            for item in batch:  # alone, so only the culprit fails
                self._commit([item])
            return
        for future, value, error in results:
            if future.done():
                continue
            if error is not None:
                future.set_exception(error)
            else:
                future.set_result(value)


def _error(status: int, message: str, where: str | None = None) -> JSONResponse:
    return JSONResponse(
        status_code=status, content={"errors": [{"field": where, "message": message}]}
    )


ERRORS: dict[int | str, dict[str, Any]] = {
    400: {"model": Errors},
    404: {"model": Errors},
    422: {"model": Errors},
    429: {"model": Errors},
}


def _with_query(url: str, extra: dict[str, str]) -> str:
    parts = urlsplit(url)
    query = urlencode([*extra.items(), *parse_qsl(parts.query, keep_blank_values=True)])
    return urlunsplit(parts._replace(query=query))


def _flag(value: str | None) -> bool:
    return (value or "").lower() in ("1", "true", "yes")


def create_app(config: PipelineConfig, *, engine: Engine | None = None) -> FastAPI:
    """The ASGI app; with ``config.amqp_url`` its lifespan runs the outbox publisher."""
    from proca_sync.pipeline.state import migrate, open_engine

    db = engine or open_engine(config.database)
    migrate(db)
    processor = Processor(config.secrets)
    publisher = (
        OutboxPublisher(db, config.amqp_url, retry_delay_ms=config.retry_delay_ms)
        if config.amqp_url
        else None
    )
    limiter = RateLimiter(config.rate, config.burst)
    group = GroupCommit(db)

    def wake() -> None:
        if publisher is not None:
            publisher.wake()

    @contextlib.asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        stop = asyncio.Event()
        task = None
        committer = asyncio.create_task(group.run(wake))
        if publisher is not None:
            task = asyncio.create_task(publisher.run(stop))
            ready = asyncio.ensure_future(publisher.ready.wait())
            await asyncio.wait([task, ready], return_when=asyncio.FIRST_COMPLETED)
            ready.cancel()
            if task.done():
                task.result()  # the broker or the topology refused: fail the start-up
        try:
            yield
        finally:
            committer.cancel()
            stop.set()
            if task is not None:
                publisher.wake() if publisher is not None else None
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(task, 10)

    app = FastAPI(
        title="proca-sync pipeline",
        version="1",
        description="Proca-compatible action intake, confirmation, moderation and events.",
        lifespan=lifespan,
    )
    app.state.engine = db
    app.state.publisher = publisher

    def committed(work: Callable[[Any], Any]) -> Any:
        """Run ``work(conn)`` in one transaction, then wake the publisher."""
        try:
            with db.begin() as conn:
                result = work(conn)
        except OperationalError:
            log.warning("state database unavailable")
            raise HTTPException(503, "state database unavailable") from None
        if publisher is not None:
            publisher.wake()
        return result

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        # Name the field and the rule; never the submitted value (no "input", no "ctx").
        items = []
        for error in exc.errors()[:20]:
            location = [str(part) for part in error.get("loc", ()) if part != "body"]
            items.append({"field": ".".join(location) or None, "message": str(error["msg"])})
        # A malformed confirmation link is a 400 (processing.md §7); bodies are 422.
        status = 400 if request.url.path.startswith("/link/") else 422
        return JSONResponse(status_code=status, content={"errors": items})

    @app.exception_handler(HTTPException)
    async def http_error(_request: Request, exc: HTTPException) -> JSONResponse:
        return _error(exc.status_code, str(exc.detail))

    @app.exception_handler(IntakeProblem)
    async def problem(_request: Request, exc: IntakeProblem) -> JSONResponse:
        return _error(exc.status, exc.message, exc.field)

    def rate_limited(request: Request) -> None:
        client = request.client.host if request.client else "unknown"
        if not limiter.allow(client):
            raise HTTPException(429, "too many requests")

    api_key_header = APIKeyHeader(name="X-Api-Key", auto_error=False)

    def org_of_key(key: Annotated[str | None, Depends(api_key_header)]) -> int:
        if not key:
            raise HTTPException(401, "an X-Api-Key header is required")
        with db.connect() as conn:
            org = conn.execute(
                select(api_keys.c.org_id).where(api_keys.c.digest == api_key_digest(key))
            ).scalar()
        if org is None:
            raise HTTPException(401, "unknown API key")
        return int(org)

    def page_owner_of(action_id: int) -> int | None:
        with db.connect() as conn:
            value = conn.execute(
                select(pages.c.org_id)
                .join(actions, actions.c.page_id == pages.c.id)
                .where(actions.c.id == action_id)
            ).scalar()
        return None if value is None else int(value)

    def owned(action_id: int, org: int) -> None:
        if page_owner_of(action_id) != org:
            raise HTTPException(404, "no such action for this org")

    OrgDep = Annotated[int, Depends(org_of_key)]
    ActionIdPath = Annotated[int, Path(gt=0, lt=2**53)]
    RefPath = Annotated[str, Path(pattern=REF_PATTERN)]

    # ---- intake -----------------------------------------------------------------------

    @app.post(
        "/api/actions",
        response_model=ContactReference,
        responses=ERRORS,
        dependencies=[Depends(rate_limited)],
        tags=["intake"],
    )
    async def add_action_with_contact(submission: ActionContactIn) -> ContactReference:
        """``addActionContact``: an action with contact data and consent."""
        now = datetime.now(UTC)
        stored = await group.submit(
            lambda conn: add_action_contact(conn, processor, submission, now)
        )
        return ContactReference(contactRef=stored.contact_ref, actionId=stored.action_id)

    @app.post(
        "/api/actions/{contactRef}",
        response_model=ContactReference,
        responses=ERRORS,
        dependencies=[Depends(rate_limited)],
        tags=["intake"],
    )
    async def add_follow_up_action(
        contactRef: RefPath, submission: AddActionIn
    ) -> ContactReference:
        """``addAction``: a follow-up action (share, …) of a known supporter."""
        now = datetime.now(UTC)
        stored = await group.submit(
            lambda conn: add_action(conn, processor, contactRef, submission, now)
        )
        return ContactReference(contactRef=stored.contact_ref, actionId=stored.action_id)

    # ---- links (processing.md §7) -------------------------------------------------------

    def _link_answer(outcome: LinkOutcome, redir: str | None, extra: dict[str, str]) -> Response:
        if outcome == LinkOutcome.NOT_FOUND:
            return _error(404, "action and contact reference do not match")
        if outcome == LinkOutcome.NOT_ALLOWED:
            return _error(400, "not allowed")
        if redir:
            return RedirectResponse(_with_query(redir, extra), status_code=302)
        return PlainTextResponse("SUCCESS")

    async def supporter_link(
        actionId: int,
        verb: str,
        contactRef: str,
        doi: str | None,
        redir: str | None,
    ) -> Response:
        if verb not in ("accept", "reject"):
            return _error(400, "malformed link")
        now = datetime.now(UTC)
        outcome = committed(
            lambda conn: processor.confirm_supporter(
                conn, actionId, contactRef, accept=verb == "accept", doi=_flag(doi), now=now
            )
        )
        extra = {"proca_confirm": verb}
        if _flag(doi):
            extra["proca_doi"] = "1"
        return _link_answer(outcome, redir, extra)

    for method in ("GET", "POST"):

        @app.api_route(
            "/link/s/{actionId}/{verb}/{contactRef}",
            methods=[method],
            responses=ERRORS,
            tags=["links"],
            operation_id=f"supporter_link_{method.lower()}",
            response_class=PlainTextResponse,
        )
        async def supporter_link_route(
            actionId: ActionIdPath,
            verb: Annotated[Literal["accept", "reject"], Path()],
            contactRef: RefPath,
            doi: Annotated[str | None, Query(max_length=8)] = None,
            redir: Annotated[str | None, Query(max_length=2000)] = None,
            reminder: Annotated[str | None, Query(max_length=8)] = None,
        ) -> Response:
            """Supporter confirmation: accept or reject (``doi=1`` also confirms the
            e-mail); ``redir`` redirects with ``proca_confirm`` on success."""
            return await supporter_link(actionId, verb, contactRef, doi, redir)

    @app.get(
        "/link/d/{actionId}/{contactRef}",
        responses=ERRORS,
        tags=["links"],
        response_class=RedirectResponse,
        status_code=302,
    )
    async def double_opt_in_link(
        actionId: ActionIdPath,
        contactRef: RefPath,
        redir: Annotated[str | None, Query(max_length=2000)] = None,
        reminder: Annotated[str | None, Query(max_length=8)] = None,
    ) -> Response:
        """Double opt-in: sets ``double_opt_in`` and emits ``email_status``; redirects."""
        now = datetime.now(UTC)
        outcome = committed(lambda conn: processor.double_opt_in(conn, actionId, contactRef, now))
        if outcome != LinkOutcome.OK:
            return _link_answer(outcome, None, {})
        target = redir
        if not target:
            with db.connect() as conn:
                target = (
                    conn.execute(
                        select(pages.c.location)
                        .join(actions, actions.c.page_id == pages.c.id)
                        .where(actions.c.id == actionId)
                    ).scalar()
                    or "/"
                )
        return RedirectResponse(_with_query(target, {"proca_doi": "1"}), status_code=302)

    # ---- management (API key of the page owner) ----------------------------------------

    @app.get(
        "/api/actions/{actionId}/status",
        response_model=StatusOut,
        responses=ERRORS,
        tags=["manage"],
    )
    async def action_status(actionId: ActionIdPath, org: OrgDep) -> StatusOut:
        """Processing statuses of an action and its supporter (no personal data)."""
        owned(actionId, org)
        with db.connect() as conn:
            row = conn.execute(
                select(actions.c.status, supporters.c.status.label("s"), supporters.c.email_status)
                .select_from(actions)
                .outerjoin(supporters, supporters.c.id == actions.c.supporter_id)
                .where(actions.c.id == actionId)
            ).one()
        return StatusOut(
            actionId=actionId,
            actionStatus=row.status,
            supporterStatus=row.s,
            emailStatus=row.email_status,
        )

    @app.post(
        "/api/actions/{actionId}/{decision}",
        response_model=StatusOut,
        responses=ERRORS,
        tags=["manage"],
    )
    async def moderate_action(
        actionId: ActionIdPath,
        decision: Annotated[Literal["accept", "reject"], Path()],
        org: OrgDep,
    ) -> StatusOut:
        """Moderation: accept (→ delivered) or reject one action waiting in
        ``confirming``; 409 when it is not waiting."""
        owned(actionId, org)
        now = datetime.now(UTC)
        status = committed(
            lambda conn: processor.moderate(
                conn, actionId, accept=decision == "accept", now=now, by=f"api:org {org}"
            )
        )
        if status is None:
            raise HTTPException(409, "the action is not waiting for moderation")
        return await action_status(actionId, org)

    @app.post(
        "/api/supporters/{actionId}/{decision}",
        response_model=StatusOut,
        responses=ERRORS,
        tags=["manage"],
    )
    async def confirm_supporter(
        actionId: ActionIdPath,
        decision: Annotated[Literal["accept", "reject"], Path()],
        org: OrgDep,
    ) -> StatusOut:
        """Accept or reject the supporter of an action, as the links do."""
        owned(actionId, org)
        now = datetime.now(UTC)

        def work(conn: Any) -> LinkOutcome:
            ref = conn.execute(
                select(supporters.c.contact_ref)
                .join(actions, actions.c.supporter_id == supporters.c.id)
                .where(actions.c.id == actionId)
            ).scalar()
            if ref is None:
                return LinkOutcome.NOT_FOUND
            return processor.confirm_supporter(
                conn, actionId, ref, accept=decision == "accept", doi=False, now=now
            )

        outcome = committed(work)
        if outcome == LinkOutcome.NOT_FOUND:
            raise HTTPException(404, "the action has no supporter")
        if outcome == LinkOutcome.NOT_ALLOWED:
            raise HTTPException(400, "not allowed")
        return await action_status(actionId, org)

    @app.patch("/api/campaigns/{campaignId}", responses=ERRORS, tags=["manage"])
    async def update_campaign(
        campaignId: Annotated[int, Path(gt=0, lt=2**53)],
        patch: CampaignPatch,
        org: OrgDep,
    ) -> dict[str, Any]:
        """Update a campaign of the caller's org; emits ``campaign_updated``."""
        now = datetime.now(UTC)

        def work(conn: Any) -> bool:
            owner = conn.execute(
                select(campaigns.c.org_id).where(campaigns.c.id == campaignId)
            ).scalar()
            if owner != org:
                return False
            values: dict[str, Any] = {"updated_at": now}
            for source, column in (
                ("title", "title"),
                ("externalId", "external_id"),
                ("supporterConfirm", "supporter_confirm"),
                ("actionConfirm", "action_confirm"),
                ("config", "config"),
            ):
                if source in patch.model_fields_set:
                    values[column] = getattr(patch, source)
            if values.get("title") is None and "title" in values:
                del values["title"]
            if values.get("config") is None and "config" in values:
                values["config"] = {}
            conn.execute(update(campaigns).where(campaigns.c.id == campaignId).values(**values))
            processor.campaign_updated(conn, campaignId, now)
            return True

        if not committed(work):
            raise HTTPException(404, "no such campaign for this org")
        processor.catalog.invalidate()
        return {"campaignId": campaignId, "updated": True}

    # ---- e-mail provider reports (processing.md §10) -------------------------------------

    @app.post("/webhooks/email", responses={**ERRORS, 401: {"model": Errors}}, tags=["events"])
    async def email_webhook(
        request: Request,
        signature: Annotated[str | None, Header(alias=SIGNATURE_HEADER)] = None,
    ) -> dict[str, int]:
        """Bounce/complaint reports: body ``{"events": [{"actionId", "event"}]}``, signed
        with ``X-Proca-Signature: sha256=<hex HMAC-SHA256 of the body>``."""
        body = await request.body()
        expected = sign_webhook(config.secrets.webhook_secret, body)
        if signature is None or not hmac.compare_digest(signature, expected):
            raise HTTPException(401, "bad or missing signature")
        try:
            reports = EmailReports.model_validate(orjson.loads(body))
        except (orjson.JSONDecodeError, ValueError):
            raise HTTPException(422, "body is not a valid report") from None
        now = datetime.now(UTC)
        applied = 0

        def work(conn: Any) -> int:
            count = 0
            for report in reports.events:
                if report.event == "soft_bounce":
                    continue  # soft bounces are only logged (processing.md §10)
                if processor.email_report(
                    conn, report.actionId, EmailStatusValue(report.event), now
                ):
                    count += 1
            return count

        applied = committed(work)
        log.info("email webhook: %d of %d reports applied", applied, len(reports.events))
        return {"applied": applied}

    @app.get("/health", tags=["ops"])
    async def health() -> dict[str, Any]:
        pending = None
        if publisher is not None:
            pending = publisher.stats.published
        return {"ok": True, "published": pending}

    return app
