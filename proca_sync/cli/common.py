"""What every command module shares: the root app, consoles, options, logging, exits.

Exit codes: 0 success; 1 some messages were rejected (``replay``), the broker or CRM was
unreachable (an outage: worth retrying), or the run ended abnormally; 2 usage or
configuration error (bad option, unreadable key store, mistyped URL or path, a password
in ``--url``, a store that does not exist): retrying will not help.
No command prints personal data except ``crm show`` / ``crm contacts`` / ``crm export``,
whose purpose is to show the CRM to its owner.
"""

from __future__ import annotations

import asyncio
import logging
import os
import sys
from collections.abc import Awaitable, Callable
from enum import IntEnum, StrEnum
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Annotated, Any, TypeVar
from urllib.parse import urlsplit

import orjson
import typer
from pydantic import ValidationError
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    SpinnerColumn,
    Task,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.text import Text

from proca_sync.config import (
    ConsumerSettings,
)
from proca_sync.consumer.intake import BrokerUnavailableError, IntakeError, connect
from proca_sync.consumer.runner import ExitStatus
from proca_sync.crm import CRM_SCHEMES, Backend, backend_from_url
from proca_sync.crm.sql import SqlBackend, check_store_url, sqlite_file
from proca_sync.crypto import Keystore
from proca_sync.errors import ConfigError, ProcaSyncError
from proca_sync.sync.records import Mode


class ExitCode(IntEnum):
    OK = 0
    REJECTED = 1
    USAGE = 2


app = typer.Typer(
    name="proca-sync",
    help="Sync Proca actions and events into a CRM; run a Proca-compatible queue pipeline."
    "\n\nExit codes: 0 done; 1 messages rejected, or the broker or CRM unreachable (an "
    "outage: worth retrying); 2 configuration or usage error (retrying will not help).",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
    # Plain help: flags read as flags (rich help shows "--help <bool>") and long option
    # names wrap instead of being cut at 80 columns. Sub-apps inherit it.
    rich_markup_mode=None,
)

out = Console(highlight=False)
err = Console(stderr=True, highlight=False)


def _version(value: bool) -> None:
    if value:
        try:
            number = version("proca-sync")
        except PackageNotFoundError:  # pragma: no cover - running from a bare checkout
            number = "unknown"
        out.print(f"proca-sync {number}")
        raise typer.Exit(0)


@app.callback()
def _root(
    show_version: Annotated[
        bool,
        typer.Option(
            "--version", is_eager=True, callback=_version, help="Print the version and exit."
        ),
    ] = False,
) -> None:
    """The root: ``--version``; the commands live in their modules."""


CrmOption = Annotated[
    str,
    typer.Option(
        "--crm",
        envvar="PROCA_CRM",
        metavar="URL",
        help=f"CRM: {CRM_SCHEMES}.",
    ),
]
"""``--crm`` of commands that write through any backend (``replay``, ``parked retry``)."""
SqlCrmOption = Annotated[
    str,
    typer.Option(
        "--crm",
        envvar="PROCA_CRM",
        metavar="URL",
        help="The embedded CRM: sqlite:///file.db or postgresql://user@host/db.",
    ),
]
"""``--crm`` of commands that read the embedded SQL CRM (``crm …``)."""
KeysOption = Annotated[
    Path | None,
    typer.Option("--keys", envvar="PROCA_KEYS", help="Key store file for encrypted personal data."),
]



class LogLevel(StrEnum):
    DEBUG = "DEBUG"
    INFO = "INFO"
    WARNING = "WARNING"
    ERROR = "ERROR"


LogLevelOption = Annotated[
    LogLevel,
    typer.Option(
        "--log-level", envvar="PROCA_LOG_LEVEL", case_sensitive=False, help="Log level."
    ),
]
ModeOption = Annotated[
    Mode, typer.Option("--mode", envvar="PROCA_MODE", help="Which messages reach the CRM.")
]
SkipTestingOption = Annotated[
    bool,
    typer.Option(
        "--skip-testing", envvar="PROCA_SKIP_TESTING", help="Drop actions flagged testing."
    ),
]

