"""The ``proca-sync`` command line. It only wires options into constructors.

Exit codes: 0 success; 1 some messages were rejected (``replay``) or the run ended
abnormally; 2 usage or configuration error (bad option, unreadable key store, bad URL).
No command prints personal data except ``crm show`` / ``crm contacts`` / ``crm export``,
whose purpose is to show the CRM to its owner.
"""

from __future__ import annotations

import asyncio
import logging
import os
import sys
import time
from collections.abc import Awaitable, Callable, Iterator
from enum import IntEnum
from pathlib import Path
from typing import Annotated, Any, TypeVar

import orjson
import typer
from pydantic import ValidationError
from rich.console import Console
from rich.table import Table

from proca_sync.config import (
    DEFAULT_BATCH_SIZE,
    DEFAULT_CONCURRENCY,
    DEFAULT_CRM_URL,
    DEFAULT_MAX_RETRIES,
    DEFAULT_PARKED_URL,
    DEFAULT_RETRY_DELAY,
    DEFAULT_SHUTDOWN_TIMEOUT,
    ConsumerSettings,
    RetryMode,
    redact_url,
)
from proca_sync.consumer.browse import dump, peek, queue_status, summarize
from proca_sync.consumer.intake import BrokerUnavailableError, IntakeError, connect
from proca_sync.consumer.parking import ParkedMessage, ParkingStore, RetryResult, retry_parked
from proca_sync.consumer.runner import ExitStatus, serve
from proca_sync.crm import backend_from_url
from proca_sync.crm.sql import DEFAULT_URL, SqlBackend
from proca_sync.crypto import KeyPair, Keystore
from proca_sync.engine import Engine, Summary
from proca_sync.errors import ConfigError, ProcaSyncError
from proca_sync.pipeline.commands import simulate, topology_app
from proca_sync.sync.model import Options
from proca_sync.sync.records import Mode

__all__ = ["ExitCode", "app", "main"]


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
keys_app = typer.Typer(help="Key stores (@proca/crypto format).", no_args_is_help=True)
crm_app = typer.Typer(help="Look into the embedded CRM.", no_args_is_help=True)
app.add_typer(keys_app, name="keys")
app.add_typer(crm_app, name="crm")

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


# ---- replay -------------------------------------------------------------------------------

_LINE_SUFFIXES = {".jsonl", ".ndjson"}
_SUFFIXES = {".json", *_LINE_SUFFIXES}


def _expand(paths: list[str]) -> list[str]:
    files: list[str] = []
    for raw in paths:
        if raw == "-":
            files.append(raw)
            continue
        path = Path(raw)
        if path.is_dir():
            files.extend(str(p) for p in sorted(path.rglob("*")) if p.suffix in _SUFFIXES)
        elif not path.exists():
            raise fail(f"{raw}: no such file")
        elif path.suffix not in _SUFFIXES:
            raise fail(f"{raw}: expected .json, .jsonl, .ndjson, a directory or -")
        else:
            files.append(raw)
    return files


def read_bodies(paths: list[str]) -> Iterator[tuple[str, bytes]]:
    """(where, body) for every message in the inputs; ``where`` is ``file:line``."""
    for name in paths:
        if name == "-":
            data = sys.stdin.buffer.read()
            yield from _split(data, "-", whole_first=True)
            continue
        data = Path(name).read_bytes()
        if Path(name).suffix in _LINE_SUFFIXES:
            yield from _split(data, name, whole_first=False)
        else:
            yield f"{name}", data


def _split(data: bytes, name: str, *, whole_first: bool) -> Iterator[tuple[str, bytes]]:
    if whole_first:
        try:
            if isinstance(orjson.loads(data), dict):
                yield name, data
                return
        except orjson.JSONDecodeError:
            pass
    for number, line in enumerate(data.split(b"\n"), start=1):
        if line.strip():
            yield f"{name}:{number}", line


