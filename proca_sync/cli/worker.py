"""The delivery workers: ``proca-sync worker email|webhook|sqs --org N``.

Each reads the org's ``wrk.N.*`` queue (or ``--queue``) until stopped. Per-org settings
come from the ``[worker.email]`` / ``[worker.webhook]`` / ``[worker.sqs]`` table of the
TOML file (``--config``, ``PROCA_SYNC_CONFIG``, else ``./proca-sync.toml`` when present:
the file ``run`` reads, which ignores these tables), overridden by options and their
``PROCA_*`` variables. Secrets only from the environment or files:
``PROCA_SMTP_PASSWORD``, ``PROCA_WEBHOOK_PASSWORD``, ``PROCA_WEBHOOK_SECRET`` (or the
``*_file`` settings); AWS credentials from boto3's chain. See docs/workers.md.
Exit codes as ``run``: 0 stopped, 1 broker unreachable, 2 configuration, 130 a second
signal.
"""

from __future__ import annotations

import asyncio
import os
import tomllib
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any

import typer
from pydantic import BaseModel, ValidationError

from proca_sync.cli.common import (
    CaFileOption,
    EnvFileOption,
    ParkedOption,
    UrlOption,
    app,
    configure_logging,
    consumer_settings,
    die,
    quiet_amqp_logs,
)
from proca_sync.config import DEFAULT_MAX_RETRIES, DEFAULT_PARKED_URL, DEFAULT_SHUTDOWN_TIMEOUT
from proca_sync.config_file import CONFIG_ENV, find_config
from proca_sync.consumer.intake import BrokerUnavailableError, IntakeError
from proca_sync.consumer.parking import ParkingStore
from proca_sync.consumer.runner import ExitStatus
from proca_sync.errors import ConfigError
from proca_sync.pipeline.topology import email_supporter_queue, sqs_queue, webhook_queue
from proca_sync.pipeline.workers.base import Handler, serve_worker

worker_app = typer.Typer(
    help="Proca's delivery workers: e-mail, webhook, SQS.", no_args_is_help=True
)
app.add_typer(worker_app, name="worker")

OrgOption = Annotated[int, typer.Option("--org", envvar="PROCA_ORG", min=1, help="Org id N.")]
QueueOverride = Annotated[
    str | None, typer.Option("--queue", envvar="PROCA_QUEUE", help="Queue (default wrk.N.…).")
]
ConfigOption = Annotated[
    Path | None,
    typer.Option("--config", envvar=CONFIG_ENV,
                 help="TOML file with [worker.*] tables (default ./proca-sync.toml when "
                 "present; the same file as run's)."),
]
ConcurrencyOption = Annotated[
    int, typer.Option(envvar="PROCA_CONCURRENCY", min=1, help="Batches in flight at once.")
]
MaxRetriesOption = Annotated[
    int, typer.Option(envvar="PROCA_MAX_RETRIES", min=0, help="Retry cycles before parking.")
]
MetricsPortOption = Annotated[
    int | None,
    typer.Option(envvar="PROCA_METRICS_PORT", min=0, max=65535,
                 help="Serve /metrics and /healthz on PORT."),
]
ExitIdleOption = Annotated[
    bool, typer.Option("--exit-when-idle", help="Stop once the queue and retries are drained.")
]
IdleOption = Annotated[
    float, typer.Option(min=0.05, help="Seconds drained before --exit-when-idle stops.")
]
ShutdownOption = Annotated[
    float, typer.Option(min=0.1, help="Seconds the running batch may take on shutdown.")
]
LogLevelOption = Annotated[str, typer.Option(envvar="PROCA_LOG_LEVEL", help="Log level.")]


def _section(config: Path | None, name: str) -> dict[str, Any]:
    config = find_config(config)
    if config is None:
        return {}
    try:
        with config.open("rb") as handle:
            data = tomllib.load(handle)
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise die(f"config {config}: {exc}", ExitStatus.CONFIG) from None
    section = data.get("worker", {}).get(name, {})
    if not isinstance(section, dict):
        raise die(f"config {config}: [worker.{name}] must be a table", ExitStatus.CONFIG)
    for key in ("smtp_password", "password", "secret"):
        if key in section:
            raise die(f"config {config}: {key} may not be written in the file; use the "
                      "environment or a *_file setting", ExitStatus.CONFIG)
    return dict(section)


def _model(kind: type[BaseModel], values: dict[str, Any]) -> Any:
    try:
        return kind(**{k: v for k, v in values.items() if v is not None})
    except ValidationError as exc:
        first = exc.errors(include_url=False, include_input=False)[0]
        where = ".".join(str(part) for part in first["loc"]) or "settings"
        raise die(f"{where}: {first['msg']}", ExitStatus.CONFIG) from None


