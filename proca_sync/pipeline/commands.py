"""CLI commands of the pipeline: ``topology declare``, ``topology show`` and ``simulate``.

Registered by :mod:`proca_sync.cli` (``app.add_typer(topology_app, name="topology")``,
``app.command("simulate")(simulate)``). They print names, counts and key prefixes, never
personal data, passwords or private keys. Exit codes: 0 success; 1 the broker could not
be reached or failed mid-way; 2 usage or configuration error (bad URL, refused
topology, unreadable key store).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from enum import StrEnum
from pathlib import Path
from typing import Annotated, TypeVar
from urllib.parse import urlsplit, urlunsplit

import aio_pika
import aiormq.exceptions
import typer
from aio_pika.abc import AbstractConnection
from rich.console import Console
from rich.table import Table

from proca_sync.crypto import Keystore
from proca_sync.errors import ConfigError
from proca_sync.pipeline.simulate import plan_traffic, publish_traffic
from proca_sync.pipeline.topology import (
    DEFAULT_RETRY_DELAY_MS,
    OrgFlags,
    Topology,
    TopologyReport,
    declare_topology,
    inspect_topology,
    plan_topology,
)

__all__ = ["DEFAULT_URL", "simulate", "topology_app"]

DEFAULT_URL = "amqp://guest:guest@127.0.0.1:5672/"
EXIT_BROKER = 1
EXIT_CONFIG = 2

T = TypeVar("T")

topology_app = typer.Typer(
    help="Declare and inspect an org's Proca RabbitMQ topology (only on a broker you own).",
    no_args_is_help=True,
)

out = Console(highlight=False)
err = Console(stderr=True, highlight=False)


class BackendChoice(StrEnum):
    SQS = "sqs"
    WEBHOOK = "webhook"


UrlOption = Annotated[
    str, typer.Option("--url", envvar="PROCA_URL", help="AMQP URL of the broker (with vhost).")
]
OrgOption = Annotated[int, typer.Option("--org", min=1, help="Organisation id N.")]
SupporterConfirmQueue = Annotated[
    bool,
    typer.Option(help="cus.N.confirm.supporter bound (customSupporterConfirm)."),
]
ActionConfirmQueue = Annotated[
    bool, typer.Option(help="cus.N.confirm.action bound (customActionConfirm).")
]
ActionDeliver = Annotated[
    bool, typer.Option(help="cus.N.deliver receives actions (customActionDeliver).")
]
EventDeliver = Annotated[
    bool, typer.Option(help="cus.N.deliver receives events (customEventDeliver).")
]
EmailBackend = Annotated[bool, typer.Option(help="The org has an e-mail backend.")]
SupporterConfirm = Annotated[
    bool, typer.Option(help="The org or one of its campaigns confirms supporters.")
]
PushBackend = Annotated[BackendChoice | None, typer.Option(help="Push (action) backend service.")]
EventBackend = Annotated[BackendChoice | None, typer.Option(help="Event backend service.")]


def _safe_url(url: str) -> str:
    """The URL without its password, for messages."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = f"{parts.username}:***@{parts.hostname}" + (f":{parts.port}" if parts.port else "")
    return urlunsplit(parts._replace(netloc=netloc))


def _run(url: str, work: Callable[[AbstractConnection], Awaitable[T]]) -> T:
    async def main() -> T:
        connection = await aio_pika.connect(url)
        async with connection:
            return await work(connection)

    try:
        return asyncio.run(main())
    except ConfigError as exc:
        err.print(f"[red]error:[/red] {exc}")
        raise typer.Exit(EXIT_CONFIG) from None
    except ValueError as exc:
        err.print(f"[red]error:[/red] {_safe_url(url)}: {exc}")
        raise typer.Exit(EXIT_CONFIG) from None
    except (aiormq.exceptions.AMQPError, OSError) as exc:
        err.print(f"[red]error:[/red] broker {_safe_url(url)}: {type(exc).__name__}: {exc}")
        raise typer.Exit(EXIT_BROKER) from None


def _flags(
    custom_supporter_confirm: bool,
    custom_action_confirm: bool,
    custom_action_deliver: bool,
    custom_event_deliver: bool,
    email_backend: bool,
    supporter_confirm: bool,
    push_backend: BackendChoice | None,
    event_backend: BackendChoice | None,
) -> OrgFlags:
    return OrgFlags(
        custom_supporter_confirm=custom_supporter_confirm,
        custom_action_confirm=custom_action_confirm,
        custom_action_deliver=custom_action_deliver,
        custom_event_deliver=custom_event_deliver,
        email_backend=email_backend,
        supporter_confirm=supporter_confirm,
        push_backend=None if push_backend is None else push_backend.value,
        event_backend=None if event_backend is None else event_backend.value,
    )