async def _replay(engine: Engine, inputs: Iterator[tuple[str, bytes]], batch: int) -> Summary:
    from proca_sync.errors import PermanentError
    from proca_sync.sync.records import Ignored, SyncRecord

    summary = Summary()
    pending: list[tuple[str, SyncRecord]] = []

    async def flush() -> None:
        results = await engine.apply([record for _, record in pending])
        for (where, record), result in zip(pending, results, strict=True):
            summary.count_result(result)
            if isinstance(result, PermanentError):
                log.warning(
                    "rejected %s key=%s reason=%s",
                    where,
                    record.key,
                    result.reason,
                    extra={"fields": {"where": where, "reason": str(result.reason)}},
                )
        pending.clear()

    try:
        await engine.backend.open()
        for where, body in inputs:
            try:
                prepared = engine.prepare(body)
            except PermanentError as exc:
                summary.rejected[str(exc.reason)] += 1
                log.warning(
                    "rejected %s reason=%s: %s",
                    where,
                    exc.reason,
                    exc.args[0] if exc.args else "",
                    extra={"fields": {"where": where, "reason": str(exc.reason)}},
                )
                continue
            if isinstance(prepared, Ignored):
                summary.ignored[str(prepared.reason)] += 1
                continue
            pending.append((where, prepared))
            if len(pending) >= batch:
                await flush()
        if pending:
            await flush()
    finally:
        await engine.backend.close()
    return summary


def print_summary(summary: Summary, title: str) -> None:
    table = Table(title=title, show_header=True)
    table.add_column("outcome")
    table.add_column("messages", justify="right")
    table.add_row("synced", str(summary.synced))
    table.add_row("already applied", str(summary.duplicates))
    for reason, count in sorted(summary.ignored.items()):
        table.add_row(f"ignored: {reason}", str(count))
    for reason, count in sorted(summary.rejected.items()):
        table.add_row(f"[red]rejected: {reason}[/red]", str(count))
    table.add_row("[bold]total[/bold]", f"[bold]{summary.total}[/bold]")
    out.print(table)


@app.command()
def replay(
    paths: Annotated[
        list[str],
        typer.Argument(help="Message files (.json, .jsonl, .ndjson), directories, or - for stdin."),
    ],
    crm: CrmOption = DEFAULT_URL,
    keys: KeysOption = None,
    mode: ModeOption = Mode.ALL,
    skip_testing: SkipTestingOption = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print the summary as JSON.")] = False,
    batch: Annotated[int, typer.Option(min=1, help="Records per CRM commit.")] = 500,
) -> None:
    """Run messages from files through the sync engine into the CRM.

    Exit 0 when every message was synced or ignored, 1 when some were rejected (the
    others are still synced), 2 on usage errors.
    """
    configure_logging()
    files = _expand(paths)
    keystore = load_keystore(keys)
    try:
        backend = backend_from_url(crm)
    except ConfigError as exc:
        raise fail(str(exc)) from None
    engine = Engine(
        backend=backend, keystore=keystore, options=Options(mode=mode, skip_testing=skip_testing)
    )
    try:
        summary = asyncio.run(_replay(engine, read_bodies(files), batch))
    except ProcaSyncError as exc:
        raise fail(f"CRM: {exc}", ExitCode.REJECTED) from None
    if as_json:
        out.print_json(orjson.dumps(summary.as_dict()).decode())
    else:
        print_summary(summary, "replay")
    raise typer.Exit(int(ExitCode.REJECTED if summary.rejected else ExitCode.OK))


# ---- keys ---------------------------------------------------------------------------------


@keys_app.command("generate")
def keys_generate(
    out_file: Annotated[Path, typer.Option("--out", help="Key store file to create (mode 0600).")],
    add: Annotated[bool, typer.Option("--add", help="Add a key to an existing store.")] = False,
) -> None:
    """Generate a key pair and write it as an @proca/crypto key store. Prints the public key."""
    store = Keystore()
    if out_file.exists():
        if not add:
            raise fail(f"{out_file} exists; use --add to add a key to it")
        store = load_keystore(out_file) or Keystore()
    pair = KeyPair.generate()
    store.add(pair)
    store.save(out_file)
    out.print(f"public key: {pair.public}")
    out.print(f"written: {out_file} ({len(store)} key{'s' if len(store) != 1 else ''}, mode 0600)")


