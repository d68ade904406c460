"""What every command module shares: the root app, consoles, options, logging, exits.

Exit codes: 0 success; 1 some messages were rejected (``replay``) or the run ended
abnormally; 2 usage or configuration error (bad option, unreadable key store, bad URL).
No command prints personal data except ``crm show`` / ``crm contacts`` / ``crm export``,
whose purpose is to show the CRM to its owner.
"""

from __future__ import annotations

import asyncio
import logging
import sys
from collections.abc import Awaitable, Callable
from enum import IntEnum
from pathlib import Path
from typing import Annotated, Any, TypeVar

import orjson
import typer
from pydantic import ValidationError
from rich.console import Console

from proca_sync.config import (
    ConsumerSettings,
)
from proca_sync.consumer.intake import BrokerUnavailableError, IntakeError, connect
from proca_sync.consumer.runner import ExitStatus
from proca_sync.crm.sql import SqlBackend
from proca_sync.crypto import Keystore
from proca_sync.errors import ConfigError, ProcaSyncError
from proca_sync.sync.records import Mode


class ExitCode(IntEnum):
    OK = 0
    REJECTED = 1
    USAGE = 2


app = typer.Typer(
    name="proca-sync",
    help="Sync Proca actions and events into a CRM; run a Proca-compatible queue pipeline.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)

out = Console(highlight=False)
err = Console(stderr=True, highlight=False)

CrmOption = Annotated[
    str,
    typer.Option(
        "--crm", envvar="PROCA_CRM", help="CRM database URL (sqlite:/// or postgresql://)."
    ),
]
KeysOption = Annotated[
    Path | None,
    typer.Option("--keys", envvar="PROCA_KEYS", help="Key store file for encrypted personal data."),
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


def configure_logging(level: str = "INFO") -> None:
    """One line per event on stderr: JSON off a terminal, plain text on one."""
    handler = logging.StreamHandler(sys.stderr)
    if sys.stderr.isatty():
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    else:
        handler.setFormatter(_JsonFormatter())
    root = logging.getLogger("proca_sync")
    root.handlers[:] = [handler]
    root.setLevel(level)
    root.propagate = False


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


def load_keystore(path: Path | None) -> Keystore | None:
    if path is None:
        return None
    try:
        return Keystore.load(path)
    except ConfigError as exc:
        raise fail(str(exc)) from None


def open_crm(url: str) -> SqlBackend:
    """The embedded CRM at ``url``, opened (its schema created if new)."""
    try:
        backend = SqlBackend(url)
        backend.open_sync()
    except ProcaSyncError as exc:
        raise fail(f"CRM {url.split('://', 1)[0]}: {exc}") from None
    return backend


T = TypeVar("T")


def _load_env_file(value: Path | None) -> Path | None:
    """Eager: load the dotenv file before the other options read their variables."""
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
        callback=_load_env_file,
        help="Load PROCA_* variables from this dotenv file first (set variables win).",
    ),
]
UrlOption = Annotated[
    str | None,
    typer.Option(
        "--url",
        envvar="PROCA_URL",
        help="Broker: amqp(s)://host[:port]/vhost or host/vhost (amqps assumed); user and "
        "password from PROCA_USERNAME / PROCA_PASSWORD. "
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
    str, typer.Option("--parked", envvar="PROCA_PARKED", help="Parking store database URL.")
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
