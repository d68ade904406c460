"""The web console: server-rendered pages (Jinja2) with htmx, behind a login.

Every route but ``/login`` and ``/static`` needs a signed-in user with a role high
enough for it (:class:`~proca_sync.web.accounts.Role`); every POST carries the session's
CSRF token. The session is a signed cookie (itsdangerous) holding the user name and the
CSRF token: HttpOnly, SameSite=Strict, Secure when the request came over https. The role
is read from the account store on each request, so a changed role or a removed user takes
effect at once. Log lines carry user names, ids and outcomes only.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import hmac
import logging
import math
import secrets
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import orjson
from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from fastapi.staticfiles import StaticFiles
from fastapi.templating import Jinja2Templates
from itsdangerous import BadSignature, URLSafeTimedSerializer
from sqlalchemy import exc as sa_exc
from sqlalchemy import func, select
from starlette.concurrency import run_in_threadpool

from proca_sync.consumer.browse import summarize
from proca_sync.consumer.parking import ParkingStore, parked_messages, retry_parked
from proca_sync.crm import backend_from_url
from proca_sync.crm.sql import SqlBackend
from proca_sync.crm.sql.changelog import load_erasure_key
from proca_sync.crm.sql.schema import (
    actions,
    consents,
    contact_keys,
    contacts,
    email_status_history,
)
from proca_sync.crypto import Keystore, decrypt_message
from proca_sync.destinations.state import LedgerState, registered
from proca_sync.engine import Engine
from proca_sync.errors import ConfigError, ProcaSyncError
from proca_sync.messages.decode import decode
from proca_sync.sync.contacts import normalise_email
from proca_sync.sync.model import Options
from proca_sync.web.accounts import AccountStore, HashCost, LoginLimiter, Role, User
from proca_sync.web.history import SAMPLE_SECONDS, History, Sample, read_consumers
from proca_sync.web.moderation import add_moderation_routes

__all__ = ["WebSettings", "create_app"]

log = logging.getLogger("proca_sync.web")

HERE = Path(__file__).parent
SESSION_COOKIE = "proca_session"
LOGIN_COOKIE = "proca_login"
"""The anonymous CSRF token lives in its own cookie: a visit that arrives from another site
(no SameSite=Strict cookie sent) then never overwrites a signed-in session."""
SESSION_SALT = "proca-sync-web-session"


@dataclass(frozen=True, slots=True)
class WebSettings:
    """What the console reads and where; ``secret`` signs the session cookies."""

    accounts_url: str
    secret: bytes = field(repr=False)
    parked_url: str | None = None
    crm_url: str | None = None
    metrics_url: str | None = None
    pipeline_url: str | None = None
    pipeline_secrets: Path | None = None
    keys: Path | None = None
    erasure_key: Path | None = None
    sample_seconds: float = SAMPLE_SECONDS
    """How often the dashboard's history reads the consumers and destinations."""
    page_size: int = 50
    session_hours: float = 12.0
    login_attempts: int = 5
    login_window: float = 300.0
    hash_cost: HashCost = field(default_factory=HashCost)


class LoginRequiredError(Exception):
    """No signed-in user: the page answers with the login form."""


class ForbiddenError(Exception):
    """The user's role is too low, or the CSRF token is wrong."""

    def __init__(self, why: str) -> None:
        super().__init__(why)
        self.why = why


class NotFoundError(Exception):
    """No such parked message, contact or destination."""


@dataclass(slots=True)
class Session:
    csrf: str
    user: str | None = None
    changed: bool = False


def _utc(epoch: float | None) -> str:
    if epoch is None:
        return "-"
    return dt.datetime.fromtimestamp(epoch, dt.UTC).strftime("%Y-%m-%d %H:%M:%S")


def _page_count(total: int, size: int) -> int:
    return max(1, math.ceil(total / size))


