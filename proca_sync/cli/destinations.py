"""``proca-sync destinations``: status, parked items and retries of each destination.

Shows ids, counts, codes and times only (parked items are named by their ledger id).
"""

from __future__ import annotations

import sys
import time
from typing import Annotated

import orjson
import typer
from rich.table import Table

from proca_sync.cli.common import EnvFileOption, SqlCrmOption, app, die, open_crm, out
from proca_sync.cli.config import ConfigOption, config_of
from proca_sync.crm.sql import DEFAULT_URL
from proca_sync.destinations.state import LedgerState, registered
from proca_sync.errors import ProcaSyncError

destinations_app = typer.Typer(
    help="Status, parked items and retries of the destinations.", no_args_is_help=True
)
app.add_typer(destinations_app, name="destinations")


def _when(stamp: float | None) -> str:
    if stamp is None:
        return "-"
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(stamp))


@destinations_app.command("status")
def status(
    ctx: typer.Context,
    config: ConfigOption = None,
    env_file: EnvFileOption = None,
    crm: SqlCrmOption = DEFAULT_URL,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """Pending changes, lag, last success and parked count of each destination."""
    with open_crm(crm) as backend:
        try:
            names = sorted(set(registered(backend)) | set(config_of(ctx).destinations))
            rows = [LedgerState(backend, name).status() for name in names]
        except ProcaSyncError as exc:
            raise die(f"CRM: {exc}", 1) from None
    if as_json:
        data = [
            {
                "name": s.name,
                "cursor": s.cursor,
                "pending": s.pending,
                "lagSeconds": None if s.lag is None else round(s.lag, 3),
                "lastSuccess": _when(s.last_success) if s.last_success else None,
                "parked": s.parked,
                "leased": s.lease_until is not None and s.lease_until > time.time(),
            }
            for s in rows
        ]
        sys.stdout.write(orjson.dumps(data, option=orjson.OPT_INDENT_2).decode() + "\n")
        return
    table = Table(title="destinations")
    for column in ("destination", "pending", "lag (s)", "last success", "parked", "pushing"):
        table.add_column(column)
    for s in rows:
        leased = s.lease_until is not None and s.lease_until > time.time()
        table.add_row(
            s.name,
            str(s.pending),
            "-" if s.lag is None else f"{s.lag:.1f}",
            _when(s.last_success),
            str(s.parked),
            "yes" if leased else "no",
        )
    out.print(table)


@destinations_app.command("parked")
def parked(
    name: Annotated[str, typer.Argument(help="Destination.")],
    env_file: EnvFileOption = None,
    crm: SqlCrmOption = DEFAULT_URL,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """The items a destination refused for good, with the API's error code."""
    with open_crm(crm) as backend:
        items = LedgerState(backend, name).parked()
    if as_json:
        data = [
            {
                "id": p.id,
                "kind": p.kind,
                "entity": p.entity,
                "code": p.code,
                "message": p.message,
                "parkedAt": _when(p.parked_at),
            }
            for p in items
        ]
        sys.stdout.write(orjson.dumps(data, option=orjson.OPT_INDENT_2).decode() + "\n")
        return
    table = Table(title=f"parked for {name} ({len(items)})")
    for column in ("id", "item", "code", "message", "parked at"):
        table.add_column(column)
    for p in items:
        table.add_row(str(p.id), f"{p.kind} {p.entity}", p.code, p.message, _when(p.parked_at))
    out.print(table)


@destinations_app.command("retry")
def retry(
    name: Annotated[str, typer.Argument(help="Destination.")],
    item: Annotated[int | None, typer.Argument(help="Parked item id (see `parked`).")] = None,
    all_items: Annotated[bool, typer.Option("--all", help="Every parked item.")] = False,
    env_file: EnvFileOption = None,
    crm: SqlCrmOption = DEFAULT_URL,
) -> None:
    """Offer parked items again: the next push sends them."""
    if (item is None) == (not all_items):
        raise die("give a parked item id or --all", 2)
    with open_crm(crm) as backend:
        count = LedgerState(backend, name).retry(None if all_items else [item or 0])
    if item is not None and count == 0:
        raise die(f"no parked item {item} for {name}", 1)
    out.print(f"{name}: {count} item(s) offered again")
