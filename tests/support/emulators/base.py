"""What every SaaS emulator shares: an aiohttp server on loopback with the vendor's rate
limit, latency, injectable faults and a log of what it answered.

A vendor's emulator subclasses :class:`Emulator`, adds the routes of the endpoints our
connector uses (written from the vendor's public documentation: auth, status codes, error
bodies, batch semantics), and overrides :meth:`Emulator.throttled` to answer a 429 the way
the vendor does (``Retry-After`` or its own headers). The state it keeps is the vendor's
view of the account (contacts, lists, notes…), which tests read to compare with what the
destination's docs page promises.

Order of the middleware for every request: record → simultaneous-connection cap
(``concurrency``) → connection reset → stall → latency →
fault status → authentication (the subclass's :meth:`Emulator.authorised`) → rate limit
(:meth:`Emulator.limit_for`, ``limit`` unless overridden) →
the route. Faults last for ``count`` requests or until ``until`` (``time.monotonic()``).

Run it in the test's event loop (``await emu.start()`` / ``await emu.stop()``) or, for a
subprocess client and the benchmarks, in a thread of its own (``with emu.running():``).
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

__all__ = ["Emulator", "Fault", "Hit", "WindowLimit"]

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@dataclass(frozen=True, slots=True)
class Hit:
    """One request as the emulator answered it."""

    method: str
    path: str
    status: int  # 0: connection reset without an answer
    at: float  # time.monotonic() on arrival


@dataclass(slots=True)
class Fault:
    """An injected failure: ``status`` (5xx/429…), ``stall`` seconds, or ``reset``."""

    status: int | None = None
    stall: float = 0.0
    reset: bool = False
    count: int | None = None
    until: float | None = None
    retry_after: float | None = None
    path: str | None = None
    """Only requests whose path contains this (``None``: every request)."""

    def active(self, now: float) -> bool:
        if self.until is not None and now >= self.until:
            return False
        return self.count is None or self.count > 0

    def applies(self, path: str) -> bool:
        return self.path is None or self.path in path

    def spend(self) -> None:
        if self.count is not None:
            self.count -= 1


class WindowLimit:
    """At most ``limit`` requests in any sliding ``window`` seconds (a vendor's quota)."""

    def __init__(self, limit: int, window: float) -> None:
        self.limit = limit
        self.window = window
        self._times: deque[float] = deque()

    def admit(self, now: float) -> float | None:
        """``None`` if admitted, else the seconds until a slot frees up."""
        while self._times and now - self._times[0] >= self.window:
            self._times.popleft()
        if len(self._times) >= self.limit:
            return self.window - (now - self._times[0])
        self._times.append(now)
        return None

    @property
    def remaining(self) -> int:
        return max(0, self.limit - len(self._times))


@dataclass
class Emulator:
    """Base of the vendor emulators; see the module docstring."""

    latency: float = 0.0
    limit: WindowLimit | None = None
    concurrency: int | None = None
    """At most this many requests in flight (a vendor's simultaneous-connection cap);
    beyond it the request is answered :meth:`throttled` at once."""
    hits: list[Hit] = field(default_factory=list)
    faults: list[Fault] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.url = ""
        self.in_flight = 0
        self.peak_in_flight = 0
        """The most requests ever in flight at once (what a client kept busy)."""
        self.peaks: dict[str, int] = {}
        """Per ``"METHOD /path"``: the most requests to it in flight at once."""
        self._routes: dict[str, int] = {}
        self.connection_seconds = 0.0
        """Seconds of requests in flight, summed (connection-seconds: over the wall time,
        the connections kept busy on average)."""
        self._runner: web.AppRunner | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None

    # ---- to override -------------------------------------------------------------------

    def routes(self, app: web.Application) -> None:
        """Add the vendor's routes."""
        raise NotImplementedError

    def authorised(self, request: web.Request) -> bool:
        """Whether the request carries the vendor's credentials."""
        return True

    def limit_for(self, request: web.Request) -> WindowLimit | None:
        """The quota this request counts against (override for per-endpoint quotas)."""
        return self.limit

    def unauthorised(self) -> web.StreamResponse:
        return web.json_response({"message": "unauthorised"}, status=401)

    def throttled(self, retry_after: float) -> web.StreamResponse:
        """The vendor's 429 (override for vendor headers and body)."""
        return web.json_response(
            {"message": "too many requests"},
            status=429,
            headers={"Retry-After": str(max(1, round(retry_after + 0.499)))},
        )

    def failed(self, fault: Fault) -> web.StreamResponse:
        headers = {}
        if fault.retry_after is not None:
            headers["Retry-After"] = str(fault.retry_after)
        return web.json_response(
            {"message": "injected failure"}, status=fault.status or 500, headers=headers
        )

    # ---- observation -----------------------------------------------------------------

    def writes(self) -> int:
        """Requests that could change state (not GET/HEAD) and were answered 2xx."""
        return sum(
            1 for h in self.hits if h.method not in {"GET", "HEAD"} and 200 <= h.status < 300
        )

    def throttled_count(self) -> int:
        return sum(1 for h in self.hits if h.status == 429)

    def max_rate(self, window: float = 1.0) -> float:
        """The most requests seen in any ``window`` seconds, per second."""
        times = sorted(h.at for h in self.hits)
        best, start = 0, 0
        for end, t in enumerate(times):
            while t - times[start] > window:
                start += 1
            best = max(best, end - start + 1)
        return best / window

    # ---- faults ----------------------------------------------------------------------

    def fail_with(
        self,
        status: int,
        *,
        count: int | None = None,
        seconds: float | None = None,
        retry_after: float | None = None,
        path: str | None = None,
    ) -> None:
        until = None if seconds is None else time.monotonic() + seconds
        self.faults.append(
            Fault(status=status, count=count, until=until, retry_after=retry_after, path=path)
        )

    def stall(
        self,
        seconds: float,
        *,
        count: int | None = None,
        for_seconds: float | None = None,
        path: str | None = None,
    ) -> None:
        until = None if for_seconds is None else time.monotonic() + for_seconds
        self.faults.append(Fault(stall=seconds, count=count, until=until, path=path))

    def reset_connections(
        self, *, count: int | None = None, seconds: float | None = None, path: str | None = None
    ) -> None:
        until = None if seconds is None else time.monotonic() + seconds
        self.faults.append(Fault(reset=True, count=count, until=until, path=path))

    def heal(self) -> None:
        self.faults.clear()

    # ---- serving ---------------------------------------------------------------------

    @web.middleware
    async def _middleware(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        now = time.monotonic()
        index = len(self.hits)
        self.hits.append(Hit(request.method, request.path, 0, now))
        if self.concurrency is not None and self.in_flight >= self.concurrency:
            refused = self.throttled(0.0)
            self.hits[index] = Hit(request.method, request.path, refused.status, now)
            return refused
        self.in_flight += 1
        self.peak_in_flight = max(self.peak_in_flight, self.in_flight)
        route = f"{request.method} {request.path}"
        self._routes[route] = self._routes.get(route, 0) + 1
        self.peaks[route] = max(self.peaks.get(route, 0), self._routes[route])
        try:
            return await self._serve(request, handler, index, now)
        finally:
            self.in_flight -= 1
            self._routes[route] -= 1
            self.connection_seconds += time.monotonic() - now

    async def _serve(
        self, request: web.Request, handler: Handler, index: int, now: float
    ) -> web.StreamResponse:
        self.faults[:] = [f for f in self.faults if f.active(now)]
        for fault in list(self.faults):
            if not fault.applies(request.path):
                continue
            if fault.reset:
                fault.spend()
                assert request.transport is not None
                request.transport.close()
                raise ConnectionResetError("injected reset")
            if fault.stall:
                fault.spend()
                # The request has arrived whole: a client that gives up meanwhile leaves a
                # write that may still land (what a lost answer looks like).
                await request.read()
                await asyncio.sleep(fault.stall)  # sleep-ok: an injected stall
        if self.latency:
            await asyncio.sleep(self.latency)  # sleep-ok: the configured latency
        response: web.StreamResponse | None = None
        for fault in self.faults:
            if (
                fault.status is not None
                and fault.applies(request.path)
                and fault.active(time.monotonic())
            ):
                fault.spend()
                response = self.failed(fault)
                break
        if response is None and not self.authorised(request):
            response = self.unauthorised()
        limit = self.limit_for(request)
        if response is None and limit is not None:
            wait = limit.admit(time.monotonic())
            if wait is not None:
                response = self.throttled(wait)
        if response is None:
            try:
                response = await handler(request)
            except web.HTTPException as exc:  # answered as a plain response (not returned)
                response = web.Response(
                    status=exc.status, body=exc.body, content_type=exc.content_type
                )
        self.hits[index] = Hit(request.method, request.path, response.status, now)
        return response

    def _app(self) -> web.Application:
        app = web.Application(middlewares=[self._middleware], client_max_size=64 * 1024**2)
        self.routes(app)
        return app

    async def start(self, port: int = 0) -> str:
        self._runner = web.AppRunner(self._app(), access_log=None, handle_signals=False)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", port)
        await site.start()
        server = site._server
        assert server is not None
        sockets = getattr(server, "sockets", None) or []
        self.url = f"http://127.0.0.1:{sockets[0].getsockname()[1]}"
        return self.url

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    @contextlib.contextmanager
    def running(self, port: int = 0) -> Iterator[str]:
        """Serve from a thread with its own event loop (for subprocess clients, benches)."""
        loop = asyncio.new_event_loop()
        started = threading.Event()

        def serve() -> None:
            asyncio.set_event_loop(loop)
            loop.run_until_complete(self.start(port))
            started.set()
            loop.run_forever()
            loop.run_until_complete(self.stop())
            loop.close()

        thread = threading.Thread(target=serve, name=f"{type(self).__name__}-server", daemon=True)
        thread.start()
        if not started.wait(10):
            raise RuntimeError("emulator did not start")
        self._loop, self._thread = loop, thread
        try:
            yield self.url
        finally:
            loop.call_soon_threadsafe(loop.stop)
            thread.join(10)

    def call(self, fn: Callable[[], Any]) -> Any:
        """Run ``fn`` on the emulator's loop thread (to read or change its state safely);
        at once when already there (a driver's snapshot reading the state)."""
        if self._loop is None or threading.current_thread() is self._thread:
            return fn()
        future: asyncio.Future[Any] = asyncio.run_coroutine_threadsafe(_call(fn), self._loop)  # type: ignore[assignment]
        return future.result(10)


async def _call(fn: Callable[[], Any]) -> Any:
    return fn()


class Driver:
    """How the shared contract suite drives one destination through its emulator.

    A vendor module exposes one subclass as ``DRIVER``; the suite builds the emulator,
    writes the destination's TOML table (``config``) with the API key in the environment
    variable ``key_env``, pushes, then compares :meth:`snapshot` (the vendor's state,
    normalised) with :meth:`expected` (what the docs page promises for a ``crm export``).
    """

    type: str = ""
    key_env: str = ""
    key: str = ""
    rate_limit: float | None = None
    """The vendor's documented requests per second (the emulator's quota when
    rate-limited); ``None``: no request-rate quota (none, or a connection cap)."""

    def make(self, *, latency: float = 0.0, rate_limited: bool = True) -> Emulator:
        raise NotImplementedError

    @contextlib.asynccontextmanager
    async def serving(self, environ: Any) -> AsyncIterator[Any]:
        """An emulator without its quota, started on this loop, with the API key set in
        ``environ`` (pytest's ``monkeypatch``): a vendor test's fixture."""
        environ.setenv(self.key_env, self.key)
        emulator = self.make(rate_limited=False)
        await emulator.start()
        try:
            yield emulator
        finally:
            await emulator.stop()

    def config(self, emulator: Emulator) -> dict[str, Any]:
        raise NotImplementedError

    def snapshot(self, emulator: Emulator) -> dict[str, Any]:
        raise NotImplementedError

    def expected(self, export: dict[str, Any], config: dict[str, Any]) -> dict[str, Any]:
        raise NotImplementedError