@keys_app.command("check")
def keys_check(path: Annotated[Path, typer.Argument(help="Key store file.")]) -> None:
    """Load a key store, verify every private key derives its public key, list the keys."""
    store = load_keystore(path)
    assert store is not None
    mode = path.stat().st_mode & 0o777
    for pair in store:
        out.print(f"ok  {pair.public}")
    out.print(f"{len(store)} key(s) valid")
    if mode & 0o077:
        err.print(
            f"[yellow]warning:[/yellow] {path} is readable by others (mode {mode:o}); chmod 600 it"
        )


# ---- crm ----------------------------------------------------------------------------------


@crm_app.command("export")
def crm_export(crm: CrmOption = DEFAULT_URL) -> None:
    """Print the whole CRM as JSON (contacts with their actions, campaigns)."""
    try:
        with open_crm(crm) as backend:
            data = backend.export()
    except ProcaSyncError as exc:
        raise fail(f"CRM: {exc}") from None
    sys.stdout.write(orjson.dumps(data, option=orjson.OPT_INDENT_2).decode() + "\n")


@crm_app.command("contacts")
def crm_contacts(
    crm: CrmOption = DEFAULT_URL,
    limit: Annotated[int, typer.Option(min=1, help="Rows to show.")] = 50,
) -> None:
    """A table of the CRM's contacts."""
    with open_crm(crm) as backend:
        data = backend.export()
    table = Table(title=f"contacts ({len(data['contacts'])})")
    for column in ("email", "name", "country", "postcode", "subscribed", "status", "actions"):
        table.add_column(column)
    for contact in data["contacts"][:limit]:
        name = " ".join(p for p in (contact["firstName"], contact["lastName"]) if p)
        table.add_row(
            contact["email"] or "-",
            name or "-",
            contact["country"] or "-",
            contact["postcode"] or "-",
            "yes" if contact["subscribed"] else "no",
            contact["emailStatus"] or "-",
            str(len(contact["actions"])),
        )
    out.print(table)
    if len(data["contacts"]) > limit:
        out.print(f"… {len(data['contacts']) - limit} more (--limit)")


@crm_app.command("show")
def crm_show(
    email: Annotated[str, typer.Argument(help="E-mail of the contact.")],
    crm: CrmOption = DEFAULT_URL,
) -> None:
    """One contact with its consent, e-mail status history and actions."""
    with open_crm(crm) as backend:
        contact = backend.find_contact(email)
    if contact is None:
        raise fail("no contact with that e-mail", ExitCode.REJECTED)
    table = Table(show_header=False, title="contact")
    for key in (
        "email",
        "firstName",
        "lastName",
        "postcode",
        "country",
        "subscribed",
        "optIn",
        "optInAt",
        "emailStatus",
        "emailStatusChanged",
        "testing",
    ):
        table.add_row(key, str(contact[key]))
    table.add_row("contactRefs", ", ".join(contact["contactRefs"]))
    out.print(table)
    actions = Table(title="actions")
    for column in ("actionId", "type", "campaign", "createdAt", "consent", "testing"):
        actions.add_column(column)
    for action in contact["actions"]:
        actions.add_row(
            str(action["actionId"]),
            action["actionType"],
            action["campaign"],
            action["createdAt"],
            "yes" if action["withConsent"] else "no",
            "yes" if action["testing"] else "no",
        )
    out.print(actions)
    history = Table(title="e-mail status history")
    history.add_column("status")
    history.add_column("changed")
    for entry in contact["emailStatusHistory"]:
        history.add_row(str(entry["status"]), str(entry["changedAt"]))
    out.print(history)


# ---- pipeline: topology and traffic ------------------------------------------------------

app.add_typer(topology_app, name="topology", help="Declare and inspect an org's Proca queues.")
app.command("simulate")(simulate)


# ---- consumer: run, queue status, peek, dump, parked ---------------------------------------
# The queue consumer (proca_sync.consumer). Exit codes of `run`: ExitStatus in
# proca_sync/consumer/runner.py — 0 requested stop / drained / --max-messages, 1 broker
# unreachable or internal error, 2 configuration (missing queue, refused access, bad
# option), 130 a second signal. Passwords come from PROCA_PASSWORD (or an --env-file),
# never from argv, and are never printed.

