"""``proca-sync demo``: the main job on a local RabbitMQ."""

from __future__ import annotations

import asyncio
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from proca_sync.cli.common import (
    EnvFileOption,
    app,
    configure_logging,
    consumer_settings,
    die,
    out,
    quiet_amqp_logs,
)
from proca_sync.config import (
    DEFAULT_CRM_URL,
    redact_url,
)
from proca_sync.consumer.parking import ParkingStore
from proca_sync.consumer.runner import ExitStatus, serve
from proca_sync.crm.sql import SqlBackend, check_store_url
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
        str,
        typer.Option(
            "--crm",
            envvar="PROCA_CRM",
            metavar="URL",
            help="The SQLite CRM the demo fills, sqlite:///file.db (only SQLite; a CRM the "
            "demo created is reset, any other is refused).",
        ),
    ] = DEFAULT_CRM_URL,
    env_file: EnvFileOption = None,
) -> None:
    """The main job on a local RabbitMQ: simulated Proca traffic synced into the embedded CRM.

    Declares a demo org, generates its key store, publishes encrypted actions and events
    (and a few malformed messages), runs the consumer until the queue is drained, then
    summarises contacts, consent, statuses, actions and parked messages.
    """
    from proca_sync.pipeline.demo import (
        DemoPlan,
        prepare_files,
        publish_demo_traffic,
        summary_rows,
        wait_for_broker,
    )
    from proca_sync.pipeline.topology import deliver_queue

    console = configure_logging("WARNING")
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
        check_store_url(crm, what="demo CRM")
        key = prepare_files(plan)
    except ConfigError as exc:
        raise die(str(exc), ExitStatus.CONFIG) from None
    out.print(f"demo org {org}: key store {plan.keys}", soft_wrap=True)
    started = time.monotonic()
    result = asyncio.run(publish_demo_traffic(plan, key))
    published = sum(result.published.values())
    confirm = result.published.get("supporter_confirm", 0)
    out.print(
        f"published {published} messages in {time.monotonic() - started:.1f} s: "
        f"{published - confirm} to {deliver_queue(org)} (what the sync reads)",
        soft_wrap=True,
    )
    if confirm:
        out.print(
            f"  and {confirm} of stage supporter_confirm to Proca's confirm exchange: they "
            "wait for the supporter's e-mail confirmation, which no one gives in the demo, "
            f"so they never reach {deliver_queue(org)}"
            + (f" ({result.unroutable} had no queue bound: dropped)" if result.unroutable else ""),
            soft_wrap=True,
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
    parking.open_sync()
    distinct = parking.count()
    out.print(
        f"synced the queue in {elapsed:.1f} s: {totals['acked']} acked + "
        f"{totals['parked']} parked = {totals['acked'] + totals['parked']} settled; "
        f"{totals['retried']} retries",
        soft_wrap=True,
    )
    if totals["parked"] != distinct:
        out.print(
            f"  {totals['parked']} parked deliveries are {distinct} distinct messages: the "
            "traffic sends some malformed messages twice, and the parking store keeps one "
            "row per message (counting how often it was parked)",
            soft_wrap=True,
        )
    with SqlBackend(crm) as backend:
        crm_stats = backend.stats()
    table = Table(title="demo CRM", show_header=True)
    table.add_column("")
    table.add_column("count", justify="right")
    for label, value in summary_rows(crm_stats, parking.counts_by_reason()):
        table.add_row(label, value)
    out.print(table)
    exe = _how_to_run()
    out.print("explore it:", soft_wrap=True)
    out.print(f"  {exe} crm contacts --crm {crm}", soft_wrap=True)
    out.print(f"  {exe} parked list --parked {plan.parked}", soft_wrap=True)
    raise typer.Exit(int(status))


def _how_to_run() -> str:
    """How to call this proca-sync from the user's shell: ``proca-sync`` when that is on
    the PATH, else the script beside this Python (the venv's ``bin/``) by a path that
    works from the current folder."""
    script = Path(sys.executable).parent / "proca-sync"
    found = shutil.which("proca-sync")
    if found and Path(found).resolve() == script.resolve():
        return "proca-sync"
    if not script.exists():
        return f"{sys.executable} -m proca_sync"
    try:
        relative = os.path.relpath(script)
    except ValueError:  # another drive (Windows)
        return str(script)
    return relative if relative.startswith("..") else f"./{relative}"
