"""The HTTP client every SaaS connector shares: rate limit, retries, error translation.

One :class:`ApiClient` per destination holds one aiohttp session and one token bucket set
at the API's documented rate. Each request waits for a token; a 429 pauses the bucket
for the time the API asked (``Retry-After``, or a vendor header read by the connector's
``retry_after`` hook) and is tried again; 5xx answers, timeouts and connection errors are
tried again with exponential backoff and full jitter (``retryable`` narrows the 5xx set
for an API whose 500 may be a validation error, such as CiviCRM's). When the attempts are spent the
request raises :class:`~proca_sync.errors.BackendUnavailableError` and the pusher takes
over (its own backoff and circuit breaker). Any other answer, 4xx included, is returned
to the connector, which knows what the API's error bodies mean.

Error messages name the destination, the method, the path template and the status —
never a URL holding an e-mail, a request body or a response body.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from email.utils import parsedate_to_datetime
from typing import Any

import aiohttp
import orjson

from proca_sync.errors import BackendUnavailableError

__all__ = ["ApiClient", "ApiResponse", "RateLimiter", "parse_retry_after"]

RETRYABLE = frozenset({500, 502, 503, 504})
AUTH_REFUSED = frozenset({401, 403})


class RateLimiter:
    """A token bucket: ``rate`` requests per second on average, bursts up to ``burst``.

    :meth:`pause` holds every request back until a moment the API named (after a 429).
    """

    def __init__(self, rate: float, burst: int = 1, *, clock: Callable[[], float] = time.monotonic):
        if rate <= 0:
            raise ValueError("rate must be positive")
        self.rate = rate
        self.burst = max(1, burst)
        self._clock = clock
        self._tokens = float(self.burst)
        self._stamp = clock()
        self._paused_until = 0.0
        self._lock = asyncio.Lock()

    def pause(self, seconds: float) -> None:
        self._paused_until = max(self._paused_until, self._clock() + max(0.0, seconds))
        self._tokens = 0.0

    async def acquire(self) -> None:
        async with self._lock:  # FIFO: waiters are served in arrival order
            while True:
                now = self._clock()
                if now < self._paused_until:
                    await asyncio.sleep(self._paused_until - now)
                    self._stamp = self._clock()
                    continue
                self._tokens = min(self.burst, self._tokens + (now - self._stamp) * self.rate)
                self._stamp = now
                if self._tokens >= 1.0:
                    self._tokens -= 1.0
                    return
                await asyncio.sleep((1.0 - self._tokens) / self.rate)


def request_rate(destination: object) -> float | None:
    """The requests per second a destination's API client is held to (its configured
    ``rate`` or the connector's default bucket); ``None`` without an HTTP client (the
    files destinations). For the benchmarks and tests that size a push by it."""
    for holder in (destination, getattr(destination, "client", None),
                   getattr(destination, "_client", None)):
        limiter = getattr(holder, "limiter", None)
        if isinstance(limiter, RateLimiter):
            return float(limiter.rate)
    return None


def parse_retry_after(value: str | None) -> float | None:
    """Seconds from an HTTP ``Retry-After`` value (delta-seconds or an HTTP date)."""
    if not value:
        return None
    value = value.strip()
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


@dataclass(frozen=True, slots=True)
class ApiResponse:
    status: int
    headers: Mapping[str, str]
    body: Any = field(repr=False)
    """Parsed JSON, or the text when the answer is not JSON, or ``None`` when empty."""

    @property
    def ok(self) -> bool:
        return 200 <= self.status < 300


def _standard_retry_after(response: ApiResponse) -> float | None:
    return parse_retry_after(response.headers.get("Retry-After"))


@dataclass(slots=True)
class ClientStats:
    requests: int = 0
    throttled: int = 0
    retried: int = 0


class ApiClient:
    """An aiohttp session with the destination's rate limit and retry rules."""

    def __init__(
        self,
        *,
        name: str,
        base_url: str,
        headers: Mapping[str, str],
        limiter: RateLimiter,
        timeout: float = 30.0,
        attempts: int = 4,
        backoff: float = 0.5,
        max_backoff: float = 30.0,
        retry_after: Callable[[ApiResponse], float | None] = _standard_retry_after,
        auth: aiohttp.BasicAuth | None = None,
        retryable: frozenset[int] = RETRYABLE,
    ) -> None:
        self.name = name
        self.base_url = base_url.rstrip("/")
        self.limiter = limiter
        self.stats = ClientStats()
        self._headers = dict(headers)
        self._timeout = aiohttp.ClientTimeout(total=timeout)
        self._attempts = max(1, attempts)
        self._backoff = backoff
        self._max_backoff = max_backoff
        self._retry_after = retry_after
        self._auth = auth
        self._retryable = retryable
        self._session: aiohttp.ClientSession | None = None

    async def open(self) -> None:
        if self._session is None:
            self._session = aiohttp.ClientSession(
                headers=self._headers,
                timeout=self._timeout,
                auth=self._auth,
                json_serialize=lambda value: orjson.dumps(value).decode(),
            )

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    def url(self, path: str) -> str:
        """``path`` under the base URL; an absolute URL (a followed link) is kept."""
        if path.startswith(("http://", "https://")):
            return path
        return f"{self.base_url}/{path.lstrip('/')}"

    async def request(
        self,
        method: str,
        path: str,
        *,
        json: Any = None,
        data: bytes | str | None = None,
        params: Mapping[str, str] | None = None,
        headers: Mapping[str, str] | None = None,
        what: str | None = None,
        raw: bool = False,
        idempotent: bool = True,
    ) -> ApiResponse:
        """Send one request under the rate limit; see the module docstring for retries.

        ``what`` names the request in errors and logs (a path template such as
        ``PUT /lists/{id}/members/{hash}``) when the real path holds personal data.
        ``raw`` keeps the body as bytes (an archive to download).

        ``idempotent=False`` (a POST that creates a record: a note, a submission) sends it
        once: after a 5xx, a timeout or a reset the server may have applied it, so it is
        not sent again here — the caller looks it up before trying again. A 429 (refused
        before any work) is still retried.
        """
        await self.open()
        assert self._session is not None
        label = what or f"{method} {path.split('?', 1)[0]}"
        delay = self._backoff
        last: BackendUnavailableError | None = None
        for attempt in range(1, self._attempts + 1):
            await self.limiter.acquire()
            self.stats.requests += 1
            try:
                async with self._session.request(
                    method, self.url(path), json=json, data=data, params=params, headers=headers
                ) as answer:
                    content = await answer.read()
                    body = content if raw else _body(content, answer)
                    response = ApiResponse(answer.status, answer.headers, body)
            except (TimeoutError, aiohttp.ClientError) as exc:
                last = BackendUnavailableError(
                    f"{self.name}: {label} failed ({type(exc).__name__})"
                )
            else:
                if response.status == 429:
                    self.stats.throttled += 1
                    wait = self._retry_after(response)
                    pause = wait if wait is not None else delay
                    self.limiter.pause(pause)
                    last = BackendUnavailableError(
                        f"{self.name}: {label} rate-limited (429)", retry_after=pause
                    )
                    if attempt < self._attempts:
                        self.stats.retried += 1
                        continue  # the limiter waits out the pause
                    raise last
                if response.status in AUTH_REFUSED:
                    raise BackendUnavailableError(
                        f"{self.name}: {label} refused the credentials ({response.status})"
                    )
                if response.status in self._retryable:
                    last = BackendUnavailableError(
                        f"{self.name}: {label} answered {response.status}",
                        retry_after=self._retry_after(response),
                    )
                else:
                    return response
            if not idempotent:
                break
            if attempt < self._attempts:
                self.stats.retried += 1
                await asyncio.sleep(random.uniform(0, delay))  # full jitter
                delay = min(self._max_backoff, delay * 2)
        assert last is not None
        raise last


def _body(raw: bytes, answer: aiohttp.ClientResponse) -> Any:
    if not raw:
        return None
    if "json" in (answer.content_type or "") or raw[:1] in (b"{", b"["):
        try:
            return orjson.loads(raw)
        except orjson.JSONDecodeError:
            pass
    return raw.decode("utf-8", "replace")
