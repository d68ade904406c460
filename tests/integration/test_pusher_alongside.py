"""The pushers that run beside the consumer (``run --push``) outlive a failed start.

A pusher whose first steps hit a busy ledger (SQLite locked by the consumer's writes)
used to end its task quietly while the consumer went on acking: the destination never
caught up. It now starts again after a backoff.
"""

from __future__ import annotations

import asyncio
import logging
import sqlite3
from pathlib import Path

import pytest

from proca_sync.crm.sql import SqlBackend
from proca_sync.destinations import destination_from_config
from proca_sync.destinations.pusher import Pusher, alongside
from proca_sync.engine import Engine
from tests.integration.conftest import eventually
from tests.support import scenario


async def test_a_pusher_that_cannot_start_starts_again(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "crm.db"
    seed = SqlBackend(f"sqlite:///{path}")
    await seed.open()
    try:
        summary = await Engine(backend=seed, keystore=scenario.keystore()).run(
            scenario.bodies(), batch_size=50
        )
        assert not summary.rejected
    finally:
        await seed.close()

    # The consumer holds the write lock while the pusher starts; the pusher's ledger
    # gives up on a lock after 0.2 s (transient).
    blocker = sqlite3.connect(path, isolation_level=None)
    blocker.execute("BEGIN IMMEDIATE")
    backend = SqlBackend(f"sqlite:///{path}?timeout=0.2")
    out = tmp_path / "out"
    pusher = Pusher(
        backend, destination_from_config("out", {"type": "jsonl", "path": str(out)}),
        max_delay=1.0,
    )
    contacts = out / "contacts.jsonl"

    async def consumer() -> None:
        await eventually(
            lambda: any(r.getMessage().count("pusher stopped") for r in caplog.records),
            within=20, what="the pusher's failed start",
        )
        blocker.execute("COMMIT")

        async def caught_up() -> bool:
            return pusher.stats.contacts > 0 and (await pusher.status()).pending == 0

        await eventually(caught_up, within=30, what="the destination to catch up")

    caplog.set_level(logging.WARNING, logger="proca_sync.destinations")
    try:
        await asyncio.wait_for(alongside(consumer(), [pusher]), 60)
    finally:
        blocker.close()
        await backend.close()
    assert contacts.read_text().count("\n") == pusher.stats.contacts