def create_app(settings: WebSettings) -> FastAPI:
    """The console's ASGI app; opens the account store (:class:`ConfigError` if unusable)."""
    accounts = AccountStore(settings.accounts_url, cost=settings.hash_cost)
    accounts.open_sync()
    limiter = LoginLimiter(attempts=settings.login_attempts, window=settings.login_window)
    signer = URLSafeTimedSerializer(settings.secret, salt=SESSION_SALT)
    max_age = int(settings.session_hours * 3600)
    templates = Jinja2Templates(directory=str(HERE / "templates"))
    templates.env.filters["utc"] = _utc
    stores: dict[str, Any] = {}
    history = History(settings.accounts_url, interval=settings.sample_seconds)
    history.open_sync()
    metrics_urls = [u.strip() for u in (settings.metrics_url or "").split(",") if u.strip()]

    def parking() -> ParkingStore | None:
        if settings.parked_url is None:
            return None
        if "parking" not in stores:
            store = ParkingStore(settings.parked_url)
            store.open_sync()
            stores["parking"] = store
        return stores["parking"]  # type: ignore[no-any-return]

    def crm() -> SqlBackend | None:
        if settings.crm_url is None:
            return None
        if "crm" not in stores:
            backend = SqlBackend(settings.crm_url)
            backend.open_sync()
            stores["crm"] = backend
        return stores["crm"]  # type: ignore[no-any-return]

    def keystore() -> Keystore | None:
        return None if settings.keys is None else Keystore.load(settings.keys)

    # ---- session, login and CSRF --------------------------------------------------------

    def session_of(request: Request) -> Session:
        cached = getattr(request.state, "session", None)
        if isinstance(cached, Session):
            return cached
        session: Session | None = None
        for name in (SESSION_COOKIE, LOGIN_COOKIE):
            raw = request.cookies.get(name)
            if not raw:
                continue
            try:
                data = signer.loads(raw, max_age=max_age)
            except BadSignature:
                continue
            if isinstance(data, dict) and isinstance(data.get("c"), str):
                user = data.get("u") if name == SESSION_COOKIE else None
                if name == SESSION_COOKIE and not isinstance(user, str):
                    continue
                session = Session(csrf=data["c"], user=user if isinstance(user, str) else None)
                break
        if session is None:
            session = Session(csrf=secrets.token_urlsafe(32), changed=True)
        request.state.session = session
        return session

    async def guard(request: Request) -> None:
        """App-wide: every POST must carry the session's CSRF token (form or header)."""
        session = session_of(request)
        if request.method in {"GET", "HEAD", "OPTIONS"}:
            return
        sent = request.headers.get("x-csrf-token")
        if sent is None:
            form = await request.form()
            value = form.get("csrf")
            sent = value if isinstance(value, str) else None
        if sent is None or not hmac.compare_digest(sent, session.csrf):
            log.warning("csrf token refused", extra={"fields": {"path": request.url.path}})
            raise ForbiddenError("the form expired or did not come from this console")

    def current_user(request: Request) -> User:
        session = session_of(request)
        if session.user is None:
            raise LoginRequiredError
        user = accounts.user(session.user)
        if user is None:  # removed since
            raise LoginRequiredError
        request.state.user = user
        return user

    def require(role: Role) -> Callable[[Request], User]:
        def dependency(request: Request) -> User:
            user = current_user(request)
            if not user.role.allows(role):
                log.warning(
                    "role refused",
                    extra={"fields": {"user": user.name, "path": request.url.path}},
                )
                raise ForbiddenError(f"this needs the {role.value} role")
            return user

        return dependency

    viewer = Depends(require(Role.VIEWER))
    moderator = Depends(require(Role.MODERATOR))
    admin = Depends(require(Role.ADMIN))

    @contextlib.asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        sampler = asyncio.create_task(sample_forever(), name="dashboard-sampler")
        yield
        sampler.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await sampler
        history.close()
        accounts.close()
        for store in stores.values():
            store.engine.dispose()

    app = FastAPI(
        lifespan=lifespan,
        title="proca-sync console",
        dependencies=[Depends(guard)],
        docs_url=None,
        redoc_url=None,
        openapi_url=None,
    )
    app.mount("/static", StaticFiles(directory=str(HERE / "static")), name="static")

    @app.middleware("http")
    async def cookies_and_headers(
        request: Request, call_next: Callable[[Request], Awaitable[Response]]
    ) -> Response:
        response = await call_next(request)
        session = getattr(request.state, "session", None)
        if isinstance(session, Session) and session.changed:
            secure = request.url.scheme == "https"
            payload: dict[str, str] = {"c": session.csrf}
            name = LOGIN_COOKIE
            if session.user is not None:
                payload["u"] = session.user
                name = SESSION_COOKIE
            response.set_cookie(
                name, signer.dumps(payload), max_age=max_age, path="/", httponly=True,
                samesite="strict", secure=secure,
            )  # fmt: skip
            for stale in {SESSION_COOKIE, LOGIN_COOKIE} - {name}:
                if stale in request.cookies:
                    response.delete_cookie(
                        stale, path="/", httponly=True, samesite="strict", secure=secure
                    )
        headers = response.headers
        headers.setdefault(
            "Content-Security-Policy",
            "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self'; "
            "frame-ancestors 'none'; form-action 'self'; base-uri 'none'",
        )
        headers.setdefault("X-Frame-Options", "DENY")
        headers.setdefault("X-Content-Type-Options", "nosniff")
        headers.setdefault("Referrer-Policy", "no-referrer")
        if not request.url.path.startswith("/static/"):
            headers.setdefault("Cache-Control", "no-store")
        return response

    def render(
        request: Request, name: str, status_code: int = 200, **context: Any
    ) -> HTMLResponse:
        session = session_of(request)
        context.setdefault("user", getattr(request.state, "user", None))
        context["csrf"] = session.csrf
        context["Role"] = Role
        return templates.TemplateResponse(request, name, context, status_code=status_code)

    @app.exception_handler(LoginRequiredError)
    async def _login_required(request: Request, _exc: LoginRequiredError) -> Response:
        if request.headers.get("hx-request"):
            return Response(status_code=401, headers={"HX-Redirect": "/login"})
        if request.method == "GET":
            return RedirectResponse("/login", status_code=303)
        return render(request, "error.html", 401, message="Please sign in first.")

    @app.exception_handler(ProcaSyncError)
    async def _unavailable(request: Request, exc: ProcaSyncError) -> Response:
        log.warning(
            "store unavailable",
            extra={"fields": {"path": request.url.path, "error": type(exc).__name__}},
        )
        return render(request, "error.html", 503, message=f"unavailable: {type(exc).__name__}")

    @app.exception_handler(sa_exc.SQLAlchemyError)
    async def _database(request: Request, exc: sa_exc.SQLAlchemyError) -> Response:
        log.warning(
            "database error",
            extra={"fields": {"path": request.url.path, "error": type(exc).__name__}},
        )
        return render(request, "error.html", 503, message="a database is unavailable")

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> Response:
        # Names the fields only: the rejected values may be personal data.
        fields = sorted({str(error["loc"][-1]) for error in exc.errors() if error.get("loc")})
        return render(request, "error.html", 400, message=f"invalid {', '.join(fields)}")

    @app.exception_handler(NotFoundError)
    async def _not_found(request: Request, exc: NotFoundError) -> Response:
        return render(request, "error.html", 404, message=str(exc))

    @app.exception_handler(ForbiddenError)
    async def _forbidden(request: Request, exc: ForbiddenError) -> Response:
        return render(request, "error.html", 403, message=exc.why)

    # ---- login ------------------------------------------------------------------------

    @app.get("/login", response_class=HTMLResponse)
    async def login_form(request: Request) -> Response:
        return render(request, "login.html")

    @app.post("/login", response_class=HTMLResponse)
    async def login(request: Request) -> Response:
        form = await request.form()
        name = str(form.get("username") or "").strip().lower()
        password = str(form.get("password") or "")
        client = request.client.host if request.client else "unknown"
        keys = (f"user:{name}", f"addr:{client}")
        if limiter.blocked(*keys):
            log.warning("login rate-limited", extra={"fields": {"user": name[:64]}})
            return render(
                request, "login.html", 429, error="Too many attempts; wait a few minutes."
            )
        user = await run_in_threadpool(accounts.authenticate, name, password)
        if user is None:
            limiter.failed(*keys)
            log.info("login refused", extra={"fields": {"user": name[:64]}})
            return render(request, "login.html", 401, error="Wrong name or password.")
        # A fresh token on login: a token seen before signing in is worth nothing after.
        request.state.session = Session(
            csrf=secrets.token_urlsafe(32), user=user.name, changed=True
        )
        log.info("login", extra={"fields": {"user": user.name}})
        return RedirectResponse("/", status_code=303)

    @app.post("/logout")
    async def logout(request: Request) -> Response:
        request.state.session = Session(csrf=secrets.token_urlsafe(32), changed=True)
        return RedirectResponse("/login", status_code=303)

    # ---- dashboard --------------------------------------------------------------------

    def destination_lags() -> dict[str, float]:
        """Each destination's lag in seconds (0 when nothing is pending)."""
        backend = crm()
        if backend is None:
            return {}
        return {
            name: LedgerState(backend, name).status().lag or 0.0
            for name in registered(backend)
        }

    async def take_sample() -> Sample:
        """Read the consumers and the destinations once (never raises)."""
        reading, error = None, None
        if metrics_urls:
            try:
                reading = await read_consumers(metrics_urls)
            except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
                error = f"consumer metrics unreachable ({type(exc).__name__})"
        else:
            error = "no consumer metrics URL configured (--metrics)"
        try:
            lags = await run_in_threadpool(destination_lags)
        except (ProcaSyncError, sa_exc.SQLAlchemyError) as exc:
            log.warning(
                "destination lag unreadable", extra={"fields": {"error": type(exc).__name__}}
            )
            lags = {}
        return Sample(at=time.time(), reading=reading, lags=lags, error=error)

    async def sample_forever() -> None:
        # Runs as long as the server: a failed sample is logged (its error type only) and
        # the next one is taken on time; the charts show the gap.
        while True:
            try:
                await run_in_threadpool(history.record, await take_sample())
            except Exception as exc:  # the sampler must outlive any one failure
                log.warning(
                    "sample not stored", extra={"fields": {"error": type(exc).__name__}}
                )
            await asyncio.sleep(settings.sample_seconds)

    def live_figures() -> dict[str, Any]:
        latest = history.latest()
        figures: dict[str, Any] = {"source": settings.metrics_url, "error": None, "lags": {}}
        if latest is None:
            figures["error"] = "waiting for the first reading"
            return figures
        figures["lags"] = dict(latest.lags)
        figures["read_at"] = dt.datetime.fromtimestamp(latest.at, dt.UTC).strftime("%H:%M:%S")
        reading = latest.reading
        if reading is None:
            figures["error"] = latest.error
            return figures
        figures.update(
            acked=int(reading.acked), retried=int(reading.retried), parked=int(reading.parked),
            breaker=reading.breaker, rate=history.rate(), depth=reading.depth,
            in_flight=reading.in_flight, connected=reading.connected,
        )  # fmt: skip
        return figures

    @app.get("/", response_class=HTMLResponse)
    async def dashboard(request: Request, user: User = viewer) -> Response:
        store = parking()
        by_reason = await run_in_threadpool(store.counts_by_reason) if store else {}
        return render(
            request, "dashboard.html", live=live_figures(), by_reason=by_reason,
            sample_seconds=settings.sample_seconds,
        )  # fmt: skip

    @app.get("/dashboard/live", response_class=HTMLResponse)
    async def dashboard_live(request: Request, user: User = viewer) -> Response:
        return render(request, "_live.html", live=live_figures())

    @app.get("/dashboard/history")
    async def dashboard_history(request: Request, user: User = viewer) -> Response:
        """The charts' data over the last hour (see :mod:`proca_sync.web.history`)."""
        return Response(orjson.dumps(history.series()), media_type="application/json")

    # ---- parked messages --------------------------------------------------------------

    def parked_page(
        reason: str | None, since: str | None, until: str | None, page: int
    ) -> tuple[list[dict[str, Any]], int, list[str]]:
        store = parking()
        if store is None:
            return [], 0, []
        table = parked_messages
        where = []
        if reason:
            where.append(table.c.reason == reason)
        if since:
            where.append(table.c.parked_at >= since)
        if until:
            # A bare date includes that whole day.
            where.append(table.c.parked_at < (until + "~" if len(until) == 10 else until))
        columns = [
            table.c.id, table.c.parked_at, table.c.queue, table.c.reason, table.c.attempts,
            table.c.times_parked, table.c.body,
        ]
        with store.engine.connect() as conn:
            total = int(
                conn.execute(select(func.count()).select_from(table).where(*where)).scalar()
                or 0
            )
            rows = conn.execute(
                select(*columns)
                .where(*where)
                # Newest parked first: both filters and this order follow the indexes
                # ix_parked_reason_at / ix_parked_at (reason, parked_at, id).
                .order_by(table.c.parked_at.desc(), table.c.id.desc())
                .limit(settings.page_size)
                .offset((page - 1) * settings.page_size)
            ).all()
            reasons = [str(r) for r in conn.execute(
                select(table.c.reason).distinct().order_by(table.c.reason)
            ).scalars()]
        items = []
        for row in rows:
            summary = summarize(bytes(row.body))
            items.append(
                {
                    "id": row.id, "parked_at": row.parked_at, "queue": row.queue,
                    "reason": row.reason, "attempts": row.attempts,
                    "times_parked": row.times_parked, "action_id": summary.action_id,
                    "kind": summary.kind,
                }
            )  # fmt: skip
        return items, total, reasons

    @app.get("/parked", response_class=HTMLResponse)
    async def parked_list(
        request: Request,
        reason: str | None = None,
        since: str | None = None,
        until: str | None = None,
        page: int = 1,
        user: User = viewer,
    ) -> Response:
        page = max(1, page)
        items, total, reasons = await run_in_threadpool(parked_page, reason, since, until, page)
        return render(
            request, "parked.html", items=items, total=total, reasons=reasons,
            reason=reason or "", since=since or "", until=until or "", page=page,
            pages=_page_count(total, settings.page_size),
            configured=settings.parked_url is not None,
        )  # fmt: skip

    def parked_one(parked_id: int) -> Any:
        store = parking()
        message = store.get(parked_id) if store else None
        if message is None:
            raise NotFoundError(f"no parked message {parked_id}")
        return message

    @app.get("/parked/{parked_id}", response_class=HTMLResponse)
    async def parked_show(request: Request, parked_id: int, user: User = viewer) -> Response:
        message = await run_in_threadpool(parked_one, parked_id)
        return render(
            request, "parked_one.html", message=message, summary=summarize(message.body),
            headers=orjson.dumps(message.headers, option=orjson.OPT_INDENT_2).decode(),
        )  # fmt: skip

    @app.post("/parked/{parked_id}/reveal", response_class=HTMLResponse)
    async def parked_reveal(request: Request, parked_id: int, user: User = admin) -> Response:
        message = await run_in_threadpool(parked_one, parked_id)
        await run_in_threadpool(accounts.audit, user.name, "reveal_payload", f"parked:{parked_id}")
        log.info(
            "payload revealed", extra={"fields": {"user": user.name, "parked_id": parked_id}}
        )
        try:
            decoded = decrypt_message(decode(message.body), keystore())
            payload = decoded.model_dump_json(indent=2, by_alias=True)
            note = None
        except (ProcaSyncError, ValueError) as exc:
            payload = message.body.decode("utf-8", errors="replace")
            note = f"shown as received: {type(exc).__name__}"
        return render(
            request, "parked_payload.html", message=message, payload=payload, note=note
        )

    async def selected_ids(request: Request) -> list[int]:
        form = await request.form()
        ids = []
        for value in form.getlist("ids"):
            if isinstance(value, str) and value.isdigit():
                ids.append(int(value))
        return ids

    @app.post("/parked/retry", response_class=HTMLResponse)
    async def parked_retry(request: Request, user: User = moderator) -> Response:
        ids = await selected_ids(request)
        store = parking()
        if store is None or settings.crm_url is None:
            raise ForbiddenError("retry needs both --parked and --crm")
        backend = backend_from_url(settings.crm_url)
        engine = Engine(backend=backend, keystore=keystore(), options=Options())
        await backend.open()
        try:
            results = await retry_parked(store, engine, ids)
        except ProcaSyncError as exc:
            return render(request, "error.html", 503, message=f"CRM unavailable: {exc}")
        finally:
            await backend.close()
        await run_in_threadpool(
            accounts.audit, user.name, "retry_parked", ",".join(map(str, ids))[:128]
        )
        log.info("parked retried", extra={"fields": {"user": user.name, "count": len(ids)}})
        return render(request, "retried.html", results=results)

    @app.post("/parked/drop", response_class=HTMLResponse)
    async def parked_drop(request: Request, user: User = admin) -> Response:
        ids = await selected_ids(request)
        store = parking()
        dropped = [i for i in ids if store is not None and store.delete(i)]
        await run_in_threadpool(
            accounts.audit, user.name, "drop_parked", ",".join(map(str, dropped))[:128]
        )
        log.info("parked dropped", extra={"fields": {"user": user.name, "count": len(dropped)}})
        return RedirectResponse("/parked", status_code=303)

    # ---- contacts ---------------------------------------------------------------------

    def contact_page(query: str, page: int) -> tuple[list[Any], int]:
        backend = crm()
        if backend is None:
            return [], 0
        admitted = contacts.c.admitted.is_(True)
        columns = [
            contacts.c.id, contacts.c.email, contacts.c.first_name, contacts.c.last_name,
            contacts.c.country, contacts.c.subscribed, contacts.c.email_status,
        ]  # fmt: skip
        with backend.engine.connect() as conn:
            if query:
                kind, value = ("email", normalise_email(query)) if "@" in query else (
                    "ref", query
                )
                rows = conn.execute(
                    select(*columns)
                    .join(contact_keys, contact_keys.c.contact_id == contacts.c.id)
                    .where(admitted, contact_keys.c.kind == kind, contact_keys.c.value == value)
                ).all()
                return list(rows), len(rows)
            total = int(
                conn.execute(select(func.count()).select_from(contacts).where(admitted)).scalar()
                or 0
            )
            rows = conn.execute(
                select(*columns)
                .where(admitted)
                .order_by(contacts.c.id.desc())
                .limit(settings.page_size)
                .offset((page - 1) * settings.page_size)
            ).all()
            return list(rows), total

    @app.get("/contacts", response_class=HTMLResponse)
    async def contact_list(
        request: Request, q: str = "", page: int = 1, user: User = moderator
    ) -> Response:
        page = max(1, page)
        rows, total = await run_in_threadpool(contact_page, q.strip(), page)
        return render(
            request, "contacts.html", rows=rows, total=total, q=q, page=page,
            pages=_page_count(total, settings.page_size), configured=settings.crm_url is not None,
        )  # fmt: skip

    def contact_detail(contact_id: int) -> dict[str, Any]:
        backend = crm()
        if backend is None:
            raise ForbiddenError("no CRM configured (--crm)")
        with backend.engine.connect() as conn:
            row = conn.execute(
                select(contacts).where(contacts.c.id == contact_id, contacts.c.admitted)
            ).first()
            if row is None:
                raise NotFoundError(f"no contact {contact_id}")
            keys = conn.execute(
                select(contact_keys.c.kind, contact_keys.c.value)
                .where(contact_keys.c.contact_id == contact_id)
                .order_by(contact_keys.c.kind, contact_keys.c.value)
            ).all()
            consent_rows = conn.execute(
                select(consents).where(consents.c.contact_id == contact_id)
                .order_by(consents.c.given_at)
            ).all()  # fmt: skip
            statuses = conn.execute(
                select(email_status_history)
                .where(email_status_history.c.contact_id == contact_id)
                .order_by(email_status_history.c.stamp)
            ).all()
            action_rows = conn.execute(
                select(
                    actions.c.action_id, actions.c.action_type, actions.c.campaign,
                    actions.c.created_at, actions.c.testing,
                )
                .where(actions.c.contact_id == contact_id)
                .order_by(actions.c.created_at.desc())
                .limit(200)
            ).all()  # fmt: skip
        return {
            "contact": row, "keys": keys, "consents": consent_rows, "statuses": statuses,
            "actions": action_rows,
        }  # fmt: skip

    @app.get("/contacts/{contact_id}", response_class=HTMLResponse)
    async def contact_show(request: Request, contact_id: int, user: User = moderator) -> Response:
        detail = await run_in_threadpool(contact_detail, contact_id)
        return render(request, "contact.html", **detail)

    @app.get("/contacts/{contact_id}/forget", response_class=HTMLResponse)
    async def forget_confirm(request: Request, contact_id: int, user: User = admin) -> Response:
        detail = await run_in_threadpool(contact_detail, contact_id)
        return render(request, "forget.html", contact=detail["contact"], error=None)

    def erase(contact_id: int) -> int | None:
        backend = crm()
        if backend is None or settings.erasure_key is None:
            raise ForbiddenError("erasure needs --crm and --erasure-key")
        key = load_erasure_key(settings.erasure_key, create=True)
        if key is not None and backend.tombstones is None:
            backend.attach_erasure_key(key)
        with backend.engine.connect() as conn:
            found = conn.execute(
                select(contact_keys.c.kind, contact_keys.c.value)
                .where(contact_keys.c.contact_id == contact_id)
                .order_by(contact_keys.c.kind)
            ).first()
        if found is None:
            return None
        if found.kind == "email":
            return backend.forget_sync(email=found.value)
        return backend.forget_sync(ref=found.value)

    @app.post("/contacts/{contact_id}/forget", response_class=HTMLResponse)
    async def forget(request: Request, contact_id: int, user: User = admin) -> Response:
        form = await request.form()
        if str(form.get("confirm") or "").strip() != str(contact_id):
            detail = await run_in_threadpool(contact_detail, contact_id)
            return render(
                request, "forget.html", 400, contact=detail["contact"],
                error="Type the contact's number to confirm.",
            )  # fmt: skip
        try:
            tombstone = await run_in_threadpool(erase, contact_id)
        except ConfigError as exc:
            return render(request, "error.html", 500, message=str(exc))
        await run_in_threadpool(accounts.audit, user.name, "forget", f"contact:{contact_id}")
        log.info(
            "contact erased",
            extra={"fields": {"user": user.name, "contact_id": contact_id,
                              "tombstone": tombstone}},
        )  # fmt: skip
        return render(request, "forgotten.html", contact_id=contact_id, tombstone=tombstone)

    # ---- destinations -----------------------------------------------------------------

    def destination_rows() -> list[tuple[Any, list[Any]]]:
        backend = crm()
        if backend is None:
            return []
        out = []
        for name in registered(backend):
            state = LedgerState(backend, name)
            out.append((state.status(), state.parked()[:50]))
        return out

    @app.get("/destinations", response_class=HTMLResponse)
    async def destination_list(request: Request, user: User = viewer) -> Response:
        rows = await run_in_threadpool(destination_rows)
        return render(
            request, "destinations.html", rows=rows, configured=settings.crm_url is not None
        )

    @app.post("/destinations/{name}/retry", response_class=HTMLResponse)
    async def destination_retry(request: Request, name: str, user: User = moderator) -> Response:
        backend = crm()
        if backend is None or name not in await run_in_threadpool(registered, backend):
            raise NotFoundError(f"no destination {name!r}")
        count = await run_in_threadpool(LedgerState(backend, name).retry, None)
        await run_in_threadpool(accounts.audit, user.name, "retry_destination", name[:128])
        log.info("destination retry", extra={"fields": {"user": user.name, "count": count}})
        return RedirectResponse("/destinations", status_code=303)

    # ---- moderation inbox (its own module) --------------------------------------------

    add_moderation_routes(
        app, settings, render=render, moderator=moderator, audit=accounts.audit, stores=stores
    )

    # ---- audit ------------------------------------------------------------------------

    @app.get("/audit", response_class=HTMLResponse)
    async def audit(request: Request, user: User = admin) -> Response:
        entries = await run_in_threadpool(accounts.audit_log, limit=200)
        return render(request, "audit.html", entries=entries)

    return app
