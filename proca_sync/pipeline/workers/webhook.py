"""The webhook worker (``wrk.N.webhook``): the unchanged message JSON, POSTed to the org's
URL (processing.md §11), without the Proca server's faults.

Each message is one ``POST <url>`` with ``Content-Type`` and ``Accept:
application/json``, the body **byte for byte as it arrived**, and:

* ``Authorization: Basic base64(user:password)`` when a user and a password are set,
  the raw password when only a password is set, none otherwise (§11);
* ``X-Proca-Signature: sha256=<hex HMAC-SHA256 of the body>`` when a signing secret is
  set (the same helper as the webhook CRM, :func:`proca_sync.crm.webhook.sign`);
* ``X-Proca-Delivery``: a delivery id, the same on every attempt of the same body, so
  the receiver can drop repeats.

**Any 2xx is success** (the server's worker wrongly fails 201/202/204). 408, 429, 5xx,
timeouts and connection failures are retried here with exponential backoff, honouring
``Retry-After`` (:func:`proca_sync.crm.webhook.parse_retry_after`), up to ``attempts``
tries; then the message goes to the retry circuit (a :class:`TransientError`) and is
parked once the consumer's retry budget is spent. Any other status (3xx, other 4xx) is
permanent: parked (``destination_rejected``).
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import logging
import random
from collections.abc import Sequence
from pathlib import Path

import aiohttp
from pydantic import BaseModel, ConfigDict, Field, SecretStr
from yarl import URL

from proca_sync.crm.webhook import SIGNATURE_HEADER, parse_retry_after, sign
from proca_sync.errors import ConfigError, PermanentError, Reason, TransientError
from proca_sync.pipeline.workers.base import Done, Result

__all__ = ["DELIVERY_HEADER", "SIGNATURE_HEADER", "WebhookHandler", "WebhookSettings",
           "delivery_id"]

log = logging.getLogger("proca_sync.worker")

DELIVERY_HEADER = "X-Proca-Delivery"


class WebhookSettings(BaseModel):
    """``[worker.webhook]`` of the TOML file, CLI options and env (secrets: env or file)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    url: str
    user: str | None = None
    password: SecretStr | None = Field(default=None, repr=False)
    password_file: Path | None = None
    secret: SecretStr | None = Field(default=None, repr=False)
    """HMAC-SHA256 signing secret (``PROCA_WEBHOOK_SECRET``)."""
    secret_file: Path | None = None
    timeout: float = Field(default=10.0, gt=0)
    attempts: int = Field(default=4, ge=1, le=20)
    """Tries of one message in this process before it goes to the retry circuit."""
    backoff: float = Field(default=0.5, gt=0)
    max_wait: float = Field(default=30.0, gt=0)
    """The longest wait between tries; a longer ``Retry-After`` ends the tries here."""


def _secret(value: SecretStr | None, path: Path | None, what: str) -> str | None:
    if value is not None:
        return value.get_secret_value()
    if path is None:
        return None
    try:
        return path.read_text(encoding="utf-8").splitlines()[0]
    except (OSError, IndexError, UnicodeDecodeError):
        raise ConfigError(f"cannot read the webhook {what} file {path}") from None


def delivery_id(body: bytes) -> str:
    """The delivery id of a body: stable across attempts and redeliveries."""
    return hashlib.sha256(body).hexdigest()[:32]


class WebhookHandler:
    """POSTs each body to the org's URL, sequentially (order kept)."""

    name = "webhook"
    batch_size = 10
    batch_wait = 0.0

    def __init__(self, settings: WebhookSettings) -> None:
        self.settings = settings
        try:
            url = URL(settings.url)
            host = url.raw_host
        except (ValueError, TypeError):
            raise ConfigError("webhook URL is not a valid URL") from None
        if url.scheme not in {"http", "https"} or not host:
            raise ConfigError("webhook URL must be http(s)://host/…")
        self.url = url
        password = _secret(settings.password, settings.password_file, "password")
        self._auth: str | None = None
        if settings.user and password:
            token = base64.b64encode(f"{settings.user}:{password}".encode()).decode("ascii")
            self._auth = "Basic " + token
        elif password:
            self._auth = password
        secret = _secret(settings.secret, settings.secret_file, "secret")
        self._secret = secret.encode() if secret else None
        self._session: aiohttp.ClientSession | None = None

    async def open(self) -> None:
        timeout = aiohttp.ClientTimeout(total=self.settings.timeout)
        self._session = aiohttp.ClientSession(timeout=timeout)

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def handle(self, bodies: Sequence[bytes]) -> Sequence[Result]:
        results: list[Result] = []
        for body in bodies:
            try:
                results.append(await self.deliver(body))
            except (PermanentError, TransientError) as exc:
                results.append(exc)
        return results

    def headers(self, body: bytes) -> dict[str, str]:
        headers = {
            "Content-Type": "application/json",
            "Accept": "application/json",
            DELIVERY_HEADER: delivery_id(body),
        }
        if self._auth is not None:
            headers["Authorization"] = self._auth
        if self._secret is not None:
            headers[SIGNATURE_HEADER] = sign(self._secret, body)
        return headers

    async def deliver(self, body: bytes) -> Done:
        """POST ``body`` until a 2xx, a permanent status or the tries run out."""
        assert self._session is not None, "open() first"
        headers = self.headers(body)
        last: TransientError | None = None
        for attempt in range(1, self.settings.attempts + 1):
            try:
                async with self._session.post(
                    self.url, data=body, headers=headers, allow_redirects=False
                ) as response:
                    await response.read()
                    status = response.status
                    retry_after = parse_retry_after(response.headers.get("Retry-After"))
            except TimeoutError:
                last, retry_after = TransientError("webhook timed out"), None
            except (aiohttp.ClientError, OSError) as exc:
                last, retry_after = TransientError(
                    f"webhook unreachable ({type(exc).__name__})"
                ), None
            else:
                if 200 <= status < 300:
                    return Done(f"sent:{status}")
                if status not in (408, 429) and status < 500:
                    raise PermanentError(f"webhook answered HTTP {status}",
                                         reason=Reason.DESTINATION_REJECTED)
                last = TransientError(f"webhook answered HTTP {status}", retry_after=retry_after)
            if attempt == self.settings.attempts:
                break
            wait = min(self.settings.max_wait,
                       self.settings.backoff * 2 ** (attempt - 1) * (1 + random.random() / 4))
            if retry_after is not None:
                if retry_after > self.settings.max_wait:
                    break  # longer than we hold a message: the retry circuit waits instead
                wait = max(wait, retry_after)
            log.info("webhook try %d failed (%s); next in %.2f s", attempt, last, wait,
                     extra={"fields": {"event": "webhook_retry", "attempt": attempt,
                                       "error": str(last), "wait_s": round(wait, 2)}})
            await asyncio.sleep(wait)  # sleep-ok: backoff between tries
        assert last is not None
        raise last
