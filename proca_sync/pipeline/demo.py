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
import orjson
from sqlalchemy import select
from sqlalchemy.engine import make_url

from proca_sync.crm.sql import SqlBackend, meta_table
from proca_sync.crypto import KeyPair, Keystore
from proca_sync.errors import ConfigError
from proca_sync.pipeline.simulate import plan_traffic, publish_traffic
from proca_sync.pipeline.topology import declare_test_org, deliver_queue, fail_queue

__all__ = [
    "DemoPlan",
    "DemoResult",
    "PipelineDemoResult",
    "prepare_files",
    "publish_demo_traffic",
    "run_pipeline_demo",
]

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


# ---- demo --pipeline: intake → confirmation → delivery → sync ------------------------------


@dataclass
class PipelineDemoResult:
    submitted: int = 0
    confirmed: int = 0
    double_opt_in: int = 0
    rejected: int = 0
    bounced: int = 0
    published: int = 0


def _fresh_state(path: Path) -> Path:
    for suffix in ("", "-wal", "-shm"):
        with contextlib.suppress(FileNotFoundError):
            Path(f"{path}{suffix}").unlink()
    return path


async def run_pipeline_demo(
    plan: DemoPlan, key: KeyPair, *, supporters: int = 40, state_dir: Path = Path(".")
) -> PipelineDemoResult:
    """Run the pipeline in-process and walk supporters through it (no personal data out).

    A fresh state (``proca-demo-pipeline.db``) for the demo org with supporter
    confirmation by the org's own consumer and delivery to ``cus.N.deliver``; the org's
    data is encrypted for ``key``. Supporters are submitted over HTTP; the demo plays the
    org's confirmation consumer (accepts most through the link, some with ``doi=1``,
    rejects every seventh) and reports one bounce through the signed webhook. Returns
    when the outbox is fully published.
    """
    import aiohttp
    import uvicorn
    from sqlalchemy import func

    from proca_sync.pipeline import admin
    from proca_sync.pipeline.app import PipelineConfig, create_app, sign_webhook
    from proca_sync.pipeline.confirm import supporter_links
    from proca_sync.pipeline.instance import InstanceSecrets
    from proca_sync.pipeline.state import migrate, open_engine, outbox
    from proca_sync.pipeline.topology import supporter_confirm_queue

    state = _fresh_state(state_dir / "proca-demo-pipeline.db")
    secrets = InstanceSecrets.generate()
    engine = open_engine(f"sqlite:///{state}")
    migrate(engine)
    admin.add_org(
        engine,
        org_id=plan.org,
        name="demo_org",
        title="Demo org",
        custom_supporter_confirm=True,
        custom_action_deliver=True,
        custom_event_deliver=True,
    )
    admin.add_org_key(engine, plan.org, key.public)
    admin.add_campaign(
        engine, campaign_id=1, name="save_the_bees", title="Save the Bees", org_id=plan.org
    )
    admin.add_page(
        engine,
        page_id=1,
        name="example.org/bees/en",
        locale="en",
        campaign_id=1,
        org_id=plan.org,
        location="https://example.org/bees",
    )
    config = PipelineConfig(
        database=f"sqlite:///{state}",
        secrets=secrets,
        amqp_url=plan.url,
        rate=0,
        retry_delay_ms=plan.retry_delay_ms,
    )
    connection = await aio_pika.connect(plan.url, timeout=10)
    async with connection:
        channel = await connection.channel()
        for name in (
            deliver_queue(plan.org),
            supporter_confirm_queue(plan.org),
            fail_queue(plan.org),
        ):
            with contextlib.suppress(aio_pika.exceptions.ChannelClosed):
                queue = await channel.get_queue(name, ensure=True)
                await queue.purge()
            if channel.is_closed:
                channel = await connection.channel()
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = int(sock.getsockname()[1])
    app = create_app(config, engine=engine)
    server = uvicorn.Server(
        uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", access_log=False)
    )
    serving = asyncio.create_task(server.serve())
    base = f"http://127.0.0.1:{port}"
    result = PipelineDemoResult()
    try:
        while not server.started:
            if serving.done():
                serving.result()
            await asyncio.sleep(0.05)
        async with aiohttp.ClientSession() as session:
            for n in range(supporters):
                body = {
                    "actionPageId": 1,
                    "action": {"actionType": "register", "customFields": {"source": "demo"}},
                    "contact": {
                        "firstName": f"Demo{n}",
                        "lastName": "Supporter",
                        "email": f"demo{n}@example.org",
                        "address": {"country": "DE", "postcode": "10115"},
                    },
                    "privacy": {"optIn": n % 3 != 0},
                    "tracking": {"source": "demo", "medium": "cli", "campaign": "demo"},
                }
                async with session.post(base + "/api/actions", json=body) as response:
                    response.raise_for_status()
                result.submitted += 1
            # The org's own confirmation consumer, played by the demo.
            connection = await aio_pika.connect(plan.url, timeout=10)
            async with connection:
                channel = await connection.channel()
                queue = await channel.get_queue(supporter_confirm_queue(plan.org), ensure=True)
                handled = 0
                deadline = asyncio.get_running_loop().time() + 60
                while handled < supporters:
                    message = await queue.get(fail=False)
                    if message is None:
                        if asyncio.get_running_loop().time() > deadline:
                            break
                        await asyncio.sleep(0.05)
                        continue
                    deadline = asyncio.get_running_loop().time() + 60  # per message
                    document = orjson.loads(message.body)
                    action_id, ref = document["actionId"], document["contact"]["contactRef"]
                    links = supporter_links(base, action_id, ref)
                    if handled % 7 == 6:
                        url, result.rejected = links.reject, result.rejected + 1
                    elif handled % 2 == 0:
                        url = links.accept + "?doi=1"
                        result.confirmed += 1
                        result.double_opt_in += 1
                    else:
                        url, result.confirmed = links.accept, result.confirmed + 1
                    async with session.get(url) as response:
                        response.raise_for_status()
                    if handled == 0:
                        report = orjson.dumps(
                            {"events": [{"actionId": action_id, "event": "bounce"}]}
                        )
                        async with session.post(
                            base + "/webhooks/email",
                            data=report,
                            headers={
                                "Content-Type": "application/json",
                                "X-Proca-Signature": sign_webhook(secrets.webhook_secret, report),
                            },
                        ) as response:
                            response.raise_for_status()
                        result.bounced += 1
                    await message.ack()
                    handled += 1
        limit = asyncio.get_running_loop().time() + 120
        while True:  # until the outbox is fully published
            with engine.connect() as conn:
                pending = conn.execute(
                    select(func.count()).select_from(outbox).where(outbox.c.published_at.is_(None))
                ).scalar_one()
                result.published = conn.execute(
                    select(func.count()).select_from(outbox)
                ).scalar_one()
            if pending == 0:
                break
            if asyncio.get_running_loop().time() > limit:
                raise ConfigError("the pipeline could not publish its outbox: is the broker up?")
            await asyncio.sleep(0.1)
    finally:
        server.should_exit = True
        await serving
        engine.dispose()
    return result
