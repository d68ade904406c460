"""``proca-sync demo``: the main job end to end on a local broker, in under a minute.

Declares a demo org's Proca topology, generates its key store, publishes a few thousand
simulated encrypted actions and events (with some malformed messages), runs the real
consumer into the embedded SQLite CRM until the queue is drained, and summarises the
result. Every part is the production code path; only the traffic is invented.

The demo owns what it creates: the demo org's queues (purged at the start), the key
store ``proca-demo-keys.json``, the parked store ``proca-demo-parked.db`` and the CRM
file. The CRM file is marked as a demo CRM; an existing CRM without that mark is never
touched (the demo refuses and says which ``--crm`` to use instead).
"""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aio_pika
from sqlalchemy import select
from sqlalchemy.engine import make_url

from proca_sync.crm.sql import SqlBackend, meta_table
from proca_sync.crypto import KeyPair, Keystore
from proca_sync.errors import ConfigError
from proca_sync.pipeline.simulate import plan_traffic, publish_traffic
from proca_sync.pipeline.topology import declare_test_org, deliver_queue, fail_queue

__all__ = ["DemoPlan", "DemoResult", "prepare_files", "publish_demo_traffic"]

DEMO_MARK = "demo"


@dataclass(frozen=True)
class DemoPlan:
    url: str
    org: int = 9000
    actions: int = 3000
    seed: int = 2024
    poison: int = 2
    crm: str = "sqlite:///proca-crm.db"
    keys: Path = Path("proca-demo-keys.json")
    parked: str = "sqlite:///proca-demo-parked.db"
    retry_delay_ms: int = 2000


@dataclass
class DemoResult:
    published: dict[str, int] = field(default_factory=dict)
    unroutable: int = 0
    public_key: str = ""


def _sqlite_path(url: str) -> Path | None:
    parsed = make_url(url)
    if parsed.get_backend_name() != "sqlite" or not parsed.database:
        return None
    return Path(parsed.database)


def prepare_files(plan: DemoPlan) -> KeyPair:
    """Reset the demo's own files and return the org key pair (generated once, 0600).

    Raises :class:`ConfigError` when ``plan.crm`` is an existing CRM that the demo did
    not create.
    """
    crm_path = _sqlite_path(plan.crm)
    if crm_path is None:
        raise ConfigError("the demo writes to a SQLite CRM (sqlite:///file.db)")
    if crm_path.exists():
        with SqlBackend(plan.crm) as existing, existing.engine.connect() as conn:
            mark = conn.execute(
                select(meta_table.c.value).where(meta_table.c.key == DEMO_MARK)
            ).scalar()
        if mark is None:
            raise ConfigError(
                f"{crm_path} is a CRM the demo did not create; "
                "run the demo with --crm sqlite:///proca-demo.db"
            )
        for suffix in ("", "-wal", "-shm"):
            with contextlib.suppress(FileNotFoundError):
                Path(f"{crm_path}{suffix}").unlink()
    parked_path = _sqlite_path(plan.parked)
    if parked_path is not None:
        for suffix in ("", "-wal", "-shm"):
            with contextlib.suppress(FileNotFoundError):
                Path(f"{parked_path}{suffix}").unlink()
    with SqlBackend(plan.crm) as crm, crm.engine.begin() as conn:
        conn.execute(meta_table.insert().values(key=DEMO_MARK, value="1"))
    if plan.keys.exists():
        store = Keystore.load(plan.keys)
        pair = next(iter(store), None)
        if pair is not None:
            return pair
    pair = KeyPair.generate()
    Keystore([pair]).save(plan.keys)
    return pair


async def publish_demo_traffic(plan: DemoPlan, key: KeyPair) -> DemoResult:
    """Declare the demo org (purging its queues) and publish the simulated traffic.

    Raises ``aio_pika`` connection errors when the broker is unreachable.
    """
    connection = await aio_pika.connect(plan.url, timeout=10)
    async with connection:
        channel = await connection.channel(publisher_confirms=True)
        await declare_test_org(channel, plan.org, retry_delay_ms=plan.retry_delay_ms)
        for name in (deliver_queue(plan.org), fail_queue(plan.org)):
            queue = await channel.get_queue(name, ensure=True)
            await queue.purge()
        planned = plan_traffic(
            plan.org, actions=plan.actions, seed=plan.seed, keys=key, poison=plan.poison
        )
        report = await publish_traffic(channel, planned)
    return DemoResult(published=report.counts, unroutable=report.unroutable, public_key=key.public)


def summary_rows(stats: dict[str, Any], parked: dict[str, int]) -> list[tuple[str, str]]:
    """The demo's closing summary as (label, value) rows — counts only."""
    statuses = stats["email_statuses"]
    rows = [
        ("contacts", str(stats["contacts"])),
        ("subscribed", str(stats["subscribed"])),
        ("double opt-in confirmed", str(statuses.get("double_opt_in", 0))),
        ("bounced or blocked", str(statuses.get("bounce", 0) + statuses.get("blocked", 0))),
        ("spam or unsubscribed", str(statuses.get("spam", 0) + statuses.get("unsub", 0))),
        ("test contacts (flagged)", str(stats["testing_contacts"])),
        ("actions", str(stats["actions"])),
    ]
    for entry in stats["actions_per_campaign"]:
        rows.append((f"  {entry['campaign']} / {entry['actionType']}", str(entry["actions"])))
    rows.append(("parked messages in the store (distinct)", str(sum(parked.values()))))
    for reason, count in sorted(parked.items()):
        rows.append((f"  parked: {reason}", str(count)))
    return rows


async def wait_for_broker(url: str, *, attempts: int = 1) -> None:
    """Connect once to check the broker; raise the connection error when it is absent."""
    for attempt in range(attempts):
        try:
            connection = await aio_pika.connect(url, timeout=5)
        except (OSError, aio_pika.exceptions.AMQPConnectionError):
            if attempt == attempts - 1:
                raise
            await asyncio.sleep(1)
        else:
            await connection.close()
            return
