"""``proca-sync demo``: the main job on a local RabbitMQ."""

from __future__ import annotations

import asyncio
import sys
import time
from typing import Annotated

import typer
from rich.table import Table

from proca_sync.cli.common import (
    app,
    configure_logging,
    consumer_settings,
    die,
    err,
    out,
    quiet_amqp_logs,
)
from proca_sync.config import (
    DEFAULT_CRM_URL,
    redact_url,
)
from proca_sync.consumer.parking import ParkingStore
from proca_sync.consumer.runner import ExitStatus, serve
from proca_sync.crm.sql import SqlBackend
from proca_sync.crypto import Keystore
from proca_sync.errors import ConfigError


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
    pipeline: Annotated[
        bool,
        typer.Option(
            "--pipeline",
            help="Run the processing pipeline instead: HTTP intake → supporter "
            "confirmation → delivery → sync.",
        ),
    ] = False,
) -> None:
    """The main job on a local RabbitMQ: simulated Proca traffic synced into the embedded CRM.

    Declares a demo org, generates its key store, publishes encrypted actions and events
    (and a few malformed messages), runs the consumer until the queue is drained, then
    summarises contacts, consent, statuses, actions and parked messages. With
    ``--pipeline`` the traffic comes from the pipeline itself: supporters are submitted to
    its HTTP intake, confirmed (or rejected) through the links, one e-mail bounces, and
    what the pipeline delivers and emits is synced.
    """
    from proca_sync.pipeline.demo import (
        DemoPlan,
        prepare_files,
        publish_demo_traffic,
        summary_rows,
        wait_for_broker,
    )
    from proca_sync.pipeline.topology import deliver_queue

    configure_logging("WARNING")
    quiet_amqp_logs("WARNING")
    plan = DemoPlan(url=url, org=org, actions=actions, seed=seed, crm=crm)
    try:
        asyncio.run(wait_for_broker(url, attempts=3))
    except Exception:
        raise die(
            f"no RabbitMQ answers at {redact_url(url)}. Start one with `scripts/services.sh "
            "rabbitmq` (it installs Debian's rabbitmq-server when absent) or pass --url.",
            ExitStatus.FAILED,
        ) from None
    try:
        key = prepare_files(plan)
    except ConfigError as exc:
        raise die(str(exc), ExitStatus.CONFIG) from None
    out.print(f"demo org {org}: key store {plan.keys}", soft_wrap=True)
    started = time.monotonic()
    if pipeline:
        from proca_sync.pipeline.demo import run_pipeline_demo

        walked = asyncio.run(run_pipeline_demo(plan, key, supporters=min(actions, 200)))
        out.print(
            f"pipeline: {walked.submitted} supporters submitted over HTTP, "
            f"{walked.confirmed} confirmed ({walked.double_opt_in} with double opt-in), "
            f"{walked.rejected} rejected, {walked.bounced} bounced; {walked.published} "
            f"messages published in {time.monotonic() - started:.1f} s"
        )
    else:
        result = asyncio.run(publish_demo_traffic(plan, key))
        out.print(
            f"published {sum(result.published.values())} messages to {deliver_queue(org)} "
            f"in {time.monotonic() - started:.1f} s"
        )
    settings = consumer_settings(
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