def _run(
    make: Callable[[], Handler],
    *,
    queue: str,
    url: str | None,
    parked: str,
    ca_file: Path | None,
    concurrency: int,
    max_retries: int,
    metrics_port: int | None,
    exit_when_idle: bool,
    idle_seconds: float,
    shutdown_timeout: float,
    log_level: str,
) -> None:
    configure_logging(log_level.upper())
    quiet_amqp_logs(log_level)
    settings = consumer_settings(
        url=url, queue=queue, parked=parked, ca_file=ca_file, concurrency=concurrency,
        max_retries=max_retries, metrics_port=metrics_port, exit_when_idle=exit_when_idle,
        idle_seconds=idle_seconds, shutdown_timeout=shutdown_timeout,
    )
    try:
        settings.ssl_context()
        handler = make()
        parking = ParkingStore(parked)
    except ConfigError as exc:
        raise die(str(exc), ExitStatus.CONFIG) from None
    try:
        asyncio.run(serve_worker(settings, handler, parking=parking))
    except (IntakeError, ConfigError) as exc:
        raise die(str(exc), ExitStatus.CONFIG) from None
    except BrokerUnavailableError as exc:
        raise die(str(exc), ExitStatus.FAILED) from None


@worker_app.command("email")
def email_worker(
    org: OrgOption,
    queue: QueueOverride = None,
    config: ConfigOption = None,
    env_file: EnvFileOption = None,
    url: UrlOption = None,
    sender: Annotated[str | None, typer.Option(envvar="PROCA_EMAIL_FROM",
                                               help="The org's sender address.")] = None,
    sender_name: Annotated[str | None, typer.Option(envvar="PROCA_EMAIL_FROM_NAME")] = None,
    smtp_host: Annotated[str | None, typer.Option(envvar="PROCA_SMTP_HOST")] = None,
    smtp_port: Annotated[int | None, typer.Option(envvar="PROCA_SMTP_PORT")] = None,
    smtp_security: Annotated[str | None, typer.Option(
        envvar="PROCA_SMTP_SECURITY", help="starttls (default), tls or none.")] = None,
    smtp_username: Annotated[str | None, typer.Option(envvar="PROCA_SMTP_USERNAME")] = None,
    smtp_password_file: Annotated[Path | None, typer.Option(
        envvar="PROCA_SMTP_PASSWORD_FILE", help="File whose first line is the password "
        "(or set PROCA_SMTP_PASSWORD).")] = None,
    templates: Annotated[Path | None, typer.Option(
        envvar="PROCA_EMAIL_TEMPLATES", help="Templates directory.")] = None,
    ledger: Annotated[str | None, typer.Option(
        envvar="PROCA_EMAIL_LEDGER", help="Sent-ledger database URL.")] = None,
    link_base: Annotated[str | None, typer.Option(envvar="PROCA_LINK_BASE")] = None,
    rate: Annotated[float | None, typer.Option(
        envvar="PROCA_EMAIL_RATE", help="E-mails per second (0: unlimited).")] = None,
    parked: ParkedOption = DEFAULT_PARKED_URL,
    ca_file: CaFileOption = None,
    concurrency: ConcurrencyOption = 1,
    max_retries: MaxRetriesOption = DEFAULT_MAX_RETRIES,
    metrics_port: MetricsPortOption = None,
    exit_when_idle: ExitIdleOption = False,
    idle_seconds: IdleOption = 1.0,
    shutdown_timeout: ShutdownOption = DEFAULT_SHUTDOWN_TIMEOUT,
    log_level: LogLevelOption = "INFO",
) -> None:
    """Send confirmation, thank-you and duplicate e-mails (at most once per action)."""
    from proca_sync.pipeline.workers.email import EmailHandler, EmailSettings

    values = _section(config, "email")
    values.update({k: v for k, v in {
        "sender": sender, "sender_name": sender_name, "smtp_host": smtp_host,
        "smtp_port": smtp_port, "smtp_security": smtp_security,
        "smtp_username": smtp_username, "smtp_password_file": smtp_password_file,
        "templates": templates, "ledger": ledger, "link_base": link_base, "rate": rate,
    }.items() if v is not None})
    if os.environ.get("PROCA_SMTP_PASSWORD"):
        values["smtp_password"] = os.environ["PROCA_SMTP_PASSWORD"]
    settings = _model(EmailSettings, values)
    _run(lambda: EmailHandler(settings, org=org), queue=queue or email_supporter_queue(org),
         url=url, parked=parked, ca_file=ca_file, concurrency=concurrency,
         max_retries=max_retries, metrics_port=metrics_port, exit_when_idle=exit_when_idle,
         idle_seconds=idle_seconds, shutdown_timeout=shutdown_timeout, log_level=log_level)


