"""A CRM reached over HTTP: every record is POSTed as JSON to one URL (a webhook).

One request per record, ``Content-Type: application/json``, UTF-8 body::

    {
      "key": "action:1732850:83d1f5ba…",    the message's key (also Idempotency-Key)
      "kind": "action",                     action | email_status | campaign_updated | …
      "lane": "ref:MDWJu2fb…",              ordering key: a lane's records arrive in order
      "contact": {                          null when the message is not about a supporter
        "refs": ["…"],                      contact refs, sorted
        "emails": ["…"],                    normalised e-mail addresses, sorted
        "fields": {"firstName": "…", …},    present, non-empty values only (never blanks)
        "stamp": "…",                       orders the fields above: the newest stamp wins
        "admit": true,                      this message alone makes the contact visible
        "testing": false,                   not a real supporter (``not real``)
        "consent": {"actionId": 1, "optIn": true, "givenAt": "…"} | null,
        "emailStatus": {"status": "…", "changedAt": "…", "stamp": "…", "source": "…"} | null
      },
      "action": {                           null for events without an action
        "actionId": 1732850, "actionType": "register", "campaign": "…",
        "createdAt": "…", "testing": true,
        "version": "…",                     orders differing copies of one action
        "data": {…}                         the action as received (custom fields, tracking…)
      },
      "campaign": {"name": "…", "data": {…}, "stamp": "…"} | null
    }

Every part is a *fact* to merge (see :mod:`proca_sync.sync.records`): newest stamp wins,
sets grow, flags only switch on; so the order of two different lanes does not matter.

Headers: ``Idempotency-Key: <key>``; ``X-Proca-Signature: sha256=<hex>`` — the
HMAC-SHA256 of the exact body bytes with the shared secret — when a secret is configured;
plus the configured ``headers`` (e.g. ``Authorization``).

Answers, translated here into the error tree:

* 2xx → ``"applied"``; 409 → ``"duplicate"`` (the CRM already holds this key);
* 429, 408, 5xx, timeouts, refused or reset connections →
  :class:`~proca_sync.errors.BackendUnavailableError` for the whole batch, with
  ``retry_after`` from ``Retry-After`` (seconds or an HTTP-date) when given;
* any other 4xx → :class:`~proca_sync.errors.BackendRejectedError` in that record's slot
  (the message names the key and the status, never the response body);
* anything else (1xx, 3xx: redirects are not followed) → transient: a misconfigured URL
  must not park every message.

Idempotency: records of one ``apply`` call are sent concurrently, one lane after another
within the lane. When any of them fails transiently the whole batch is reported as not
applied and will be offered again, although the CRM may already have stored some of its
records. **The receiving end must therefore be idempotent by ``Idempotency-Key``**:
answer 409 (or 2xx without changing anything) for a key it already holds.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import math
import re
import urllib.request
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from typing import Any

import aiohttp
import orjson
from aiohttp.abc import AbstractStreamWriter
from yarl import URL

from proca_sync.crm.base import ApplyResult
from proca_sync.errors import (
    BackendRejectedError,
    BackendUnavailableError,
    ConfigError,
    TransientError,
)
from proca_sync.sync.records import SyncRecord

__all__ = [
    "DEFAULT_MAX_CONNECTIONS",
    "DEFAULT_TIMEOUT",
    "IDEMPOTENCY_HEADER",
    "SIGNATURE_HEADER",
    "WebhookBackend",
    "encode_record",
    "parse_retry_after",
    "record_payload",
    "sign",
]

DEFAULT_TIMEOUT = 10.0
"""Seconds for connecting, sending and reading one request (``?timeout=S`` in the URL)."""
DEFAULT_MAX_CONNECTIONS = 64
IDEMPOTENCY_HEADER = "Idempotency-Key"
SIGNATURE_HEADER = "X-Proca-Signature"


def record_payload(record: SyncRecord) -> dict[str, Any]:
    """The JSON-ready body of one record (the format in the module docstring)."""
    contact: dict[str, Any] | None = None
    if record.contact is not None:
        facts = record.contact
        contact = {
            "refs": sorted(facts.refs),
            "emails": sorted(facts.emails),
            "fields": facts.fields,
            "stamp": facts.stamp,
            "admit": facts.admit,
            "testing": not facts.real,
            "consent": None
            if facts.consent is None
            else {
                "actionId": facts.consent.action_id,
                "optIn": facts.consent.opt_in,
                "givenAt": facts.consent.given_at,
            },
            "emailStatus": None
            if facts.status is None
            else {
                "status": facts.status.status,
                "changedAt": facts.status.changed_at,
                "stamp": facts.status.stamp,
                "source": facts.status.source,
            },
        }
    action: dict[str, Any] | None = None
    if record.action is not None:
        act = record.action
        action = {
            "actionId": act.action_id,
            "actionType": act.action_type,
            "campaign": act.campaign,
            "createdAt": act.created_at,
            "testing": act.testing,
            "version": act.version,
            "data": act.data,
        }
    campaign: dict[str, Any] | None = None
    if record.campaign is not None:
        campaign = {
            "name": record.campaign.name,
            "data": record.campaign.data,
            "stamp": record.campaign.stamp,
        }
    return {
        "key": record.key,
        "kind": record.kind,
        "lane": record.lane,
        "contact": contact,
        "action": action,
        "campaign": campaign,
    }


def encode_record(record: SyncRecord) -> bytes:
    """The body bytes of one record. Raises ``TypeError`` for a non-JSON value."""
    return orjson.dumps(record_payload(record))


def sign(secret: bytes, body: bytes) -> str:
    """The ``X-Proca-Signature`` value: ``sha256=`` + hex HMAC-SHA256 of ``body``."""
    return "sha256=" + hmac.new(secret, body, hashlib.sha256).hexdigest()


def parse_retry_after(value: str | None, *, now: datetime | None = None) -> float | None:
    """Seconds to wait from a ``Retry-After`` value (delay-seconds or HTTP-date).

    Returns ``None`` when absent or unreadable, ``0.0`` for a date in the past.
    """
    if value is None:
        return None
    text = value.strip()
    if not text:
        return None
    try:
        seconds = float(text)
    except ValueError:
        pass
    else:
        return max(0.0, seconds) if math.isfinite(seconds) else None
    try:
        when = parsedate_to_datetime(text)
    except (TypeError, ValueError, IndexError):
        return None
    if when.tzinfo is None:  # "-0000": RFC 5322 for "UTC, origin unknown"
        when = when.replace(tzinfo=UTC)
    return max(0.0, (when - (now or datetime.now(UTC))).total_seconds())


_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
_NOT_HEADER_VALUE = re.compile(r"[^\t\x20-\x7e]")
_TOKEN = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
_KEEPALIVE_EXPIRY = 5.0
"""Seconds an idle connection is kept for reuse; idle ones are closed after it."""


def _split_url(url: str) -> tuple[str, float | None]:
    """The URL to call without our own ``timeout`` parameter, and that parameter."""
    try:
        if _CONTROL.search(url):
            raise ValueError("control character")
        parsed = URL(url)
        # Port and host are checked lazily by yarl: read them now.
        port, host = parsed.port, parsed.raw_host
    except (ValueError, TypeError):
        raise ConfigError("webhook URL is not a valid URL") from None
    if parsed.scheme not in {"http", "https"} or not host or port is None:
        raise ConfigError("webhook URL must be http(s)://host/…")
    raw = parsed.query.get("timeout")
    if raw is None:
        return url, None
    try:
        timeout = float(raw)
    except ValueError:
        raise ConfigError(f"webhook URL: timeout={raw!r} is not a number of seconds") from None
    rest = [(name, value) for name, value in parsed.query.items() if name != "timeout"]
    return str(parsed.with_query(rest)), timeout


def _check_headers(headers: Mapping[str, str]) -> None:
    """Refuse configured headers that cannot go on the wire (names only in the error)."""
    for name, value in headers.items():
        if not _TOKEN.fullmatch(name):
            raise ConfigError(f"webhook header name {name!r} is not an HTTP token")
        if _NOT_HEADER_VALUE.search(value):
            raise ConfigError(
                f"webhook header {name}: the value must be printable ASCII (no line breaks)"
            )


def _basic_auth(url: URL) -> str | None:
    """``Authorization`` for credentials written in the URL (``https://user:pw@host/``)."""
    user, password = url.user or "", url.password or ""
    if not (user or password):
        return None
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode("ascii")


def _env_proxy(url: URL) -> URL | None:
    """The proxy the environment names for ``url`` (``HTTPS_PROXY``, ``ALL_PROXY``…),
    unless ``NO_PROXY`` exempts its host; read once per session.

    Credentials in the proxy URL are sent to the proxy (``Proxy-Authorization``).
    """
    proxies = urllib.request.getproxies_environment()
    value = proxies.get(url.scheme) or proxies.get("all")
    if not value or urllib.request.proxy_bypass(url.raw_host or ""):
        return None
    if "://" not in value:
        value = "http://" + value
    try:
        proxy = URL(value)
        host = proxy.raw_host
    except ValueError:
        raise ConfigError("the proxy named by the environment is not a valid URL") from None
    if proxy.scheme not in {"http", "https"} or not host:
        raise ConfigError("the proxy named by the environment must be http(s)://host:port")
    return proxy


def _unavailable(status: int, retry_after: str | None, what: str) -> BackendUnavailableError:
    return BackendUnavailableError(
        f"webhook answered HTTP {status} to {what}",
        retry_after=parse_retry_after(retry_after),
    )


def _is_transient_status(status: int) -> bool:
    return status in {408, 429} or status >= 500


_BUFFERED_BODY = 32 * 1024
"""Bodies up to this size are handed to the transport whole, without waiting for the
CRM to read them (aiohttp waits above 64 KiB): sending them needs no timeout."""


class _Body(aiohttp.BytesPayload):
    """A JSON body whose sending is bounded by ``timeout`` (a write timeout).

    aiohttp bounds connecting (``sock_connect``) and each read (``sock_read``) but has no
    write timeout: a CRM that stops reading would hold a large body forever.
    """

    def __init__(self, value: bytes, timeout: float) -> None:
        super().__init__(value, content_type="application/json")
        self._send_timeout = timeout

    async def write(self, writer: AbstractStreamWriter) -> None:
        async with asyncio.timeout(self._send_timeout):
            await super().write(writer)

    async def write_with_length(
        self, writer: AbstractStreamWriter, content_length: int | None
    ) -> None:
        async with asyncio.timeout(self._send_timeout):
            await super().write_with_length(writer, content_length)


class WebhookBackend:
    """POST each record as JSON to ``url``; one ``aiohttp.ClientSession`` per backend.

    ``timeout`` (seconds) bounds connecting, sending and reading each request; it
    defaults to ``?timeout=S`` in the URL (removed from the URL before calling), else
    :data:`DEFAULT_TIMEOUT`. ``max_connections`` bounds the requests in flight: further
    records of a batch wait for a free connection (that wait is not timed). ``secret``
    signs each body (``X-Proca-Signature``). Raises :class:`ConfigError` for a bad URL
    or a header that cannot be sent.
    """

    name = "webhook"

    def __init__(
        self,
        url: str,
        *,
        timeout: float | None = None,
        headers: Mapping[str, str] | None = None,
        secret: str | None = None,
        max_connections: int = DEFAULT_MAX_CONNECTIONS,
    ) -> None:
        self.url, url_timeout = _split_url(url)
        chosen = timeout if timeout is not None else url_timeout
        self.timeout = DEFAULT_TIMEOUT if chosen is None else chosen
        if not (self.timeout > 0 and math.isfinite(self.timeout)):
            raise ConfigError("webhook timeout must be a positive number of seconds")
        if max_connections < 1:
            raise ConfigError("webhook max_connections must be at least 1")
        self.max_connections = max_connections
        _check_headers(headers or {})
        self._headers = {
            "Content-Type": "application/json",
            "User-Agent": "proca-sync",
            **(headers or {}),
        }
        # Credentials in the URL become the Authorization header (they win over a
        # configured one); the URL called carries none.
        target = URL(self.url)
        auth = _basic_auth(target)
        if auth is not None:
            self._headers = {k: v for k, v in self._headers.items() if k.lower() != "authorization"}
            self._headers["Authorization"] = auth
            target = target.with_user(None)
        self._target = target
        self._secret = secret.encode() if secret else None
        self._session: aiohttp.ClientSession | None = None
        self._proxy: URL | None = None

    # ---- lifecycle --------------------------------------------------------------------

    async def open(self) -> None:
        """Create the session (idempotent). Does not contact the CRM."""
        if self._session is not None:
            return
        self._proxy = _env_proxy(self._target)
        self._session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(
                limit=self.max_connections,
                limit_per_host=0,
                keepalive_timeout=_KEEPALIVE_EXPIRY,
            ),
            headers=self._headers,
            # Waiting for one of our own connections (connect=None, total=None) is not
            # the CRM's slowness; each request's own connect and reads are bounded here,
            # its send by _Body.
            timeout=aiohttp.ClientTimeout(
                total=None, connect=None, sock_connect=self.timeout, sock_read=self.timeout
            ),
            # unsafe: keep cookies of a CRM addressed by IP too.
            cookie_jar=aiohttp.CookieJar(unsafe=True),
        )

    async def close(self) -> None:
        """Close the session and its connections; ``open`` may be called again."""
        session, self._session = self._session, None
        if session is not None:
            await session.close()

    async def _ensure_session(self) -> aiohttp.ClientSession:
        if self._session is None:
            await self.open()
        assert self._session is not None
        return self._session

    # ---- probing ----------------------------------------------------------------------

    async def ping(self) -> None:
        """GET the URL. Any answer below 500 other than 408/429 means the CRM is up.

        Raises :class:`BackendUnavailableError` otherwise (with ``retry_after``).
        """
        session = await self._ensure_session()
        status, retry_after = await self._request(session, "GET", "ping")
        if _is_transient_status(status):
            raise _unavailable(status, retry_after, "ping")

    # ---- writing ----------------------------------------------------------------------

    async def apply(self, records: Sequence[SyncRecord]) -> Sequence[ApplyResult]:
        """Send every record; one result per record, in order.

        Records of one lane are sent one after the other, in batch order; lanes are
        sent concurrently (at most ``max_connections`` requests in flight). Raises
        :class:`BackendUnavailableError` when any record fails transiently — the other
        records may have been stored by the CRM, which must be idempotent by key.
        """
        if not records:
            return []
        session = await self._ensure_session()
        lanes: dict[str, list[int]] = {}
        for index, record in enumerate(records):
            lanes.setdefault(record.lane, []).append(index)
        results: list[ApplyResult | None] = [None] * len(records)
        failures: list[TransientError] = []
        outcomes = await asyncio.gather(
            *(
                self._send_lane(session, records, indices, results, failures)
                for indices in lanes.values()
            ),
            return_exceptions=True,
        )
        for outcome in outcomes:
            if isinstance(outcome, BaseException):
                raise outcome
        if failures:
            first = failures[0]
            waits = [f.retry_after for f in failures if f.retry_after is not None]
            first.retry_after = max(waits) if waits else None
            raise first
        done = [result for result in results if result is not None]
        assert len(done) == len(records)
        return done

    async def _send_lane(
        self,
        session: aiohttp.ClientSession,
        records: Sequence[SyncRecord],
        indices: list[int],
        results: list[ApplyResult | None],
        failures: list[TransientError],
    ) -> None:
        for index in indices:
            if failures:
                # The batch will be offered again whole: sending more is wasted work.
                return
            try:
                results[index] = await self._send(session, records[index])
            except TransientError as exc:
                failures.append(exc)
                return

    async def _request(
        self, session: aiohttp.ClientSession, method: str, what: str, **kwargs: Any
    ) -> tuple[int, str | None]:
        """One request to the webhook: its status and ``Retry-After``. The answer is read
        to the end (never kept), so that the connection can be reused. Timeouts and
        connection errors are :class:`BackendUnavailableError` naming ``what``."""
        try:
            async with session.request(
                method, self._target, allow_redirects=False, proxy=self._proxy, **kwargs
            ) as response:
                await response.read()
                return response.status, response.headers.get("Retry-After")
        except TimeoutError as exc:  # aiohttp.ServerTimeoutError included
            raise BackendUnavailableError(
                f"webhook timed out on {what} ({type(exc).__name__})"
            ) from None
        except (aiohttp.ClientError, OSError) as exc:
            raise BackendUnavailableError(
                f"webhook unreachable for {what} ({type(exc).__name__})"
            ) from None

    async def _send(self, session: aiohttp.ClientSession, record: SyncRecord) -> ApplyResult:
        if _NOT_HEADER_VALUE.search(record.key):
            return BackendRejectedError(
                f"record key {record.key!r} cannot be sent as an HTTP header (printable ASCII)"
            )
        try:
            body = encode_record(record)
        except TypeError:
            return BackendRejectedError(f"record {record.key} holds a value JSON cannot carry")
        headers = {IDEMPOTENCY_HEADER: record.key}
        if self._secret is not None:
            headers[SIGNATURE_HEADER] = sign(self._secret, body)
        data = body if len(body) <= _BUFFERED_BODY else _Body(body, self.timeout)
        status, retry_after = await self._request(
            session, "POST", record.key, data=data, headers=headers
        )
        if 200 <= status < 300:
            return "applied"
        if status == 409:
            return "duplicate"
        if 400 <= status < 500 and not _is_transient_status(status):
            return BackendRejectedError(f"webhook refused {record.key} with HTTP {status}")
        raise _unavailable(status, retry_after, record.key)
