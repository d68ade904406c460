"""A real HTTP CRM on loopback that follows the webhook contract of
:mod:`proca_sync.crm.webhook`, with failures injectable while it runs.

Used by the integration tests and the benchmarks; standard library only
(``http.server.ThreadingHTTPServer`` in a background thread, HTTP/1.1 keep-alive).

Contract it reproduces, for ``POST <any path>`` with a JSON record body:

* ``200 {"status": "applied"}`` — stored; the record is in :meth:`CrmServer.applied_keys`.
* ``409 {"status": "duplicate"}`` — the ``Idempotency-Key`` (else the body's ``key``) is
  already stored: nothing changes. (409, not an idempotent 200, so that tests can see
  that a redelivery was recognised.)
* ``400`` — the body is not a JSON object with a ``key``.
* ``401`` — ``secret`` is set and ``X-Proca-Signature`` is missing or wrong.
* ``422`` — a :meth:`CrmServer.validation_error_for` predicate matched the record. The
  answer *echoes the record's e-mail addresses*, as real CRMs do, so tests can check
  that the client never copies a response body into its errors.
* injected failures (below) — ``fail_with`` statuses with ``Retry-After``, stalls longer
  than the client's timeout, connections reset without an answer.

``GET``/``HEAD`` (the client's ping) answer ``200`` unless a failure is injected.

Failure injection applies to every request (POST and GET) in this order: reset → stall →
latency → ``fail_with`` → (POST only) the contract above. ``count`` limits an injection
to the next *count* requests; ``until`` ends it at that ``time.monotonic()`` instant;
with neither it lasts until :meth:`CrmServer.heal` or :meth:`CrmServer.clear`.

A stalled request is processed normally once the stall is over (a slow CRM that still
commits: the client has given up, its retry gets 409). Stopping the server interrupts
stalls and latency at once: such requests are dropped unanswered and unstored.

Every POST is recorded, whatever the answer, as a :class:`Received` (``seq`` is the arrival
order). It is recorded just *before* the answer is written, so once the client has its
answer :meth:`CrmServer.received` shows it: tests assert without waiting. A stalled
request shows up when its stall ends; :meth:`CrmServer.wait_until` waits on any condition.

API: ``CrmServer(latency=0.0, *, secret=None)`` as a context manager or with
``start()``/``stop()`` (same port again), ``down()`` (a block with the CRM stopped),
``url``; injection: ``fail_with``, ``stall``, ``reset_connections``,
``validation_error_for``, ``heal``; observation: ``received``, ``applied_keys``,
``stored``, ``pings``, ``wait_until``; ``clear`` forgets everything.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import json
import socket
import struct
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import TracebackType
from typing import Any

__all__ = ["CrmServer", "Received"]

RESET = 0
"""``Received.status`` of a request whose connection was reset without an answer."""


@dataclass(frozen=True)
class Received:
    """One POST as the server saw it."""

    seq: int  # arrival order, from 0
    key: str | None
    lane: str | None
    kind: str | None
    payload: dict[str, Any] | None = field(repr=False)
    body: bytes = field(repr=False)
    headers: dict[str, str] = field(repr=False)  # lower-cased names
    status: int  # the status answered, RESET (0) when dropped
    arrived: float  # time.monotonic() when the request was read
    answered: float  # time.monotonic() just before answering (or dropping the socket)


@dataclass
class _Injection:
    remaining: int | None
    until: float | None

    def take(self) -> bool:
        """True when this injection applies to the current request (and consume it)."""
        if self.until is not None and time.monotonic() >= self.until:
            return False
        if self.remaining is not None:
            if self.remaining <= 0:
                return False
            self.remaining -= 1
        return True


@dataclass
class _Failure(_Injection):
    status: int = 503
    retry_after: str | None = None


@dataclass
class _Stall(_Injection):
    seconds: float = 0.0


class _Server(ThreadingHTTPServer):
    # Joined on close, so that no handler thread (nor its socket) outlives the server.
    daemon_threads = False
    crm: CrmServer


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "ProcaTestCRM/1"
    # An idle keep-alive connection is closed after this long (stop() closes it sooner).
    timeout = 30
    # Headers and body go out in separate writes: without this, Nagle's algorithm and the
    # client's delayed ACK add ~40 ms to each answer.
    disable_nagle_algorithm = True
    server: _Server

    def setup(self) -> None:
        super().setup()
        self.server.crm._track(self.connection)

    def finish(self) -> None:
        try:
            super().finish()
        finally:
            self.server.crm._untrack(self.connection)

    def log_message(self, format: str, *args: Any) -> None:
        return None  # quiet: pytest shows stderr of failing tests only, keep it useful

    def do_GET(self) -> None:
        self.server.crm._handle(self, post=False)

    def do_HEAD(self) -> None:
        self.server.crm._handle(self, post=False)

    def do_POST(self) -> None:
        self.server.crm._handle(self, post=True)

    def answer(
        self, status: int, body: dict[str, Any], headers: dict[str, str] | None = None
    ) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)
        self.wfile.flush()

    def reset(self) -> None:
        """Drop the connection with a TCP reset, without any answer."""
        self.close_connection = True
        with contextlib.suppress(OSError):
            self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            self.connection.close()


class CrmServer:
    """A webhook CRM on ``127.0.0.1``; a context manager (``with CrmServer() as crm``).

    ``latency`` (seconds) delays every answer; ``secret`` makes the server check the
    ``X-Proca-Signature`` of each POST. ``url`` stays the same across ``stop()`` and
    ``start()``, so a test can take the CRM down and bring it back.
    """

    def __init__(self, latency: float = 0.0, *, secret: str | None = None) -> None:
        self.latency = latency
        self.secret = secret.encode() if secret else None
        self._lock = threading.Condition()
        self._stopping = threading.Event()
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None
        self._port = 0
        self._connections: set[socket.socket] = set()
        self._received: list[Received] = []
        self._stored: dict[str, dict[str, Any]] = {}
        self._seq = 0
        self._pings = 0
        self._failure: _Failure | None = None
        self._stall: _Stall | None = None
        self._resets = 0
        self._validators: list[Callable[[dict[str, Any]], bool]] = []

    # ---- lifecycle --------------------------------------------------------------------

    @property
    def url(self) -> str:
        if not self._port:
            raise RuntimeError("CrmServer was never started")
        return f"http://127.0.0.1:{self._port}/crm"

    @property
    def running(self) -> bool:
        return self._server is not None

    def start(self) -> CrmServer:
        """Listen (again, on the same port after a ``stop()``) and serve in a thread."""
        if self._server is not None:
            return self
        self._stopping.clear()
        server = _Server(("127.0.0.1", self._port), _Handler)
        server.crm = self
        self._port = server.server_address[1]
        self._server = server
        self._thread = threading.Thread(
            target=server.serve_forever, kwargs={"poll_interval": 0.05}, name="crm-server"
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop listening, drop open connections and stalled requests, join all threads."""
        server, thread = self._server, self._thread
        if server is None or thread is None:
            return
        self._server = self._thread = None
        self._stopping.set()
        server.shutdown()  # no new connections once this returns
        thread.join()
        with self._lock:
            open_connections = list(self._connections)
        for conn in open_connections:
            # Wakes handler threads blocked reading the next keep-alive request.
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)
        server.server_close()  # joins the handler threads

    @contextlib.contextmanager
    def down(self) -> Iterator[None]:
        """Stopped inside the block (connections refused), serving again after it."""
        self.stop()
        try:
            yield
        finally:
            self.start()

    def __enter__(self) -> CrmServer:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    # ---- failure injection ------------------------------------------------------------

    def fail_with(
        self,
        status: int,
        count: int | None = None,
        until: float | None = None,
        retry_after: float | str | None = None,
    ) -> None:
        """Answer ``status`` (500, 503, 429…) instead of processing requests.

        ``retry_after`` is sent as ``Retry-After``: a number of seconds, or a string
        sent as is (an HTTP-date, see ``email.utils.format_datetime(..., usegmt=True)``).
        """
        value = None
        if retry_after is not None:
            value = retry_after if isinstance(retry_after, str) else f"{retry_after:g}"
        with self._lock:
            self._failure = _Failure(count, until, status=status, retry_after=value)

    def stall(self, seconds: float, count: int | None = None, until: float | None = None) -> None:
        """Hold requests ``seconds`` before processing them (beyond the client's timeout)."""
        with self._lock:
            self._stall = _Stall(count, until, seconds=seconds)

    def reset_connections(self, count: int) -> None:
        """Reset the connection of the next ``count`` requests without answering."""
        with self._lock:
            self._resets = count

    def validation_error_for(self, predicate: Callable[[dict[str, Any]], bool]) -> None:
        """Answer 422 to every record whose JSON payload satisfies ``predicate``."""
        with self._lock:
            self._validators.append(predicate)

    def heal(self) -> None:
        """Remove every injected failure; stored records and history stay."""
        with self._lock:
            self._failure = None
            self._stall = None
            self._resets = 0
            self._validators.clear()

    def clear(self) -> None:
        """Forget everything: injected failures, stored records and history."""
        with self._lock:
            self.heal()
            self._received.clear()
            self._stored.clear()
            self._seq = 0
            self._pings = 0

    # ---- observation ------------------------------------------------------------------

    def received(self) -> list[Received]:
        """Every POST so far, in arrival order (duplicates and failures included)."""
        with self._lock:
            return sorted(self._received, key=lambda r: r.seq)

    def applied_keys(self) -> list[str]:
        """Keys stored (answered 2xx), in the order they were stored."""
        with self._lock:
            return list(self._stored)

    def stored(self) -> dict[str, dict[str, Any]]:
        """The payload stored for each key."""
        with self._lock:
            return dict(self._stored)

    @property
    def pings(self) -> int:
        with self._lock:
            return self._pings

    def wait_until(self, predicate: Callable[[CrmServer], bool], timeout: float = 5.0) -> None:
        """Block until ``predicate(self)`` holds (re-checked after every request)."""
        deadline = time.monotonic() + timeout
        with self._lock:
            while not predicate(self):
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError("CrmServer.wait_until: condition not met in time")
                self._lock.wait(left)

    # ---- request handling (handler threads) ---------------------------------------------

    def _track(self, conn: socket.socket) -> None:
        with self._lock:
            self._connections.add(conn)
            late = self._stopping.is_set()
        if late:  # accepted just before stop(): do not keep its thread waiting
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)

    def _untrack(self, conn: socket.socket) -> None:
        with self._lock:
            self._connections.discard(conn)
            self._lock.notify_all()

    def _handle(self, handler: _Handler, *, post: bool) -> None:
        body = b""
        if post:
            length = int(handler.headers.get("Content-Length") or 0)
            body = handler.rfile.read(length)
        arrived = time.monotonic()
        with self._lock:
            seq = self._seq
            if post:
                self._seq += 1
            else:
                self._pings += 1
            reset = self._resets > 0
            if reset:
                self._resets -= 1
            stall = self._stall.seconds if self._stall and self._stall.take() else 0.0

        def conclude(
            status: int,
            payload: dict[str, Any] | None = None,
            answer: dict[str, Any] | None = None,
            headers: dict[str, str] | None = None,
        ) -> None:
            # Recorded *before* answering: once the client has its answer, received()
            # already shows the request, so tests can assert without waiting.
            if post:
                self._record(handler, seq, body, payload, status, arrived)
            else:
                with self._lock:
                    self._lock.notify_all()
            if answer is None:
                handler.reset()
            else:
                handler.answer(status, answer, headers)

        if reset:
            return conclude(RESET)
        # Event.wait, not sleep: stop() interrupts it.
        if stall and self._stopping.wait(stall):
            return conclude(RESET)
        if self.latency and self._stopping.wait(self.latency):
            return conclude(RESET)
        with self._lock:
            failure = self._failure if self._failure and self._failure.take() else None
        if failure is not None:
            extra = {"Retry-After": failure.retry_after} if failure.retry_after else {}
            return conclude(failure.status, None, {"error": "injected failure"}, extra)
        if not post:
            return conclude(200, None, {"status": "ok"})
        status, payload, answer = self._process(handler, body)
        return conclude(status, payload, answer)

    def _process(
        self, handler: _Handler, body: bytes
    ) -> tuple[int, dict[str, Any] | None, dict[str, Any]]:
        try:
            payload = json.loads(body)
        except ValueError:
            return 400, None, {"error": "body is not JSON"}
        if not isinstance(payload, dict) or not isinstance(payload.get("key"), str):
            return 400, None, {"error": "body is not a record"}
        if self.secret is not None:
            expected = "sha256=" + hmac.new(self.secret, body, hashlib.sha256).hexdigest()
            given = handler.headers.get("X-Proca-Signature") or ""
            if not hmac.compare_digest(expected, given):
                return 401, payload, {"error": "bad signature"}
        key = handler.headers.get("Idempotency-Key") or payload["key"]
        with self._lock:
            validators = list(self._validators)
        if any(check(payload) for check in validators):
            emails = (payload.get("contact") or {}).get("emails")
            return 422, payload, {"error": "validation failed", "rejectedValue": emails}
        with self._lock:
            if key in self._stored:
                return 409, payload, {"status": "duplicate", "key": key}
            # Stored before answering: a record is applied once the CRM has it.
            self._stored[key] = payload
        return 200, payload, {"status": "applied", "key": key}

    def _record(
        self,
        handler: _Handler,
        seq: int,
        body: bytes,
        payload: dict[str, Any] | None,
        status: int,
        arrived: float,
    ) -> None:
        if payload is None:
            with contextlib.suppress(ValueError):
                decoded = json.loads(body)
                payload = decoded if isinstance(decoded, dict) else None
        entry = Received(
            seq=seq,
            key=handler.headers.get("Idempotency-Key") or (payload or {}).get("key"),
            lane=(payload or {}).get("lane"),
            kind=(payload or {}).get("kind"),
            payload=payload,
            body=body,
            headers={name.lower(): value for name, value in handler.headers.items()},
            status=status,
            arrived=arrived,
            # Taken before the answer is written: the client cannot have it any earlier.
            answered=time.monotonic(),
        )
        with self._lock:
            self._received.append(entry)
            self._lock.notify_all()