@worker_app.command("webhook")
def webhook_worker(
    org: OrgOption,
    queue: QueueOverride = None,
    config: ConfigOption = None,
    env_file: EnvFileOption = None,
    url: UrlOption = None,
    target: Annotated[str | None, typer.Option(
        "--target", envvar="PROCA_WEBHOOK_URL", help="The org's webhook URL.")] = None,
    user: Annotated[str | None, typer.Option(envvar="PROCA_WEBHOOK_USER")] = None,
    timeout: Annotated[float | None, typer.Option(envvar="PROCA_WEBHOOK_TIMEOUT")] = None,
    attempts: Annotated[int | None, typer.Option(
        envvar="PROCA_WEBHOOK_ATTEMPTS", help="Tries before the retry circuit.")] = None,
    parked: ParkedOption = DEFAULT_PARKED_URL,
    ca_file: CaFileOption = None,
    concurrency: ConcurrencyOption = 1,
    max_retries: MaxRetriesOption = DEFAULT_MAX_RETRIES,
    metrics_port: MetricsPortOption = None,
    exit_when_idle: ExitIdleOption = False,
    idle_seconds: IdleOption = 1.0,
    shutdown_timeout: ShutdownOption = DEFAULT_SHUTDOWN_TIMEOUT,
    log_level: LogLevelOption = "INFO",
) -> None:
    """POST each message, unchanged and signed, to the org's webhook (any 2xx is success)."""
    from proca_sync.pipeline.workers.webhook import WebhookHandler, WebhookSettings

    values = _section(config, "webhook")
    values.update({k: v for k, v in {
        "url": target, "user": user, "timeout": timeout, "attempts": attempts,
    }.items() if v is not None})
    for key, env in (("password", "PROCA_WEBHOOK_PASSWORD"), ("secret", "PROCA_WEBHOOK_SECRET")):
        if os.environ.get(env):
            values[key] = os.environ[env]
    settings = _model(WebhookSettings, values)
    _run(lambda: WebhookHandler(settings), queue=queue or webhook_queue(org),
         url=url, parked=parked, ca_file=ca_file, concurrency=concurrency,
         max_retries=max_retries, metrics_port=metrics_port, exit_when_idle=exit_when_idle,
         idle_seconds=idle_seconds, shutdown_timeout=shutdown_timeout, log_level=log_level)


@worker_app.command("sqs")
def sqs_worker(
    org: OrgOption,
    queue: QueueOverride = None,
    config: ConfigOption = None,
    env_file: EnvFileOption = None,
    url: UrlOption = None,
    queue_url: Annotated[str | None, typer.Option(
        envvar="PROCA_SQS_QUEUE_URL", help="The SQS queue URL.")] = None,
    endpoint_url: Annotated[str | None, typer.Option(
        envvar="PROCA_SQS_ENDPOINT_URL", help="SQS endpoint (else boto3's default).")] = None,
    region: Annotated[str | None, typer.Option(
        envvar="PROCA_SQS_REGION", help="AWS region (else AWS_REGION).")] = None,
    profile: Annotated[str | None, typer.Option(
        envvar="PROCA_SQS_PROFILE", help="AWS profile (else AWS_PROFILE / default).")] = None,
    event_delay: Annotated[int | None, typer.Option(
        envvar="PROCA_SQS_EVENT_DELAY", help="Seconds events are delayed (standard queues).")
    ] = None,
    parked: ParkedOption = DEFAULT_PARKED_URL,
    ca_file: CaFileOption = None,
    concurrency: ConcurrencyOption = 1,
    max_retries: MaxRetriesOption = DEFAULT_MAX_RETRIES,
    metrics_port: MetricsPortOption = None,
    exit_when_idle: ExitIdleOption = False,
    idle_seconds: IdleOption = 1.0,
    shutdown_timeout: ShutdownOption = DEFAULT_SHUTDOWN_TIMEOUT,
    log_level: LogLevelOption = "INFO",
) -> None:
    """Forward actions and events to an SQS queue (SendMessageBatch, up to 10 a call)."""
    from proca_sync.pipeline.workers.sqs import SqsHandler, SqsSettings

    values = _section(config, "sqs")
    values.update({k: v for k, v in {
        "queue_url": queue_url, "endpoint_url": endpoint_url, "region": region,
        "profile": profile, "event_delay": event_delay,
    }.items() if v is not None})
    settings = _model(SqsSettings, values)
    _run(lambda: SqsHandler(settings), queue=queue or sqs_queue(org),
         url=url, parked=parked, ca_file=ca_file, concurrency=concurrency,
         max_retries=max_retries, metrics_port=metrics_port, exit_when_idle=exit_when_idle,
         idle_seconds=idle_seconds, shutdown_timeout=shutdown_timeout, log_level=log_level)