T = TypeVar("T")

queue_app = typer.Typer(help="Look at the queue the consumer reads.", no_args_is_help=True)
parked_app = typer.Typer(
    help="Messages the consumer parked (kept with their reason; retry or drop them).",
    no_args_is_help=True,
)
app.add_typer(queue_app, name="queue")
app.add_typer(parked_app, name="parked")


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


def _die(message: str, code: int) -> typer.Exit:
    """One line on stderr (never wrapped), then exit ``code``."""
    err.print(f"[red]error:[/red] {message}", soft_wrap=True, markup=True, highlight=False)
    return typer.Exit(code)


def _consumer_settings(**values: Any) -> ConsumerSettings:
    try:
        return ConsumerSettings(**{k: v for k, v in values.items() if v is not None})
    except ValidationError as exc:
        first = exc.errors(include_url=False, include_input=False)[0]
        where = ".".join(str(part) for part in first["loc"]) or "settings"
        raise _die(f"{where}: {first['msg']}", ExitStatus.CONFIG) from None


def _quiet_amqp_logs(level: str) -> None:
    # aio-pika logs every reconnect with a traceback; our own lines say it in one line.
    quiet = logging.DEBUG if level.upper() == "DEBUG" else logging.CRITICAL
    for name in ("aio_pika", "aiormq"):
        logging.getLogger(name).setLevel(quiet)


def _on_broker(settings: ConsumerSettings, work: Callable[[Any], Awaitable[T]]) -> T:
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
        raise _die(str(exc), ExitStatus.CONFIG) from None
    except BrokerUnavailableError as exc:
        raise _die(str(exc), ExitStatus.FAILED) from None


