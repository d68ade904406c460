"""``proca-sync push NAME...``: push what the destinations lack, from the CRM's change log.

Exit codes: 0 every destination caught up with nothing parked; 1 something is parked,
or ``--timeout`` passed with changes still pending (they stay pending: nothing is lost);
2 configuration errors (unknown destination, invalid table, missing or refused key).
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import sys
from collections.abc import Callable
from typing import Annotated

import typer
from rich.progress import BarColumn, Progress, TaskID, TextColumn, TimeElapsedColumn

from proca_sync import aio
from proca_sync.cli.common import (
    EnvFileOption,
    SqlCrmOption,
    app,
    configure_logging,
    die,
    err,
    open_crm,
    out,
)
from proca_sync.cli.config import (
    DEFAULT_ERASURE_KEY,
    ConfigOption,
    ErasureKeyOption,
    attach_erasure_key,
    destinations_of,
)
from proca_sync.crm.sql import DEFAULT_URL
from proca_sync.destinations.pusher import DEFAULT_LEASE_TTL, Pusher, PusherStats, PushResult
from proca_sync.errors import ConfigError

LeaseTtlOption = Annotated[
    float,
    typer.Option(
        "--lease-ttl",
        envvar="PROCA_LEASE_TTL",
        min=0.5,
        help="Seconds a push lease lasts unrenewed: how soon another process takes over "
        "from a dead pusher.",
    ),
]


@app.command("push")
def push(
    ctx: typer.Context,
    names: Annotated[list[str], typer.Argument(help="Destinations ([destinations.NAME]).")],
    config: ConfigOption = None,
    env_file: EnvFileOption = None,
    crm: SqlCrmOption = DEFAULT_URL,
    follow: Annotated[
        bool, typer.Option("--follow", help="Keep pushing new changes until stopped.")
    ] = False,
    timeout: Annotated[
        float | None, typer.Option(min=0.1, help="Stop after this many seconds.")
    ] = None,
    lease_ttl: LeaseTtlOption = DEFAULT_LEASE_TTL,
    erasure_key: ErasureKeyOption = DEFAULT_ERASURE_KEY,
    log_level: Annotated[str, typer.Option(envvar="PROCA_LOG_LEVEL", help="Log level.")] = "INFO",
) -> None:
    """Push the CRM's changes to destinations (merged current state, batched, rate-limited).

    SIGTERM/SIGINT stop after the batch in flight; what is not pushed stays pending.
    """
    configure_logging(log_level.upper())
    destinations = destinations_of(ctx, names)
    backend = open_crm(crm)
    attach_erasure_key(backend, erasure_key, create=False)
    settings = {n: ctx.meta["proca_config"].destinations[n] for n in names}
    pushers = [
        Pusher(
            backend,
            d,
            include_testing=bool(settings[d.name].get("include_testing", False)),
            batch_size=settings[d.name].get("batch_size"),
            lease_ttl=lease_ttl,
        )
        for d in destinations
    ]
    try:
        results = aio.run(_run(pushers, follow=follow, within=timeout))
    except ConfigError as exc:
        raise die(str(exc), 2) from None
    finally:
        for pusher in pushers:
            pusher.close()
        backend.close_sync()
    code = 0
    for pusher, result in zip(pushers, results, strict=True):
        state = "caught up" if result.caught_up else f"{result.stats.pending} pending"
        out.print(
            f"{pusher.name}: {state}; pushed {result.stats.contacts} contacts, "
            f"{result.stats.actions} actions, {result.stats.erasures} erasures "
            f"in {result.stats.requests} requests; parked {result.parked}"
        )
        if result.parked or not result.caught_up:
            code = 1
    raise typer.Exit(code)


async def _run(pushers: list[Pusher], *, follow: bool, within: float | None) -> list[PushResult]:
    loop = asyncio.get_running_loop()
    installed = []
    for sig in (signal.SIGTERM, signal.SIGINT):
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(sig, _stop_all, pushers)
            installed.append(sig)
    progress: Progress | None = None
    if sys.stderr.isatty():
        progress = Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            TextColumn("{task.fields[line]}"),
            TimeElapsedColumn(),
            console=err,
            transient=True,
        )
        progress.start()
        for pusher in pushers:
            task = progress.add_task(pusher.name, total=None, line="")
            pusher.progress = _show(progress, task)
    try:
        return list(await asyncio.gather(*(p.run(follow=follow, within=within) for p in pushers)))
    finally:
        if progress is not None:
            progress.stop()
        for sig in installed:
            loop.remove_signal_handler(sig)


def _stop_all(pushers: list[Pusher]) -> None:
    for pusher in pushers:
        pusher.request_stop()


def _show(progress: Progress, task: TaskID) -> Callable[[PusherStats], None]:
    def update(stats: PusherStats) -> None:
        done = stats.contacts + stats.actions + stats.erasures
        progress.update(
            task,
            completed=done,
            total=done + stats.pending if stats.pending else None,
            line=f"{done} items, {stats.pending} changes pending, parked {stats.parked}, "
            f"breaker {stats.breaker}",
        )

    return update