def _plan_table(topology: Topology) -> Table:
    table = Table(title=f"org {topology.org}: bindings")
    table.add_column("exchange")
    table.add_column("queue")
    table.add_column("key")
    table.add_column("state")
    for binding in topology.bindings:
        table.add_row(binding.exchange, binding.queue, binding.routing_key or "''", "bound")
    for binding in topology.unbindings:
        table.add_row(binding.exchange, binding.queue, binding.routing_key, "[dim]unbound[/dim]")
    return table


def _report_table(report: TopologyReport) -> Table:
    table = Table(title=f"org {report.org}: queues")
    table.add_column("queue")
    table.add_column("exists")
    table.add_column("messages", justify="right")
    table.add_column("consumers", justify="right")
    for state in report.queues:
        if state.exists:
            table.add_row(state.name, "yes", str(state.messages), str(state.consumers))
        else:
            table.add_row(state.name, "[dim]no[/dim]", "-", "-")
    return table


@topology_app.command("declare")
def declare(
    org: OrgOption,
    custom_supporter_confirm: SupporterConfirmQueue = False,
    custom_action_confirm: ActionConfirmQueue = False,
    custom_action_deliver: ActionDeliver = True,
    custom_event_deliver: EventDeliver = True,
    email_backend: EmailBackend = False,
    supporter_confirm: SupporterConfirm = False,
    push_backend: PushBackend = None,
    event_backend: EventBackend = None,
    retry_delay: Annotated[
        int,
        typer.Option("--retry-delay", min=1, help="Milliseconds a rejected message waits."),
    ] = DEFAULT_RETRY_DELAY_MS,
    url: UrlOption = DEFAULT_URL,
    quorum: Annotated[
        bool,
        typer.Option(
            "--quorum",
            help="Declare the org's queues as quorum queues (replicated, for a RabbitMQ "
            "cluster; RabbitMQ >= 3.10). An existing classic queue must be deleted first.",
        ),
    ] = False,
) -> None:
    """Declare org N's exchanges and queues like the Proca server (idempotent).

    Switched-off features are unbound; queues are never deleted.
    """
    flags = _flags(
        custom_supporter_confirm,
        custom_action_confirm,
        custom_action_deliver,
        custom_event_deliver,
        email_backend,
        supporter_confirm,
        push_backend,
        event_backend,
    )
    topology = plan_topology(org, flags, retry_delay_ms=retry_delay, quorum=quorum)

    async def work(connection: AbstractConnection) -> None:
        channel = await connection.channel()
        await declare_topology(channel, topology)

    _run(url, work)
    out.print(_plan_table(topology))
    out.print(
        f"declared {len(topology.exchanges)} exchanges and {len(topology.queues)} "
        f"{'quorum ' if quorum else ''}queues on {_safe_url(url)}; retry delay {retry_delay} ms"
    )


@topology_app.command("show")
def show(
    org: OrgOption,
    custom_supporter_confirm: SupporterConfirmQueue = False,
    custom_action_confirm: ActionConfirmQueue = False,
    custom_action_deliver: ActionDeliver = True,
    custom_event_deliver: EventDeliver = True,
    email_backend: EmailBackend = False,
    supporter_confirm: SupporterConfirm = False,
    push_backend: PushBackend = None,
    event_backend: EventBackend = None,
    url: UrlOption = DEFAULT_URL,
) -> None:
    """Show org N's queue depths (passive, changes nothing) and the bindings the flags plan."""
    flags = _flags(
        custom_supporter_confirm,
        custom_action_confirm,
        custom_action_deliver,
        custom_event_deliver,
        email_backend,
        supporter_confirm,
        push_backend,
        event_backend,
    )

    async def work(connection: AbstractConnection) -> TopologyReport:
        return await inspect_topology(connection, org, flags)

    report = _run(url, work)
    out.print(_report_table(report))
    out.print(_plan_table(plan_topology(org, flags)))


def _load_env_file(value: Path | None) -> Path | None:
    from proca_sync.cli.common import load_env_file  # the CLI's one loader (lazy: no cycle)

    return load_env_file(value)