log = logging.getLogger("proca_sync")


def configure_logging(level: str = "INFO") -> Console | None:
    """One line per event on stderr: JSON off a terminal; on one, through rich's console
    ``err`` (returned), so that log lines print above a live status line or progress bar
    drawn on that console instead of overwriting it."""
    handler: logging.Handler
    console: Console | None = None
    if sys.stderr.isatty():
        from rich.logging import RichHandler

        console = err
        handler = RichHandler(console=err, show_path=False, rich_tracebacks=False)
    else:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(_JsonFormatter())
    root = logging.getLogger("proca_sync")
    root.handlers[:] = [handler]
    root.setLevel(str(level).upper())
    root.propagate = False
    return console


class _RateColumn(ProgressColumn):
    """Messages per second of a task (rich's speed, in messages)."""

    def render(self, task: Task) -> Text:
        speed = task.finished_speed or task.speed
        return Text("" if speed is None else f"{speed:,.0f} msg/s", style="progress.data.speed")


def message_progress(console: Console, *, total_known: bool = True) -> Progress:
    """A progress bar over messages on ``console`` (a terminal): done/total, messages/s,
    elapsed and, with a known total, the time left. Log lines routed through the same
    console (see :func:`configure_logging`) print above it. Transient: gone at the end."""
    columns: list[ProgressColumn | str] = [TextColumn("{task.description}")]
    if total_known:
        columns += [BarColumn(), MofNCompleteColumn()]
    else:
        columns += [SpinnerColumn(), TextColumn("{task.completed:,} messages")]
    columns += [_RateColumn(), TimeElapsedColumn()]
    if total_known:
        columns.append(TimeRemainingColumn())
    return Progress(*columns, console=console, transient=True)


class _JsonFormatter(logging.Formatter):
    _second = -1
    _stamp = ""

    def format(self, record: logging.LogRecord) -> str:
        second = int(record.created)
        if second != self._second:  # one strftime a second, not one a line
            self._second, self._stamp = second, self.formatTime(record, "%Y-%m-%dT%H:%M:%S")
        entry: dict[str, Any] = {
            "ts": self._stamp,
            "level": record.levelname.lower(),
            "msg": record.getMessage(),
        }
        extra = getattr(record, "fields", None)
        if isinstance(extra, dict):
            entry.update(extra)
        return orjson.dumps(entry).decode()


def fail(message: str, code: ExitCode = ExitCode.USAGE) -> typer.Exit:
    err.print(f"[red]error:[/red] {message}")
    return typer.Exit(int(code))


def load_keystore(path: Path | None, *, warn_readable: bool = False) -> Keystore | None:
    """The key store at ``path`` (None without one); exit 2 when it is unusable. With
    ``warn_readable``, a store others can read is warned about once (not refused)."""
    if path is None:
        return None
    try:
        store = Keystore.load(path)
    except ConfigError as exc:
        raise fail(str(exc)) from None
    if warn_readable:
        warn_if_readable(path)
    return store


def readable_by_others(path: Path) -> int | None:
    """The mode of ``path`` when its group or others may access it, else None."""
    try:
        mode = path.stat().st_mode & 0o777
    except OSError:
        return None
    return mode if mode & 0o077 else None


def warn_if_readable(path: Path) -> None:
    """One warning on stderr when the key store ``path`` is readable by others."""
    mode = readable_by_others(path)
    if mode is not None:
        err.print(
            f"[yellow]warning:[/yellow] key store {path} is readable by others "
            f"(mode {mode:o}); chmod 600 it",
            soft_wrap=True,
        )


def require_existing_store(url: str, *, what: str, option: str) -> None:
    """For read-only commands: exit 2 when ``url`` is a SQLite file that does not exist
    (never create one to read it), or when ``url`` is mistyped."""
    try:
        check_store_url(url, what=what)
    except ConfigError as exc:
        raise die(str(exc), ExitCode.USAGE) from None
    path = sqlite_file(url)
    if path is not None and not path.exists():
        raise die(
            f"{what} {path} does not exist (nothing was created); "
            f"pass the one to read with {option}",
            ExitCode.USAGE,
        )


