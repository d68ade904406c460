"""The processing pipeline end to end: a real ``pipeline serve`` process, real RabbitMQ,
real SQLite state, and ``proca-sync run`` syncing what it delivers into the embedded CRM."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import orjson
import pytest
from sqlalchemy import select

from proca_sync.crm.sql import SqlBackend
from proca_sync.messages.decode import decode
from proca_sync.messages.schemas import ActionMessage
from proca_sync.pipeline.app import sign_webhook
from proca_sync.pipeline.confirm import ManagementClient, consume_confirmations, supporter_links
from proca_sync.pipeline.state import moderations
from proca_sync.pipeline.topology import (
    action_confirm_queue,
    deliver_queue,
    supporter_confirm_queue,
)
from tests.integration.conftest import split_credentials
from tests.support.pipeline import ROOT, Pipeline, bodies, submission

pytestmark = [pytest.mark.rabbitmq]


@pytest.fixture
async def pipeline(amqp_url: str, tmp_path: Path) -> AsyncIterator[Pipeline]:
    service = Pipeline(tmp_path, amqp_url)
    try:
        yield service
    finally:
        await service.cleanup()


def sync_queue(service: Pipeline, crm: str) -> None:
    """``proca-sync run`` on cus.N.deliver until the queue is idle (a real consumer)."""
    url, credentials = split_credentials(service.amqp_url)
    env = {k: v for k, v in os.environ.items() if not k.startswith("PROCA_")}
    env.update(credentials)
    result = subprocess.run(
        [sys.executable, "-m", "proca_sync", "run", "--url", url, "--queue",
         deliver_queue(service.org), "--crm", crm, "--exit-when-idle",
         "--parked", f"sqlite:///{service.tmp / 'parked.db'}"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=120, check=False,
    )
    assert result.returncode == 0, result.stderr[-2000:]


def crm_contacts(crm: str) -> list[dict[str, object]]:
    backend = SqlBackend(crm)
    try:
        contacts: list[dict[str, object]] = backend.export()["contacts"]
        return contacts
    finally:
        backend.engine.dispose()


async def test_supporter_confirmation_doi_bounce_and_reject(pipeline: Pipeline) -> None:
    pipeline.setup(custom_supporter_confirm=True, custom_action_deliver=True,
                   custom_event_deliver=True)
    pipeline.start()
    crm = f"sqlite:///{pipeline.tmp / 'crm.db'}"
    # campaign_updated from the campaign's creation is the only thing delivered so far.
    [created] = bodies(await pipeline.drain(deliver_queue(pipeline.org), expect=1))
    assert created["eventType"] == "campaign_updated"

    status, first = await pipeline.post("/api/actions", submission(pipeline.page, 1))
    assert status == 200, first
    status, second = await pipeline.post("/api/actions", submission(pipeline.page, 2))
    assert status == 200, second
    waiting = bodies(await pipeline.drain(supporter_confirm_queue(pipeline.org), expect=2))
    assert [m["stage"] for m in waiting] == ["supporter_confirm"] * 2
    assert {m["actionId"] for m in waiting} == {first["actionId"], second["actionId"]}
    # Nothing is delivered while the supporters have not confirmed (row 4).
    assert await pipeline.depth(deliver_queue(pipeline.org)) == 0
    code, state, _ = await pipeline.get(f"/api/actions/{first['actionId']}/status", api=True)
    assert (code, state["actionStatus"], state["supporterStatus"]) == (200, "new", "confirming")

    # The accept link releases the first action to cus.N.deliver; `proca-sync run` syncs it.
    links = supporter_links(pipeline.base, first["actionId"], first["contactRef"])
    code, text, _ = await pipeline.get(links.accept.removeprefix(pipeline.base))
    assert (code, text) == (200, "SUCCESS")
    [delivered] = bodies(await pipeline.drain(deliver_queue(pipeline.org), expect=1))
    assert delivered["stage"] == "deliver" and delivered["actionId"] == first["actionId"]
    assert isinstance(decode(orjson.dumps(delivered)), ActionMessage)
    # Re-publish what we drained so the real consumer reads it from the queue.
    await republish(pipeline, [delivered])
    await asyncio.to_thread(sync_queue, pipeline, crm)
    [contact] = [c for c in crm_contacts(crm) if c["email"] == "person1@example.org"]
    assert contact["emailStatus"] is None
    assert len(contact["actions"]) == 1  # type: ignore[arg-type]

    # DOI link → email_status double_opt_in → subscribed in the CRM.
    code, _, headers = await pipeline.get(links.double_opt_in.removeprefix(pipeline.base))
    assert code == 302 and headers["Location"].startswith("https://example.org/petition")
    await sync_after(pipeline, crm, expect=1)
    [contact] = [c for c in crm_contacts(crm) if c["email"] == "person1@example.org"]
    assert contact["emailStatus"] == "double_opt_in" and contact["subscribed"] is True

    # A signed bounce report → email_status bounce → unsubscribed; unsigned is refused.
    report = orjson.dumps({"events": [{"actionId": first["actionId"], "event": "bounce"}]})
    status, _ = await pipeline.post_raw("/webhooks/email", report, "sha256=00")
    assert status == 401
    status, answer = await pipeline.post_raw(
        "/webhooks/email", report, sign_webhook(pipeline.secrets.webhook_secret, report)
    )
    assert (status, answer) == (200, {"applied": 1})
    await sync_after(pipeline, crm, expect=1)
    [contact] = [c for c in crm_contacts(crm) if c["email"] == "person1@example.org"]
    assert contact["emailStatus"] == "bounce" and contact["subscribed"] is False

    # The reject link rejects the second supporter and its action; nothing is delivered.
    reject = supporter_links(pipeline.base, second["actionId"], second["contactRef"]).reject
    code, text, _ = await pipeline.get(reject.removeprefix(pipeline.base))
    assert (code, text) == (200, "SUCCESS")
    code, state, _ = await pipeline.get(f"/api/actions/{second['actionId']}/status", api=True)
    assert (state["actionStatus"], state["supporterStatus"]) == ("rejected", "rejected")
    # Accepting a rejected supporter is not allowed; a wrong ref is a 404.
    code, _, _ = await pipeline.get(
        supporter_links(pipeline.base, second["actionId"], second["contactRef"]).accept
        .removeprefix(pipeline.base))
    assert code == 400
    code, _, _ = await pipeline.get(
        f"/link/s/{second['actionId']}/accept/{first['contactRef']}")
    assert code == 404
    code, answer, _ = await pipeline.get(f"/link/s/{second['actionId']}/accept/no!")
    assert code == 400 and answer["errors"][0]["field"] == "path.contactRef"
    await asyncio.sleep(0.5)  # sleep-ok: give a wrongly emitted message time to show up
    assert await pipeline.depth(deliver_queue(pipeline.org)) == 0


async def republish(pipeline: Pipeline, documents: list[dict[str, object]]) -> None:
    import aio_pika

    connection = await aio_pika.connect(pipeline.amqp_url)
    try:
        channel = await connection.channel(publisher_confirms=True)
        for document in documents:
            await channel.default_exchange.publish(
                aio_pika.Message(orjson.dumps(document), delivery_mode=2),
                routing_key=deliver_queue(pipeline.org),
            )
    finally:
        await connection.close()


async def sync_after(pipeline: Pipeline, crm: str, *, expect: int) -> None:
    """Wait until ``expect`` messages are in cus.N.deliver, then sync the queue."""
    deadline = asyncio.get_running_loop().time() + 30
    while await pipeline.depth(deliver_queue(pipeline.org)) < expect:
        assert asyncio.get_running_loop().time() < deadline, "event not published"
        await asyncio.sleep(0.05)  # sleep-ok: poll interval inside a deadline
    await asyncio.to_thread(sync_queue, pipeline, crm)


async def test_moderation_by_the_orgs_own_consumer(pipeline: Pipeline) -> None:
    pipeline.setup(custom_action_confirm=True, custom_action_deliver=True)
    pipeline.start()
    good = (await pipeline.post("/api/actions", submission(pipeline.page, 1)))[1]["actionId"]
    bad_body = submission(pipeline.page, 2)
    bad_body["action"]["customFields"] = {"comment": "spam spam"}
    bad = (await pipeline.post("/api/actions", bad_body))[1]["actionId"]

    seen: list[int] = []

    async def decide(message: ActionMessage) -> bool:
        assert message.stage == "action_confirm"
        seen.append(int(message.action_id or 0))
        return "spam" not in str(message.action.custom_fields.get("comment"))

    async with ManagementClient(pipeline.base, pipeline.api_key) as client:
        handled = await asyncio.wait_for(
            consume_confirmations(pipeline.amqp_url, action_confirm_queue(pipeline.org), decide,
                                  client, max_messages=2),
            30,
        )
    assert handled == 2 and sorted(seen) == sorted([good, bad])
    delivered = bodies(await pipeline.drain(deliver_queue(pipeline.org), expect=1))
    assert [m["actionId"] for m in delivered] == [good]
    assert delivered[0]["stage"] == "deliver"
    await asyncio.sleep(0.5)  # sleep-ok: a wrongly delivered second action would show now
    assert await pipeline.depth(deliver_queue(pipeline.org)) == 0
    _code, state, _ = await pipeline.get(f"/api/actions/{bad}/status", api=True)
    assert state["actionStatus"] == "rejected" and state["supporterStatus"] == "accepted"
    # Deciding again is harmless: 409 for an action no longer waiting.
    status, _ = await pipeline.manage(f"/api/actions/{good}/accept")
    assert status == 409
    # Each decision is recorded once, with where it came from (the console's inbox shows it).
    with pipeline.engine.connect() as conn:
        recorded = {r.action_id: (r.decision, r.decided_by)
                    for r in conn.execute(select(moderations))}  # fmt: skip
    origin = f"api:org {pipeline.org}"
    assert recorded == {good: ("accept", origin), bad: ("reject", origin)}


async def test_campaign_update_emits_campaign_updated(pipeline: Pipeline) -> None:
    pipeline.setup(custom_event_deliver=True)
    pipeline.start()
    await pipeline.drain(deliver_queue(pipeline.org), expect=1)  # the creation event
    status, _ = await pipeline.manage(
        f"/api/campaigns/{pipeline.campaign}", "PATCH",
        {"title": "New title", "config": {"some_key": 1}},
    )
    assert status == 200
    [event] = bodies(await pipeline.drain(deliver_queue(pipeline.org), expect=1))
    assert event["eventType"] == "campaign_updated"
    assert event["campaign"]["title"] == "New title"
    assert event["campaign"]["config"] == {"some_key": 1}
    # Another org's key cannot change it.
    status, _ = await pipeline.manage(f"/api/campaigns/{pipeline.campaign + 99}", "PATCH", {})
    assert status == 404


async def test_intake_rate_limit_and_field_errors(pipeline: Pipeline) -> None:
    pipeline.setup(custom_action_deliver=True)
    pipeline.start("--rate", "1", "--burst", "3")
    statuses = [
        (await pipeline.post("/api/actions", submission(pipeline.page, n)))[0] for n in range(5)
    ]
    assert statuses[:3] == [200, 200, 200] and 429 in statuses[3:]
    await asyncio.sleep(1.1)  # sleep-ok: let the token bucket refill one token
    bad = submission(pipeline.page, 9)
    bad["contact"]["email"] = "secret-person@@example"
    status, answer = await pipeline.post("/api/actions", bad)
    assert status == 422
    assert answer["errors"][0]["field"] == "contact.email"
    assert "secret-person" not in orjson.dumps(answer).decode()


async def test_simulate_via_intake(pipeline: Pipeline) -> None:
    pipeline.setup(custom_action_deliver=True)
    pipeline.start()
    env = {k: v for k, v in os.environ.items() if not k.startswith("PROCA_")}
    result = await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-m", "proca_sync", "simulate", "--org", str(pipeline.org),
         "--actions", "40", "--seed", "7", "--via-intake", pipeline.base,
         "--page", str(pipeline.page)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=120, check=False,
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    assert "HTTP answers: 200:" in result.stdout
    from sqlalchemy import func, select

    from proca_sync.pipeline.state import actions

    with pipeline.engine.connect() as conn:
        rows = conn.execute(
            select(actions.c.with_consent, actions.c.status, func.count())
            .group_by(actions.c.with_consent, actions.c.status)
        ).all()
    counts = {(bool(w), s): n for w, s, n in rows}
    assert counts.get((True, "delivered"), 0) > 10
    assert counts.get((False, "delivered"), 0) > 0  # follow-ups reached their supporter


def test_demo_pipeline(tmp_path: Path, amqp_url: str) -> None:
    import random

    env = {k: v for k, v in os.environ.items() if not k.startswith("PROCA_")}
    org = str(random.randint(10_000_000, 2_000_000_000))
    result = subprocess.run(
        [sys.executable, "-m", "proca_sync", "demo", "--pipeline", "--actions", "20",
         "--org", org, "--url", amqp_url],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=180, check=False,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert "supporters submitted over HTTP" in result.stdout
    contacts = crm_contacts(f"sqlite:///{tmp_path / 'proca-crm.db'}")
    statuses = [c["emailStatus"] for c in contacts]
    assert len(contacts) == 18  # 20 submitted, the 7th and the 14th rejected
    assert statuses.count("double_opt_in") >= 5 and statuses.count("bounce") == 1
    asyncio.run(_drop_demo_org(amqp_url, int(org)))


async def _drop_demo_org(url: str, org: int) -> None:
    import aio_pika

    from proca_sync.pipeline.topology import OrgFlags, plan_topology

    topology = plan_topology(org, OrgFlags(custom_supporter_confirm=True,
                                           custom_action_deliver=True,
                                           custom_event_deliver=True))
    connection = await aio_pika.connect(url)
    try:
        channel = await connection.channel()
        for queue in topology.queues:
            if queue.name != "system.deliver":
                await channel.queue_delete(queue.name)
        for exchange in topology.exchanges:
            await channel.exchange_delete(exchange.name)
    finally:
        await connection.close()


async def test_intake_keeps_storing_while_the_broker_is_away(tmp_path: Path) -> None:
    service = Pipeline(tmp_path, "amqp://guest:guest@127.0.0.1:1/")  # nothing listens
    service.setup(custom_action_deliver=True)
    service.start()
    try:
        status, _answer = await service.post("/api/actions", submission(service.page, 1))
        assert status == 200
        from sqlalchemy import func, select

        from proca_sync.pipeline.state import outbox

        with service.engine.connect() as conn:
            pending = conn.execute(select(func.count()).select_from(outbox)
                                   .where(outbox.c.published_at.is_(None))).scalar_one()
        assert pending == 2  # the campaign's creation event and the delivery, kept
    finally:
        service.stop()
        service.engine.dispose()


async def test_publisher_recovers_from_a_cut_connection(pipeline: Pipeline) -> None:
    from tests.integration.conftest import close_connections_named

    pipeline.setup(custom_action_deliver=True)
    pipeline.start()
    await pipeline.post("/api/actions", submission(pipeline.page, 0))
    assert len(await pipeline.drain(deliver_queue(pipeline.org), expect=1)) == 1
    # Every pipeline under test has this connection name: cut them all, ours included.
    assert await asyncio.to_thread(close_connections_named, "proca-sync pipeline outbox") >= 1
    for n in range(1, 21):
        status, _ = await pipeline.post("/api/actions", submission(pipeline.page, n))
        assert status == 200
    delivered = bodies(await pipeline.drain(deliver_queue(pipeline.org), expect=20, within=60))
    assert len({m["actionId"] for m in delivered}) == 20, pipeline.log.read_text()[-3000:]
