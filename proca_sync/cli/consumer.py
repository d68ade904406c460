"""The queue consumer's commands: ``run``, ``queue status``, ``peek``, ``dump``.

Exit codes of `run`: ExitStatus in proca_sync/consumer/runner.py — 0 requested stop /
drained / --max-messages, 1 broker unreachable or internal error, 2 configuration
(missing queue, refused access, bad option), 130 a second signal. Passwords come from
PROCA_PASSWORD (or an --env-file), never from argv, and are never printed.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import orjson
import typer
from rich.table import Table

from proca_sync import aio
from proca_sync.cli.common import (
    CaFileOption,
    CrmOption,
    EnvFileOption,
    KeysOption,
    LogLevel,
    LogLevelOption,
    ModeOption,
    ParkedOption,
    QueueOption,
    SkipTestingOption,
    UrlOption,
    WebhookHeadersFileOption,
    WebhookSecretFileOption,
    WebhookTimeoutOption,
    app,
    configure_logging,
    consumer_settings,
    crm_backend,
    die,
    err,
    message_progress,
    on_broker,
    out,
    quiet_amqp_logs,
    warn_if_readable,
)
from proca_sync.cli.config import (
    DEFAULT_ERASURE_KEY,
    ConfigOption,
    ErasureKeyOption,
    attach_erasure_key,
    config_of,
    destinations_of,
)
from proca_sync.cli.push import LeaseTtlOption
from proca_sync.config import (
    DEFAULT_BATCH_SIZE,
    DEFAULT_CONCURRENCY,
    DEFAULT_CRM_URL,
    DEFAULT_MAX_RETRIES,
    DEFAULT_PARKED_URL,
    DEFAULT_RETRY_DELAY,
    DEFAULT_SHUTDOWN_TIMEOUT,
    RetryMode,
)
from proca_sync.consumer.browse import dump, peek, queue_status
from proca_sync.consumer.intake import BrokerUnavailableError, IntakeError
from proca_sync.consumer.parking import ParkingStore
from proca_sync.consumer.runner import ExitStatus, serve
from proca_sync.consumer.supervisor import Supervisor, parse_workers
from proca_sync.crm.base import Backend
from proca_sync.crm.sql import SqlBackend, check_store_url
from proca_sync.crypto import Keystore
from proca_sync.destinations.pusher import (
    DEFAULT_LEASE_TTL,
    Pusher,
    PusherCollector,
    alongside,
    status_line,
)
from proca_sync.errors import ConfigError
from proca_sync.sync.records import Mode

queue_app = typer.Typer(help="Look at the queue the consumer reads.", no_args_is_help=True)
app.add_typer(queue_app, name="queue")


@app.command("run")
def run_consumer(
    ctx: typer.Context,
    queue: QueueOption,
    env_file: EnvFileOption = None,
    config: ConfigOption = None,
    url: UrlOption = None,
    crm: CrmOption = DEFAULT_CRM_URL,
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
            "default max(2 × concurrency, 2 × batch size, 200).",
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
    log_level: LogLevelOption = LogLevel.INFO,
    webhook_secret_file: WebhookSecretFileOption = None,
    webhook_headers_file: WebhookHeadersFileOption = None,
    webhook_timeout: WebhookTimeoutOption = None,
    workers: Annotated[
        str,
        typer.Option(
            envvar="PROCA_WORKERS",
            help="Consumer processes on the queue under one supervisor (a number, or auto: "
            "one per core). Above 1 needs an order-independent CRM (SQL or null:).",
        ),
    ] = "1",
    push: Annotated[
        list[str] | None,
        typer.Option(
            "--push",
            help="Also push the CRM's changes to this destination ([destinations.NAME] of "
            "the config file), continuously, woken by each commit (repeatable).",
        ),
    ] = None,
    lease_ttl: LeaseTtlOption = DEFAULT_LEASE_TTL,
    erasure_key: ErasureKeyOption = DEFAULT_ERASURE_KEY,
) -> None:
    """Consume a Proca queue into the CRM until stopped (SIGTERM/SIGINT: graceful; twice: now).

    Acks only after the CRM committed; parks messages that cannot succeed (see `parked`);
    retries transient CRM failures; pauses while the CRM is down (circuit breaker).
    """
    console = configure_logging(log_level)
    quiet_amqp_logs(log_level)
    settings = consumer_settings(
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
    # Checked before connecting (no I/O, nothing created): a mistyped CRM or parking
    # location, key store or TLS file is a configuration error (exit 2), not an outage.
    backend = crm_backend(
        crm,
        secret_file=webhook_secret_file,
        headers_file=webhook_headers_file,
        timeout=webhook_timeout,
    )
    try:
        processes = parse_workers(workers)
    except ValueError as exc:
        raise die(str(exc), ExitStatus.CONFIG) from None
    if processes > 1 and crm.split(":", 1)[0].lower() in {"http", "https"}:
        # Competing consumers do not keep one contact's messages on one process, and
        # the webhook applies them in the order they arrive.
        raise die(
            "--workers above 1 needs the SQL or null: CRM: the webhook CRM must receive a "
            "contact's messages in order, which only one worker guarantees",
            ExitStatus.CONFIG,
        )
    try:
        aio.loop_factory()
        settings.ssl_context()
        keystore = Keystore.load(keys) if keys is not None else None
        check_store_url(parked, what="parking store")
        parking = ParkingStore(parked)
    except ConfigError as exc:
        raise die(str(exc), ExitStatus.CONFIG) from None
    pushers = _pushers(ctx, backend, push or [], lease_ttl=lease_ttl, erasure_key=erasure_key)
    if keys is not None:
        warn_if_readable(keys)
    if processes > 1:
        # The workers consume; this process pushes the destinations (under their lease),
        # following the change log the workers write.
        supervisor = Supervisor(
            settings, workers=processes, keys=keys, log_level=str(log_level).upper(),
            setup_logging=configure_logging, log_each=console is None,
            erasure_key=erasure_key,
        )  # fmt: skip
        code, all_stats = aio.run(alongside(supervisor.run(console=console), pushers))
        totals = all_stats.totals()
        status = ExitStatus(code)
    else:
        try:
            status, stats = aio.run(
                alongside(
                    serve(
                        settings,
                        backend=backend,
                        parking=parking,
                        keystore=keystore,
                        console=console,
                        collectors=[PusherCollector(pushers)] if pushers else (),
                        status_extra=(lambda: status_line(pushers)) if pushers else None,
                    ),
                    pushers,
                )
            )
        except (IntakeError, ConfigError) as exc:
            raise die(str(exc), ExitStatus.CONFIG) from None
        except BrokerUnavailableError as exc:
            raise die(str(exc), ExitStatus.FAILED) from None
        totals = stats.totals()
    if console is not None:
        table = Table(title="proca-sync run", show_header=True)
        table.add_column("outcome")
        table.add_column("messages", justify="right")
        for name in ("received", "acked", "retried", "parked", "returned"):
            table.add_row(name, str(totals[name]))
        for label, count in totals["by_label"].items():
            table.add_row(f"  {label}", str(count))
        out.print(table)
    raise typer.Exit(int(status))


def _pushers(
    ctx: typer.Context, backend: Backend, names: list[str], *, lease_ttl: float, erasure_key: Path
) -> list[Pusher]:
    """The pushers of ``run --push``, on the SQL CRM (which gets the erasure key)."""
    if isinstance(backend, SqlBackend):
        attach_erasure_key(backend, erasure_key, create=False)
    if not names:
        return []
    if not isinstance(backend, SqlBackend):
        raise die("--push needs the SQL CRM (sqlite:/// or postgresql://)", ExitStatus.CONFIG)
    tables = config_of(ctx).destinations
    return [
        Pusher(
            backend,
            destination,
            include_testing=bool(tables[destination.name].get("include_testing", False)),
            batch_size=tables[destination.name].get("batch_size"),
            lease_ttl=lease_ttl,
        )
        for destination in destinations_of(ctx, names)
    ]


@queue_app.command("status")
def queue_status_command(
    queue: QueueOption,
    env_file: EnvFileOption = None,
    url: UrlOption = None,
    ca_file: CaFileOption = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """Depth and consumers of the queue and, for a Proca cus.N.* queue, of org.N.fail."""
    settings = consumer_settings(url=url, queue=queue, ca_file=ca_file)
    states = on_broker(settings, lambda connection: queue_status(connection, queue))
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
    settings = consumer_settings(url=url, queue=queue, ca_file=ca_file)
    peeked = on_broker(settings, lambda connection: peek(connection, queue, count))
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
    out_dir: Annotated[
        Path,
        typer.Option("--out", help="Directory for the .jsonl/.json files (created 0600)."),
    ],
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
    settings = consumer_settings(url=url, queue=queue, ca_file=ca_file)
    console = err if err.is_terminal else None
    if console is None:
        report = on_broker(
            settings, lambda connection: dump(connection, queue, out_dir, count=count)
        )
    else:
        with message_progress(console, total_known=count is not None) as progress:
            task = progress.add_task(f"dump {queue}", total=count)
            report = on_broker(
                settings,
                lambda connection: dump(
                    connection, queue, out_dir, count=count,
                    on_chunk=lambda n: progress.advance(task, n),
                ),
            )
    out.print(
        f"moved {report.messages} message(s) from {queue} "
        f"into {len(report.files)} file(s) in {out_dir}"
    )