def open_crm(url: str, *, read_only: bool = False) -> SqlBackend:
    """The embedded CRM at ``url``, opened (its schema created if new; with
    ``read_only`` a missing SQLite file is an error instead). Exits 2 on a mistyped or
    missing location, 1 when the database is unavailable."""
    if read_only:
        require_existing_store(url, what="CRM", option="--crm")
    try:
        check_store_url(url, what="CRM")
        backend = SqlBackend(url)
        backend.open_sync()
    except ConfigError as exc:
        raise fail(str(exc)) from None
    except ProcaSyncError as exc:
        raise fail(f"CRM {url.split('://', 1)[0]}: {exc}", ExitCode.REJECTED) from None
    return backend


def _read_secret_file(path: Path, what: str) -> str:
    try:
        return path.read_text(encoding="utf-8").strip()
    except OSError as exc:
        raise die(f"{what} {path}: {exc.strerror or 'unreadable'}", ExitCode.USAGE) from None


def parse_header_lines(text: str, *, what: str) -> dict[str, str]:
    """``Name: value`` lines (blank lines and ``#`` comments skipped) as a dict.

    Raises :class:`ConfigError` naming the line number (never the value: it may be a
    token).
    """
    headers: dict[str, str] = {}
    for number, line in enumerate(text.splitlines(), start=1):
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        name, sep, value = stripped.partition(":")
        if not sep or not name.strip():
            raise ConfigError(f"{what} line {number}: expected 'Name: value'")
        headers[name.strip()] = value.strip()
    return headers


WebhookSecretFileOption = Annotated[
    Path | None,
    typer.Option(
        "--webhook-secret-file",
        envvar="PROCA_WEBHOOK_SECRET_FILE",
        metavar="FILE",
        help="Webhook CRM: file holding the HMAC-SHA256 secret that signs each body "
        "(X-Proca-Signature). Or set PROCA_WEBHOOK_SECRET (env or --env-file).",
    ),
]
WebhookHeadersFileOption = Annotated[
    Path | None,
    typer.Option(
        "--webhook-headers-file",
        envvar="PROCA_WEBHOOK_HEADERS_FILE",
        metavar="FILE",
        help="Webhook CRM: file of 'Name: value' lines sent with each request "
        "(e.g. Authorization: Bearer …). Or set PROCA_WEBHOOK_HEADERS to such lines.",
    ),
]
WebhookTimeoutOption = Annotated[
    float | None,
    typer.Option(
        "--webhook-timeout",
        envvar="PROCA_WEBHOOK_TIMEOUT",
        min=0.001,
        metavar="SECONDS",
        help="Webhook CRM: seconds to connect, send and read each request (default 10).",
    ),
]


def crm_backend(
    url: str,
    *,
    secret_file: Path | None = None,
    headers_file: Path | None = None,
    timeout: float | None = None,
) -> Backend:
    """The (unopened) backend ``url`` names; for a webhook, its secret, headers and timeout
    from the given files or ``PROCA_WEBHOOK_SECRET`` / ``PROCA_WEBHOOK_HEADERS`` (never
    from argv). Exits 2 on a configuration error."""
    try:
        if not url.lower().startswith(("http://", "https://")):
            if secret_file or headers_file or timeout is not None:
                raise ConfigError("--webhook-* options apply to an http(s):// CRM only")
            if not url.lower().startswith("null:"):
                check_store_url(url, what="CRM")  # at start: a typo is not an outage
            return backend_from_url(url)
        secret = os.environ.get("PROCA_WEBHOOK_SECRET") or None
        if secret_file is not None:
            secret = _read_secret_file(secret_file, "webhook secret file")
        headers = parse_header_lines(
            os.environ.get("PROCA_WEBHOOK_HEADERS", ""), what="PROCA_WEBHOOK_HEADERS"
        )
        if headers_file is not None:
            headers.update(
                parse_header_lines(
                    _read_secret_file(headers_file, "webhook headers file"),
                    what=str(headers_file),
                )
            )
        return backend_from_url(url, secret=secret, headers=headers, timeout=timeout)
    except ConfigError as exc:
        raise die(str(exc), ExitCode.USAGE) from None


