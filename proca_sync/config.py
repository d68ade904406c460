"""Settings of the queue consumer (``proca-sync run``) and their named defaults.

:class:`ConsumerSettings` reads ``PROCA_*`` environment variables (the names the Node
proca-sync reads: ``PROCA_URL``, ``PROCA_QUEUE``, ``PROCA_USERNAME``, ``PROCA_PASSWORD``)
and is built by the CLI from its options; it validates and derives what the consumer
needs (the AMQP URL with credentials, the prefetch, the retry mode), and nothing else.

The password is a :class:`~pydantic.SecretStr`: it is never part of a ``repr``, a log
line or an error message; :meth:`ConsumerSettings.redacted_url` is what may be shown.
"""

from __future__ import annotations

import re
import socket
import ssl
from enum import StrEnum
from pathlib import Path
from urllib.parse import quote, urlsplit, urlunsplit

from pydantic import Field, SecretStr, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from proca_sync.errors import ConfigError
from proca_sync.pipeline.topology import org_queues
from proca_sync.sync.records import Mode

__all__ = [
    "DEFAULT_BATCH_SIZE",
    "DEFAULT_CONCURRENCY",
    "DEFAULT_CRM_URL",
    "DEFAULT_MAX_RETRIES",
    "DEFAULT_PARKED_URL",
    "DEFAULT_PROCA_URL",
    "DEFAULT_RETRY_DELAY",
    "DEFAULT_SHUTDOWN_TIMEOUT",
    "SERVICE_TAG",
    "ConsumerSettings",
    "RetryMode",
    "amqp_url_with_credentials",
    "proca_org_of",
    "redact_url",
]

DEFAULT_PROCA_URL = "amqps://api.proca.app/proca_live"
"""The hosted Proca broker and vhost, as the Node proca-sync defaults to."""

DEFAULT_CRM_URL = "sqlite:///proca-crm.db"
DEFAULT_PARKED_URL = "sqlite:///proca-parked.db"

DEFAULT_MAX_RETRIES = 48
"""Fail→retry cycles before a transiently failing message is parked: 48 × 30 s (the
hosted broker's delay) ≈ 24 minutes of CRM outage (consumer.md §3). Time spent with the
circuit breaker open does not count: held messages are not cycled."""

DEFAULT_CONCURRENCY = 4
"""Batches applied to the CRM at the same time (the SQL CRM takes one at a time: its
``max_batches``)."""

DEFAULT_BATCH_SIZE = 500
"""Records (of distinct contacts) per CRM call: one commit for the SQL CRM. A batch is
formed when the CRM can take it, from what arrived meanwhile: under load, large batches
mean fewer commits (each one a WAL flush) per message."""

DEFAULT_RETRY_DELAY = 30.0
"""Seconds before a local retry (``--retry-mode local``) republishes a message."""

DEFAULT_SHUTDOWN_TIMEOUT = 30.0
"""Seconds a graceful shutdown waits for in-flight batches before closing anyway."""

SERVICE_TAG = "proca-sync"

_PROCA_QUEUE = re.compile(r"(?:cus|wrk)\.([1-9][0-9]*)\..+")


class RetryMode(StrEnum):
    """How a transient failure is retried.

    ``dlx``: reject without requeue; the queue's dead-letter circuit (Proca's
    ``org.N.fail`` → ``org.N.retry``) brings the message back after its delay.
    ``local``: wait, republish the body to the same queue with an attempts header
    (publisher confirms), then ack the original — for queues without a dead-letter
    exchange, where a reject would drop the message. ``auto``: ``dlx`` for Proca's
    ``cus.N.*`` / ``wrk.N.*`` queues, ``local`` for any other queue.
    """

    AUTO = "auto"
    DLX = "dlx"
    LOCAL = "local"


def proca_org_of(queue: str) -> int | None:
    """The org id of a Proca ``cus.N.*`` / ``wrk.N.*`` queue name, else ``None``."""
    match = _PROCA_QUEUE.fullmatch(queue)
    if match is None:
        return None
    org = int(match.group(1))
    return org if queue in org_queues(org) else None


def amqp_url_with_credentials(
    url: str | None, username: str | None, password: str | None
) -> str:
    """The AMQP URL to connect to, as the Node proca-sync builds it.

    ``url`` may be a full ``amqp(s)://`` URL or ``host[:port]/vhost`` (``amqps://`` is
    then prepended); ``None`` means the hosted Proca. When the URL carries no user,
    ``username``/``password`` are inserted percent-encoded, so any character works.
    Credentials already in the URL win. Raises :class:`ConfigError` for another scheme.
    """
    raw = (url or DEFAULT_PROCA_URL).strip()
    if "://" not in raw:
        raw = "amqps://" + raw
    parts = urlsplit(raw)
    if parts.scheme not in {"amqp", "amqps"}:
        raise ConfigError(f"broker URL scheme must be amqp or amqps, not {parts.scheme!r}")
    if not parts.hostname:
        raise ConfigError("broker URL has no host")
    if parts.username is None and username:
        userinfo = quote(username, safe="")
        if password:
            userinfo += ":" + quote(password, safe="")
        host = parts.netloc.rsplit("@", 1)[-1]
        parts = parts._replace(netloc=f"{userinfo}@{host}")
    return urlunsplit(parts)


