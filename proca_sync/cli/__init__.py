"""The ``proca-sync`` command line: one module per command group. It only wires options
into constructors (exit codes: :mod:`proca_sync.cli.common`)."""

from __future__ import annotations

import os

from proca_sync.cli import (
    config,
    consumer,
    crm,
    demo,
    destinations,
    keys,
    parked,
    pipeline,
    push,
    replay,
    web,
    worker,
)
from proca_sync.cli.common import ExitCode, app, configure_logging
from proca_sync.cli.replay import read_bodies
from proca_sync.pipeline.commands import simulate, topology_app

__all__ = ["ExitCode", "app", "configure_logging", "main", "read_bodies"]

# The modules register their commands on ``app`` when imported.
_COMMAND_MODULES = (
    replay, keys, crm, consumer, parked, demo, push, destinations, config, pipeline, worker, web,
)  # fmt: skip

app.add_typer(topology_app, name="topology", help="Declare and inspect an org's Proca queues.")
app.command("simulate")(simulate)


def main() -> None:
    """Console-script entry point."""
    os.environ.setdefault("PYTHONIOENCODING", "utf-8")
    app()