T = TypeVar("T")


def load_env_file(value: Path | None) -> Path | None:
    """Eager ``--env-file`` callback: load the dotenv file before the other options read
    their variables (variables already set win)."""
    if value is not None:
        if not value.is_file():
            raise typer.BadParameter(f"{value}: no such file")
        from dotenv import load_dotenv

        load_dotenv(value, override=False)
    return value


EnvFileOption = Annotated[
    Path | None,
    typer.Option(
        "--env-file",
        envvar="PROCA_ENV_FILE",
        is_eager=True,
        callback=load_env_file,
        help="Load PROCA_* variables from this dotenv file first (set variables win).",
    ),
]
def refuse_password_in_argv(ctx: typer.Context, param: Any, value: str | None) -> str | None:
    """A ``--url`` given on the command line must not carry a password: every local user
    can read a process's argv. (``PROCA_URL`` from the environment or an env file may.)"""
    if value is None:
        return value
    source = ctx.get_parameter_source(param.name) if param.name else None
    if getattr(source, "name", None) == "COMMANDLINE":  # not from PROCA_URL or a default
        try:
            password = urlsplit(value).password
        except ValueError:
            password = None
        if password:
            raise typer.BadParameter(
                "a password in --url is visible to every local user (argv); give the "
                "URL without it and set PROCA_USERNAME and PROCA_PASSWORD (in the "
                "environment or an --env-file)"
            )
    return value


UrlOption = Annotated[
    str | None,
    typer.Option(
        "--url",
        envvar="PROCA_URL",
        callback=refuse_password_in_argv,
        help="Broker: amqp(s)://host[:port]/vhost or host/vhost (amqps assumed); user and "
        "password from PROCA_USERNAME / PROCA_PASSWORD (a password in --url is refused). "
        "Default: amqps://api.proca.app/proca_live.",
    ),
]
QueueOption = Annotated[
    str, typer.Option("--queue", envvar="PROCA_QUEUE", help="Queue to read, e.g. cus.123.deliver.")
]
CaFileOption = Annotated[
    Path | None,
    typer.Option(
        "--ca-file", envvar="PROCA_CA_FILE", help="CA certificate(s) to verify an amqps broker."
    ),
]
ParkedOption = Annotated[
    str,
    typer.Option(
        "--parked",
        envvar="PROCA_PARKED",
        metavar="URL",
        help="Parking store: sqlite:///file.db or postgresql://user@host/db.",
    ),
]


def die(message: str, code: int) -> typer.Exit:
    """One line on stderr (never wrapped), then exit ``code``."""
    err.print(f"[red]error:[/red] {message}", soft_wrap=True, markup=True, highlight=False)
    return typer.Exit(code)


def consumer_settings(**values: Any) -> ConsumerSettings:
    try:
        return ConsumerSettings(**{k: v for k, v in values.items() if v is not None})
    except ValidationError as exc:
        first = exc.errors(include_url=False, include_input=False)[0]
        where = ".".join(str(part) for part in first["loc"]) or "settings"
        raise die(f"{where}: {first['msg']}", ExitStatus.CONFIG) from None


def quiet_amqp_logs(level: str) -> None:
    # aio-pika logs every reconnect with a traceback; our own lines say it in one line.
    quiet = logging.DEBUG if level.upper() == "DEBUG" else logging.CRITICAL
    for name in ("aio_pika", "aiormq"):
        logging.getLogger(name).setLevel(quiet)


def on_broker(settings: ConsumerSettings, work: Callable[[Any], Awaitable[T]]) -> T:
    """Run ``work(connection)`` on a plain (non-robust) connection; errors → exit codes."""

    async def main() -> T:
        connection = await connect(settings, robust=False)
        try:
            return await work(connection)
        finally:
            await connection.close()

    try:
        return asyncio.run(main())
    except (IntakeError, ConfigError) as exc:
        raise die(str(exc), ExitStatus.CONFIG) from None
    except BrokerUnavailableError as exc:
        raise die(str(exc), ExitStatus.FAILED) from None