def redact_url(url: str) -> str:
    """``url`` with its password replaced by ``***`` (for logs and messages)."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    host = parts.netloc.rsplit("@", 1)[-1]
    return urlunsplit(parts._replace(netloc=f"{parts.username}:***@{host}"))


class ConsumerSettings(BaseSettings):
    """Everything ``proca-sync run`` needs; environment variables ``PROCA_<FIELD>``."""

    model_config = SettingsConfigDict(env_prefix="PROCA_", extra="ignore", frozen=True)

    url: str | None = None
    username: str | None = None
    password: SecretStr | None = Field(default=None, repr=False)
    queue: str = Field(min_length=1)
    crm: str = DEFAULT_CRM_URL
    keys: Path | None = None
    mode: Mode = Mode.ALL
    skip_testing: bool = False
    concurrency: int = Field(default=DEFAULT_CONCURRENCY, ge=1, le=1024)
    prefetch: int | None = Field(default=None, ge=1, le=65535)
    batch_size: int = Field(default=DEFAULT_BATCH_SIZE, ge=1, le=10_000)
    max_retries: int = Field(default=DEFAULT_MAX_RETRIES, ge=0)
    retry_mode: RetryMode = RetryMode.AUTO
    retry_delay: float = Field(default=DEFAULT_RETRY_DELAY, gt=0)
    parked: str = DEFAULT_PARKED_URL
    ca_file: Path | None = None
    metrics_port: int | None = Field(default=None, ge=0, le=65535)
    metrics_host: str = "127.0.0.1"
    exit_when_idle: bool = False
    idle_seconds: float = Field(default=1.0, gt=0)
    max_messages: int | None = Field(default=None, ge=1)
    shutdown_timeout: float = Field(default=DEFAULT_SHUTDOWN_TIMEOUT, gt=0)
    status_interval: float = Field(default=2.0, gt=0)
    consumer_tag: str = Field(default_factory=lambda: f"{socket.gethostname()}.{SERVICE_TAG}")

    @model_validator(mode="after")
    def _check(self) -> ConsumerSettings:
        if self.prefetch is not None and self.prefetch < self.concurrency:
            raise ValueError(
                f"prefetch ({self.prefetch}) must be at least concurrency ({self.concurrency})"
            )
        return self

    @property
    def effective_prefetch(self) -> int:
        """``--prefetch``, else enough for a full batch to form while another is being
        applied, and for every worker (at least 200)."""
        if self.prefetch is not None:
            return self.prefetch
        return min(65535, max(2 * self.concurrency, 2 * self.batch_size, 200))

    @property
    def proca_org(self) -> int | None:
        return proca_org_of(self.queue)

    @property
    def effective_retry_mode(self) -> RetryMode:
        if self.retry_mode is not RetryMode.AUTO:
            return self.retry_mode
        return RetryMode.DLX if self.proca_org is not None else RetryMode.LOCAL

    def amqp_url(self) -> str:
        """The broker URL with credentials. Raises :class:`ConfigError`."""
        url = amqp_url_with_credentials(
            self.url,
            self.username,
            self.password.get_secret_value() if self.password is not None else None,
        )
        if "no_verify_ssl" in (urlsplit(url).query or ""):
            raise ConfigError(
                "TLS certificate verification cannot be switched off; "
                "give the broker's CA with --ca-file instead"
            )
        return url

    def redacted_url(self) -> str:
        try:
            return redact_url(self.amqp_url())
        except ConfigError:
            return "<invalid URL>"

    def ssl_context(self) -> ssl.SSLContext | None:
        """A verifying TLS context for ``amqps`` (with ``ca_file`` if given), else ``None``.

        Verification (certificate chain and host name) is always on. Raises
        :class:`ConfigError` when the CA file cannot be read.
        """
        if urlsplit(self.amqp_url()).scheme != "amqps":
            if self.ca_file is not None:
                raise ConfigError("--ca-file needs an amqps:// URL")
            return None
        try:
            return ssl.create_default_context(
                ssl.Purpose.SERVER_AUTH,
                cafile=str(self.ca_file) if self.ca_file is not None else None,
            )
        except (OSError, ssl.SSLError) as exc:
            raise ConfigError(f"cannot load CA file {self.ca_file}: {exc}") from None
