"""The configuration file on the command line: ``--config``, ``--erasure-key`` and
``proca-sync config check``.

``--config FILE`` (env ``PROCA_SYNC_CONFIG``; default ``./proca-sync.toml`` when present)
is an eager option: it reads the file before the other options and makes its top-level
keys their defaults, so an option given on the command line or in its environment
variable wins over the file.

``config check`` exits 0 when the file is valid and every destination answers, 1 when a
destination is unreachable for now, 2 on configuration errors (invalid file or table,
missing or refused key).
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table

from proca_sync.cli.common import app, die, out
from proca_sync.config_file import (
    CONFIG_ENV,
    ConfigFile,
    build_destinations,
    find_config,
    load_config,
)
from proca_sync.crm.sql import SqlBackend
from proca_sync.crm.sql.changelog import DEFAULT_ERASURE_KEY_FILE, load_erasure_key
from proca_sync.destinations.base import Destination
from proca_sync.errors import ConfigError, ProcaSyncError, TransientError

config_app = typer.Typer(help="Check the configuration file.", no_args_is_help=True)
app.add_typer(config_app, name="config")

_STRICT = {"run"}
"""Commands whose every file key must be one of their options (the file holds ``run``'s)."""


def _load(ctx: typer.Context, value: Path | None) -> Path | None:
    """Eager: read the file and make its keys the defaults of this command's options."""
    if ctx.resilient_parsing:
        return value
    path = find_config(value)
    try:
        config = load_config(path)
    except ConfigError as exc:
        raise typer.BadParameter(str(exc)) from None
    ctx.meta["proca_config"] = config
    params = {p.name for p in ctx.command.params if p.name}
    defaults: dict[str, Any] = {}
    for key, item in config.options.items():
        if key in params and key != "config":
            defaults[key] = item
        elif ctx.info_name in _STRICT:
            raise typer.BadParameter(f"config file {path}: unknown option {key!r}")
    ctx.default_map = {**(ctx.default_map or {}), **defaults}
    return path


ConfigOption = Annotated[
    Path | None,
    typer.Option(
        "--config",
        envvar=CONFIG_ENV,
        is_eager=True,
        callback=_load,
        help="TOML configuration file (default ./proca-sync.toml when present): run options "
        "and [destinations.NAME] tables. Command-line options win.",
    ),
]
ErasureKeyOption = Annotated[
    Path,
    typer.Option(
        "--erasure-key",
        envvar="PROCA_ERASURE_KEY_FILE",
        help="File of the key hashing erased contacts' e-mails and refs (created 0600 "
        "when absent).",
    ),
]
DEFAULT_ERASURE_KEY = DEFAULT_ERASURE_KEY_FILE


def config_of(ctx: typer.Context) -> ConfigFile:
    config = ctx.meta.get("proca_config")
    return config if isinstance(config, ConfigFile) else ConfigFile(None)


def attach_erasure_key(backend: SqlBackend, path: Path, *, create: bool) -> None:
    """Give the SQL CRM the erasure key (so erased people stay erased)."""
    try:
        key = load_erasure_key(path, create=create)
    except ConfigError as exc:
        raise die(str(exc), 2) from None
    if key is not None:
        backend.attach_erasure_key(key)


def destinations_of(ctx: typer.Context, names: list[str]) -> list[Destination]:
    try:
        return build_destinations(config_of(ctx), names)
    except ConfigError as exc:
        raise die(str(exc), 2) from None


@config_app.command("check")
def config_check(
    ctx: typer.Context,
    config: ConfigOption = None,
    timeout: Annotated[float, typer.Option(min=0.1, help="Seconds per ping.")] = 15.0,
) -> None:
    """Validate the configuration file and ping each destination."""
    loaded = config_of(ctx)
    if loaded.path is None:
        raise die("no configuration file (--config, PROCA_SYNC_CONFIG, ./proca-sync.toml)", 2)
    names = sorted(loaded.destinations)
    try:
        built = build_destinations(loaded, names)
    except ConfigError as exc:
        raise die(str(exc), 2) from None

    async def ping(destination: Destination) -> tuple[str, str]:
        try:
            await destination.open()
            try:
                await asyncio.wait_for(destination.ping(), timeout)
            finally:
                await destination.close()
        except ConfigError as exc:
            return "config", str(exc)
        except (TransientError, TimeoutError) as exc:
            return "unreachable", str(exc) or type(exc).__name__
        except ProcaSyncError as exc:
            return "config", str(exc)
        return "ok", ""

    async def main() -> list[tuple[str, str]]:
        return list(await asyncio.gather(*(ping(d) for d in built)))

    results = asyncio.run(main()) if built else []
    table = Table(title=f"{loaded.path}: {len(built)} destination(s)")
    for column in ("destination", "type", "status", "detail"):
        table.add_column(column)
    for destination, (status, detail) in zip(built, results, strict=True):
        table.add_row(destination.name, destination.type, status, detail)
    out.print(table)
    if any(status == "config" for status, _ in results):
        raise typer.Exit(2)
    if any(status != "ok" for status, _ in results):
        raise typer.Exit(1)