def simulate(
    org: OrgOption,
    actions: Annotated[int, typer.Option("--actions", min=0, help="Action messages.")] = 100,
    seed: Annotated[int, typer.Option("--seed", help="Same seed, same messages.")] = 0,
    rate: Annotated[
        float | None,
        typer.Option("--rate", min=0.001, help="Messages per second (default: at once)."),
    ] = None,
    keys: Annotated[
        Path | None,
        typer.Option(
            "--keys",
            envvar="PROCA_KEYS",
            help="Key store of the org: its first key encrypts the simulated personal data.",
        ),
    ] = None,
    poison: Annotated[
        int, typer.Option("--poison", min=0, help="Malformed messages of each kind.")
    ] = 0,
    url: UrlOption = DEFAULT_URL,
    via_intake: Annotated[
        str | None,
        typer.Option(
            "--via-intake",
            help="Submit the supporters' actions to this pipeline intake (http://host:port) "
            "instead of publishing messages; needs --page.",
        ),
    ] = None,
    page: Annotated[
        int | None, typer.Option("--page", min=1, help="Action page id for --via-intake.")
    ] = None,
    env_file: Annotated[
        Path | None,
        typer.Option(
            "--env-file",
            envvar="PROCA_ENV_FILE",
            is_eager=True,
            callback=_load_env_file,
            help="Load PROCA_* variables from this dotenv file first (set variables win).",
        ),
    ] = None,
) -> None:
    """Publish realistic, invented Proca traffic for org N to its exchanges.

    Declare the topology first (``topology declare``): without bound queues the broker
    drops the messages, as Proca's does. With ``--via-intake`` the same journeys go
    through a ``proca-sync pipeline serve`` HTTP intake instead (events, v1 and poison
    have no form and are skipped).
    """
    if via_intake is not None:
        _simulate_via_intake(org, actions, seed, rate, via_intake, page)
        return
    org_key = None
    if keys is not None:
        try:
            store = Keystore.load(keys)
        except ConfigError as exc:
            err.print(f"[red]error:[/red] {exc}")
            raise typer.Exit(EXIT_CONFIG) from None
        org_key = next(iter(store), None)
        if org_key is None:
            err.print(f"[red]error:[/red] key store {keys} holds no key")
            raise typer.Exit(EXIT_CONFIG)
    planned = plan_traffic(org, actions=actions, seed=seed, keys=org_key, poison=poison)

    async def work(connection: AbstractConnection) -> tuple[dict[str, int], int]:
        channel = await connection.channel(publisher_confirms=True)
        report = await publish_traffic(channel, planned, rate=rate)
        return report.counts, report.unroutable

    counts, unroutable = _run(url, work)
    table = Table(title=f"simulated traffic for org {org} (seed {seed})")
    table.add_column("kind")
    table.add_column("published", justify="right")
    for kind, count in counts.items():
        table.add_row(kind, str(count))
    table.add_row("[bold]total[/bold]", str(sum(counts.values())))
    out.print(table)
    if org_key is not None:
        out.print(f"personal data encrypted for key {org_key.public[:8]}…")
    if unroutable:
        out.print(
            f"[yellow]{unroutable} messages were unroutable (no queue bound) and dropped[/yellow]"
        )


def _simulate_via_intake(
    org: int, actions: int, seed: int, rate: float | None, base_url: str, page: int | None
) -> None:
    from proca_sync.pipeline.drive import intake_items, post_traffic

    if page is None:
        err.print("[red]error:[/red] --via-intake needs --page (an action page of the pipeline)")
        raise typer.Exit(EXIT_CONFIG)
    if urlsplit(base_url).scheme not in ("http", "https"):
        err.print("[red]error:[/red] --via-intake takes an http(s):// URL")
        raise typer.Exit(EXIT_CONFIG)
    items, skipped = intake_items(plan_traffic(org, actions=actions, seed=seed), page)
    report = asyncio.run(post_traffic(base_url, items, rate=rate))
    table = Table(title=f"simulated submissions to {base_url} (seed {seed})")
    table.add_column("kind")
    table.add_column("submitted", justify="right")
    for kind, count in sorted(report.counts.items()):
        table.add_row(kind, str(count))
    table.add_row("skipped (no intake form)", str(skipped))
    out.print(table)
    answers = ", ".join(
        f"{status or 'no answer'}: {n}" for status, n in sorted(report.statuses.items())
    )
    out.print(f"HTTP answers: {answers}")
    if set(report.statuses) - {200}:
        raise typer.Exit(1)