@app.command("run")
def run_consumer(
    queue: QueueOption,
    env_file: EnvFileOption = None,
    url: UrlOption = None,
    crm: Annotated[
        str,
        typer.Option(
            "--crm",
            envvar="PROCA_CRM",
            help="CRM URL: sqlite:///…, postgresql://…, http(s)://… (webhook), null:.",
        ),
    ] = DEFAULT_CRM_URL,
    keys: KeysOption = None,
    mode: ModeOption = Mode.ALL,
    skip_testing: SkipTestingOption = False,
    concurrency: Annotated[
        int, typer.Option(envvar="PROCA_CONCURRENCY", min=1, help="CRM batches in flight at once.")
    ] = DEFAULT_CONCURRENCY,
    prefetch: Annotated[
        int | None,
        typer.Option(
            envvar="PROCA_PREFETCH",
            min=1,
            help="Unacked messages the broker may send (>= concurrency); "
            "default max(2 × concurrency, 200).",
        ),
    ] = None,
    batch_size: Annotated[
        int,
        typer.Option(
            envvar="PROCA_BATCH_SIZE", min=1, help="Records of distinct contacts per CRM call."
        ),
    ] = DEFAULT_BATCH_SIZE,
    max_retries: Annotated[
        int,
        typer.Option(
            envvar="PROCA_MAX_RETRIES",
            min=0,
            help="Retry cycles before a failing message is parked (48 × 30 s ≈ 24 min).",
        ),
    ] = DEFAULT_MAX_RETRIES,
    retry_mode: Annotated[
        RetryMode,
        typer.Option(
            envvar="PROCA_RETRY_MODE",
            help="dlx: reject into the queue's dead-letter circuit; local: republish after "
            "--retry-delay; auto: dlx for Proca cus.N.* queues, else local.",
        ),
    ] = RetryMode.AUTO,
    retry_delay: Annotated[
        float,
        typer.Option(envvar="PROCA_RETRY_DELAY", min=0.01, help="Seconds before a local retry."),
    ] = DEFAULT_RETRY_DELAY,
    parked: ParkedOption = DEFAULT_PARKED_URL,
    ca_file: CaFileOption = None,
    metrics_port: Annotated[
        int | None,
        typer.Option(
            envvar="PROCA_METRICS_PORT",
            min=0,
            max=65535,
            help="Serve /metrics and /healthz on PORT (0: any free port).",
        ),
    ] = None,
    metrics_host: Annotated[
        str,
        typer.Option(
            envvar="PROCA_METRICS_HOST", help="Address for --metrics-port (0.0.0.0: all)."
        ),
    ] = "127.0.0.1",
    exit_when_idle: Annotated[
        bool,
        typer.Option(
            "--exit-when-idle", help="Stop (exit 0) once the queue and its retries are drained."
        ),
    ] = False,
    max_messages: Annotated[
        int | None,
        typer.Option(
            min=1, help="Stop (exit 0) once this many messages are settled (running batches end)."
        ),
    ] = None,
    shutdown_timeout: Annotated[
        float, typer.Option(min=0.1, help="Seconds to let in-flight batches finish on shutdown.")
    ] = DEFAULT_SHUTDOWN_TIMEOUT,
    log_level: Annotated[str, typer.Option(envvar="PROCA_LOG_LEVEL", help="Log level.")] = "INFO",
) -> None:
    """Consume a Proca queue into the CRM until stopped (SIGTERM/SIGINT: graceful; twice: now).

    Acks only after the CRM committed; parks messages that cannot succeed (see `parked`);
    retries transient CRM failures; pauses while the CRM is down (circuit breaker).
    """
    configure_logging(log_level.upper())
    _quiet_amqp_logs(log_level)
    settings = _consumer_settings(
        url=url,
        queue=queue,
        crm=crm,
        keys=keys,
        mode=mode,
        skip_testing=skip_testing,
        concurrency=concurrency,
        prefetch=prefetch,
        batch_size=batch_size,
        max_retries=max_retries,
        retry_mode=retry_mode,
        retry_delay=retry_delay,
        parked=parked,
        ca_file=ca_file,
        metrics_port=metrics_port,
        metrics_host=metrics_host,
        exit_when_idle=exit_when_idle,
        max_messages=max_messages,
        shutdown_timeout=shutdown_timeout,
    )
    try:
        settings.ssl_context()
        keystore = Keystore.load(keys) if keys is not None else None
        backend = backend_from_url(crm)
        parking = ParkingStore(parked)
    except ConfigError as exc:
        raise _die(str(exc), ExitStatus.CONFIG) from None
    console: Console | None = None
    if sys.stderr.isatty():
        from rich.logging import RichHandler

        console = err
        handler = RichHandler(console=err, show_path=False, rich_tracebacks=False)
        logging.getLogger("proca_sync").handlers[:] = [handler]
    try:
        status, stats = asyncio.run(
            serve(settings, backend=backend, parking=parking, keystore=keystore, console=console)
        )
    except (IntakeError, ConfigError) as exc:
        raise _die(str(exc), ExitStatus.CONFIG) from None
    except BrokerUnavailableError as exc:
        raise _die(str(exc), ExitStatus.FAILED) from None
    if console is not None:
        totals = stats.totals()
        table = Table(title="proca-sync run", show_header=True)
        table.add_column("outcome")
        table.add_column("messages", justify="right")
        for name in ("received", "acked", "retried", "parked", "returned"):
            table.add_row(name, str(totals[name]))
        for label, count in totals["by_label"].items():
            table.add_row(f"  {label}", str(count))
        out.print(table)
    raise typer.Exit(int(status))


