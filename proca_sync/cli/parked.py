"""``proca-sync parked``: messages the consumer parked."""

from __future__ import annotations

import asyncio
import sys
from typing import Annotated

import orjson
import typer
from rich import box
from rich.table import Table

from proca_sync.cli.common import (
    CrmOption,
    EnvFileOption,
    KeysOption,
    ModeOption,
    ParkedOption,
    SkipTestingOption,
    WebhookHeadersFileOption,
    WebhookSecretFileOption,
    WebhookTimeoutOption,
    app,
    configure_logging,
    crm_backend,
    die,
    load_keystore,
    message_progress,
    out,
    require_existing_store,
)
from proca_sync.config import (
    DEFAULT_CRM_URL,
    DEFAULT_PARKED_URL,
)
from proca_sync.consumer.browse import summarize
from proca_sync.consumer.parking import ParkedMessage, ParkingStore, RetryResult, retry_parked
from proca_sync.consumer.runner import ExitStatus
from proca_sync.engine import Engine
from proca_sync.errors import ConfigError, ProcaSyncError
from proca_sync.sync.model import Options
from proca_sync.sync.records import Mode

parked_app = typer.Typer(
    help="Messages the consumer parked (kept with their reason; retry or drop them).",
    no_args_is_help=True,
)
app.add_typer(parked_app, name="parked")


def _open_parking(url: str) -> ParkingStore:
    """The parking store at ``url``; a SQLite file that does not exist is an error (exit
    2): every ``parked`` command reads, and an empty store is never created to read it."""
    require_existing_store(url, what="parking store", option="--parked")
    try:
        store = ParkingStore(url)
        store.open_sync()
    except ConfigError as exc:
        raise die(str(exc), ExitStatus.CONFIG) from None
    return store


def _parked_or_exit(store: ParkingStore, parked_id: int) -> ParkedMessage:
    message = store.get(parked_id)
    if message is None:
        raise die(f"no parked message {parked_id}", ExitStatus.FAILED)
    return message


@parked_app.command("list")
def parked_list(
    parked: ParkedOption = DEFAULT_PARKED_URL,
    env_file: EnvFileOption = None,
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
    # Fits 80 columns: light borders; queue and reason are what an operator copies into
    # the next command, so they fold over lines, never cut.
    table = Table(
        title=f"parked messages ({total})",
        box=box.SIMPLE_HEAD,
        show_edge=False,
        collapse_padding=True,
    )
    # Full time and kind: `parked show` and --json.
    for column in ("id", "parked", "queue", "reason", "tries", "actionId"):
        table.add_column(column, overflow="fold", justify="right" if column == "id" else "left")
    for row in rows:
        summary = summarize(row.body)
        table.add_row(
            str(row.id),
            row.parked_at[5:16].replace("T", " "),
            row.queue,
            row.reason,
            str(row.attempts),
            "-" if summary.action_id is None else str(summary.action_id),
        )
    out.print(table)


@parked_app.command("show")
def parked_show(
    parked_id: Annotated[int, typer.Argument(help="Parked message id.")],
    parked: ParkedOption = DEFAULT_PARKED_URL,
    env_file: EnvFileOption = None,
    body: Annotated[
        bool, typer.Option("--body", help="Also print the raw body (it holds personal data).")
    ] = False,
) -> None:
    """Metadata, reason and a summary of one parked message; the body only with --body."""
    store = _open_parking(parked)
    message = _parked_or_exit(store, parked_id)
    summary = summarize(message.body)
    table = Table(show_header=False, title=f"parked message {message.id}")
    table.add_column("field", no_wrap=True)
    table.add_column("value", overflow="fold")
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
    env_file: EnvFileOption = None,
    keys: KeysOption = None,
    mode: ModeOption = Mode.ALL,
    skip_testing: SkipTestingOption = False,
    webhook_secret_file: WebhookSecretFileOption = None,
    webhook_headers_file: WebhookHeadersFileOption = None,
    webhook_timeout: WebhookTimeoutOption = None,
) -> None:
    """Feed parked messages through the engine into the CRM again.

    Synced (or now ignored) messages leave the store; refused ones stay with the new
    reason. Exit 1 when some are still refused or the CRM is unavailable.
    """
    if (parked_id is None) == (not all_):
        raise die("give one parked message id or --all", ExitStatus.CONFIG)
    console = configure_logging()
    store = _open_parking(parked)
    ids = store.ids() if all_ else [_parked_or_exit(store, parked_id or 0).id]
    backend = crm_backend(
        crm,
        secret_file=webhook_secret_file,
        headers_file=webhook_headers_file,
        timeout=webhook_timeout,
    )
    engine = Engine(
        backend=backend,
        keystore=load_keystore(keys, warn_readable=True),
        options=Options(mode=mode, skip_testing=skip_testing),
    )

    async def work() -> list[RetryResult]:
        await backend.open()
        try:
            if console is None or len(ids) < 2:
                return await retry_parked(store, engine, ids)
            with message_progress(console) as progress:
                task = progress.add_task("retrying parked messages", total=len(ids))
                return await retry_parked(
                    store, engine, ids, on_result=lambda _r: progress.advance(task)
                )
        finally:
            await backend.close()

    try:
        results = asyncio.run(work())
    except ConfigError as exc:
        raise die(f"CRM: {exc}", ExitStatus.CONFIG) from None
    except ProcaSyncError as exc:
        raise die(f"CRM: {exc}", ExitStatus.FAILED) from None
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
    env_file: EnvFileOption = None,
) -> None:
    """Delete one parked message for good."""
    store = _open_parking(parked)
    if not store.delete(parked_id):
        raise die(f"no parked message {parked_id}", ExitStatus.FAILED)
    out.print(f"dropped {parked_id}")