@queue_app.command("status")
def queue_status_command(
    queue: QueueOption,
    env_file: EnvFileOption = None,
    url: UrlOption = None,
    ca_file: CaFileOption = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """Depth and consumers of the queue and, for a Proca cus.N.* queue, of org.N.fail."""
    settings = _consumer_settings(url=url, queue=queue, ca_file=ca_file)
    states = _on_broker(settings, lambda connection: queue_status(connection, queue))
    if as_json:
        rows = [
            {"queue": s.name, "exists": s.exists, "messages": s.messages, "consumers": s.consumers}
            for s in states
        ]
        sys.stdout.write(orjson.dumps(rows).decode() + "\n")
        return
    table = Table(title=settings.redacted_url())
    for column in ("queue", "messages", "consumers"):
        table.add_column(column, justify="left" if column == "queue" else "right")
    for state in states:
        if state.exists:
            table.add_row(state.name, str(state.messages), str(state.consumers))
        else:
            table.add_row(state.name, "[red]missing[/red]", "-")
    out.print(table)
    if not states[0].exists:
        raise typer.Exit(int(ExitStatus.CONFIG))


@app.command("peek")
def peek_command(
    queue: QueueOption,
    env_file: EnvFileOption = None,
    url: UrlOption = None,
    ca_file: CaFileOption = None,
    count: Annotated[
        int, typer.Option("--count", "-n", min=1, max=10_000, help="Messages to show.")
    ] = 10,
    as_json: Annotated[bool, typer.Option("--json", help="One JSON object per line.")] = False,
) -> None:
    """Summaries of the next messages (no personal data); they stay in the queue."""
    settings = _consumer_settings(url=url, queue=queue, ca_file=ca_file)
    peeked = _on_broker(settings, lambda connection: peek(connection, queue, count))
    if as_json:
        for item in peeked:
            row = {
                **item.summary.as_dict(),
                "redelivered": item.redelivered,
                "attempts": item.attempts,
                "routingKey": item.routing_key,
                "bytes": item.size,
            }
            sys.stdout.write(orjson.dumps(row).decode() + "\n")
        return
    table = Table(title=f"{queue}: next {len(peeked)} message(s), returned untouched")
    for column in (
        "#",
        "schema",
        "stage/event",
        "actionId",
        "type",
        "campaign",
        "encrypted",
        "retries",
        "problem",
    ):
        table.add_column(column)
    for number, item in enumerate(peeked, start=1):
        s = item.summary
        table.add_row(
            str(number),
            s.schema or "-",
            s.kind or "-",
            "-" if s.action_id is None else str(s.action_id),
            s.action_type or "-",
            s.campaign or "-",
            {True: "yes", False: "no", None: "-"}[s.encrypted],
            str(item.attempts),
            f"[red]{s.problem}[/red]" if s.problem else "",
        )
    out.print(table)


@app.command("dump")
def dump_command(
    queue: QueueOption,
    out_dir: Annotated[Path, typer.Option("--out", help="Directory for the .jsonl/.json files.")],
    env_file: EnvFileOption = None,
    url: UrlOption = None,
    ca_file: CaFileOption = None,
    count: Annotated[
        int | None, typer.Option("--count", "-n", min=1, help="At most this many (default: all).")
    ] = None,
) -> None:
    """Move messages from the queue into files `proca-sync replay DIR` accepts.

    Each chunk is fsync'd before it is acked: a message is never only in memory.
    """
    settings = _consumer_settings(url=url, queue=queue, ca_file=ca_file)
    report = _on_broker(settings, lambda connection: dump(connection, queue, out_dir, count=count))
    out.print(
        f"moved {report.messages} message(s) from {queue} "
        f"into {len(report.files)} file(s) in {out_dir}"
    )


def _open_parking(url: str) -> ParkingStore:
    try:
        store = ParkingStore(url)
        store.open_sync()
    except ConfigError as exc:
        raise _die(str(exc), ExitStatus.CONFIG) from None
    return store


def _parked_or_exit(store: ParkingStore, parked_id: int) -> ParkedMessage:
    message = store.get(parked_id)
    if message is None:
        raise _die(f"no parked message {parked_id}", ExitStatus.FAILED)
    return message


@parked_app.command("list")
def parked_list(
    parked: ParkedOption = DEFAULT_PARKED_URL,
    limit: Annotated[int, typer.Option(min=1, help="Rows to show.")] = 100,
    reason: Annotated[str | None, typer.Option(help="Only this reason code.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="One JSON object per line.")] = False,
) -> None:
    """Parked messages: id, time, queue, reason, attempts, action id (no personal data)."""
    store = _open_parking(parked)
    rows = store.entries(limit=limit, reason=reason)
    total = store.count()
    if as_json:
        for row in rows:
            summary = summarize(row.body)
            entry = {
                "id": row.id,
                "parkedAt": row.parked_at,
                "queue": row.queue,
                "reason": row.reason,
                "attempts": row.attempts,
                "actionId": summary.action_id,
                "kind": summary.kind,
                "timesParked": row.times_parked,
            }
            sys.stdout.write(orjson.dumps(entry).decode() + "\n")
        return
    table = Table(title=f"parked messages ({total})")
    for column in ("id", "parked at", "queue", "reason", "attempts", "actionId", "kind"):
        table.add_column(column)
    for row in rows:
        summary = summarize(row.body)
        table.add_row(
            str(row.id),
            row.parked_at,
            row.queue,
            row.reason,
            str(row.attempts),
            "-" if summary.action_id is None else str(summary.action_id),
            summary.kind or "-",
        )
    out.print(table)


@parked_app.command("show")
def parked_show(
    parked_id: Annotated[int, typer.Argument(help="Parked message id.")],
    parked: ParkedOption = DEFAULT_PARKED_URL,
    body: Annotated[
        bool, typer.Option("--body", help="Also print the raw body (it holds personal data).")
    ] = False,
) -> None:
    """Metadata, reason and a summary of one parked message; the body only with --body."""
    store = _open_parking(parked)
    message = _parked_or_exit(store, parked_id)
    summary = summarize(message.body)
    table = Table(show_header=False, title=f"parked message {message.id}")
    for key, value in (
        ("reason", message.reason),
        ("detail", message.detail),
        ("attempts", message.attempts),
        ("parked at", message.parked_at),
        ("times parked", message.times_parked),
        ("queue", message.queue),
        ("exchange", message.exchange or '""'),
        ("routing key", message.routing_key),
        ("bytes", len(message.body)),
        ("schema", summary.schema),
        ("stage/event", summary.kind),
        ("actionId", summary.action_id),
        ("actionType", summary.action_type),
        ("campaign", summary.campaign),
        ("encrypted", summary.encrypted),
        ("digest", message.digest),
    ):
        table.add_row(key, "-" if value is None else str(value))
    deaths = message.headers.get("x-death")
    if isinstance(deaths, list):
        table.add_row(
            "x-death",
            ", ".join(
                f"{d.get('queue')}/{d.get('reason')}×{d.get('count')}"
                for d in deaths
                if isinstance(d, dict)
            ),
        )
    out.print(table)
    if body:
        sys.stdout.buffer.write(message.body + b"\n")
        sys.stdout.flush()


@parked_app.command("retry")
def parked_retry(
    parked_id: Annotated[int | None, typer.Argument(help="Parked message id (or --all).")] = None,
    all_: Annotated[bool, typer.Option("--all", help="Retry every parked message.")] = False,
    parked: ParkedOption = DEFAULT_PARKED_URL,
    crm: CrmOption = DEFAULT_CRM_URL,
    keys: KeysOption = None,
    mode: ModeOption = Mode.ALL,
    skip_testing: SkipTestingOption = False,
) -> None:
    """Feed parked messages through the engine into the CRM again.

    Synced (or now ignored) messages leave the store; refused ones stay with the new
    reason. Exit 1 when some are still refused or the CRM is unavailable.
    """
    if (parked_id is None) == (not all_):
        raise _die("give one parked message id or --all", ExitStatus.CONFIG)
    configure_logging()
    store = _open_parking(parked)
    ids = store.ids() if all_ else [_parked_or_exit(store, parked_id or 0).id]
    try:
        backend = backend_from_url(crm)
    except ConfigError as exc:
        raise _die(str(exc), ExitStatus.CONFIG) from None
    engine = Engine(
        backend=backend,
        keystore=load_keystore(keys),
        options=Options(mode=mode, skip_testing=skip_testing),
    )

    async def work() -> list[RetryResult]:
        await backend.open()
        try:
            return await retry_parked(store, engine, ids)
        finally:
            await backend.close()

    try:
        results = asyncio.run(work())
    except ProcaSyncError as exc:
        raise _die(f"CRM: {exc}", ExitStatus.FAILED) from None
    for result in results:
        note = f" ({result.reason})" if result.reason else ""
        out.print(f"{result.id}: {result.outcome}{note}")
    still = sum(1 for r in results if r.outcome == "rejected")
    out.print(f"{len(results) - still} resolved, {still} still parked")
    raise typer.Exit(1 if still else 0)


@parked_app.command("drop")
def parked_drop(
    parked_id: Annotated[int, typer.Argument(help="Parked message id.")],
    parked: ParkedOption = DEFAULT_PARKED_URL,
) -> None:
    """Delete one parked message for good."""
    store = _open_parking(parked)
    if not store.delete(parked_id):
        raise _die(f"no parked message {parked_id}", ExitStatus.FAILED)
    out.print(f"dropped {parked_id}")


def main() -> None:
    """Console-script entry point."""
    os.environ.setdefault("PYTHONIOENCODING", "utf-8")
    app()


if __name__ == "__main__":
    main()


# ---- demo ----------------------------------------------------------------------------------


@app.command("demo")
def demo(
    url: Annotated[
        str, typer.Option("--url", help="Local broker (the demo declares its own org).")
    ] = "amqp://guest:guest@127.0.0.1:5672/",
    org: Annotated[int, typer.Option(min=1, help="Demo organisation id.")] = 9000,
    actions: Annotated[int, typer.Option(min=1, help="Simulated actions.")] = 3000,
    seed: Annotated[int, typer.Option(help="Traffic seed.")] = 2024,
    crm: Annotated[
        str, typer.Option("--crm", help="SQLite CRM the demo fills (a demo CRM is reset).")
    ] = DEFAULT_CRM_URL,
) -> None:
    """The main job on a local RabbitMQ: simulated Proca traffic synced into the embedded CRM.

    Declares a demo org, generates its key store, publishes encrypted actions and events
    (and a few malformed messages), runs the consumer until the queue is drained, then
    summarises contacts, consent, statuses, actions and parked messages.
    """
    from proca_sync.crm.sql import SqlBackend
    from proca_sync.pipeline.demo import (
        DemoPlan,
        prepare_files,
        publish_demo_traffic,
        summary_rows,
        wait_for_broker,
    )
    from proca_sync.pipeline.topology import deliver_queue

    configure_logging("WARNING")
    _quiet_amqp_logs("WARNING")
    plan = DemoPlan(url=url, org=org, actions=actions, seed=seed, crm=crm)
    try:
        asyncio.run(wait_for_broker(url, attempts=3))
    except Exception:
        raise _die(
            f"no RabbitMQ answers at {redact_url(url)}. Start one with `scripts/services.sh "
            "rabbitmq` (it installs Debian's rabbitmq-server when absent) or pass --url.",
            ExitStatus.FAILED,
        ) from None
    try:
        key = prepare_files(plan)
    except ConfigError as exc:
        raise _die(str(exc), ExitStatus.CONFIG) from None
    out.print(f"demo org {org}: key store {plan.keys}", soft_wrap=True)
    started = time.monotonic()
    result = asyncio.run(publish_demo_traffic(plan, key))
    out.print(
        f"published {sum(result.published.values())} messages to {deliver_queue(org)} "
        f"in {time.monotonic() - started:.1f} s"
    )
    settings = _consumer_settings(
        url=url,
        queue=deliver_queue(org),
        crm=crm,
        keys=plan.keys,
        parked=plan.parked,
        exit_when_idle=True,
        retry_delay=1.0,
        max_retries=3,
    )
    parking = ParkingStore(plan.parked)
    console = err if sys.stderr.isatty() else None
    started = time.monotonic()
    status, stats = asyncio.run(
        serve(
            settings,
            backend=SqlBackend(crm),
            parking=parking,
            keystore=Keystore.load(plan.keys),
            console=console,
        )
    )
    elapsed = time.monotonic() - started
    totals = stats.totals()
    out.print(
        f"synced the queue in {elapsed:.1f} s: {totals['acked']} acked, "
        f"{totals['parked']} parked, {totals['retried']} retried"
    )
    with SqlBackend(crm) as backend:
        crm_stats = backend.stats()
    parking.open_sync()
    table = Table(title="demo CRM", show_header=True)
    table.add_column("")
    table.add_column("count", justify="right")
    for label, value in summary_rows(crm_stats, parking.counts_by_reason()):
        table.add_row(label, value)
    out.print(table)
    out.print(
        f"explore it: proca-sync crm contacts --crm {crm}   |   "
        f"proca-sync parked list --parked {plan.parked}"
    )
    raise typer.Exit(int(status))
