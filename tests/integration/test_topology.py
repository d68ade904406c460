"""The declared topology on a real RabbitMQ matches topology.md, the fail/retry circuit
brings rejected messages back, and switching a feature off loses nothing.

Every test uses a fresh random org id and deletes that org's queues and exchanges
afterwards (the instance-wide ``system.deliver`` queue is left alone, and nothing is
published with a ``system.*`` key so it receives nothing from these tests).
"""

from __future__ import annotations

import asyncio
import json
import re
import secrets
import shutil
import subprocess
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar
from urllib.parse import unquote, urlsplit

import aio_pika
import aiormq.exceptions
import orjson
import pytest
import typer
from aio_pika.abc import AbstractChannel, AbstractConnection, AbstractIncomingMessage
from typer.testing import CliRunner

from proca_sync.errors import ConfigError
from proca_sync.pipeline.commands import simulate, topology_app
from proca_sync.pipeline.producers import Publisher
from proca_sync.pipeline.simulate import Kind, plan_traffic, publish_traffic
from proca_sync.pipeline.topology import (
    OrgFlags,
    Topology,
    TopologyError,
    declare_test_org,
    declare_topology,
    deliver_exchange,
    deliver_queue,
    event_exchange,
    fail_queue,
    inspect_topology,
    org_queues,
    plan_topology,
    retry_count,
    retry_exchange,
)

pytestmark = pytest.mark.rabbitmq

T = TypeVar("T")

RETRY_MS = 300

ALL_ON = OrgFlags(
    custom_supporter_confirm=True,
    custom_action_confirm=True,
    custom_action_deliver=True,
    custom_event_deliver=True,
    email_backend=True,
    supporter_confirm=True,
    push_backend="sqs",
    event_backend="webhook",
)
SYNC_FLAGS = OrgFlags(custom_action_deliver=True, custom_event_deliver=True)


# ---- helpers ----------------------------------------------------------------------------


async def eventually(
    check: Callable[[], Awaitable[T | None]], *, within: float = 10.0, what: str = "state"
) -> T:
    """Poll ``check`` until it returns something other than ``None``/``False``."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within
    while True:
        result = await check()
        if result is not None and result is not False:
            return result
        if loop.time() > deadline:
            raise AssertionError(f"timed out after {within} s waiting for {what}")
        await asyncio.sleep(0.05)  # sleep-ok: poll interval inside a deadline


async def depth(channel: AbstractChannel, queue: str) -> int:
    declared = await channel.declare_queue(queue, passive=True)
    return int(declared.declaration_result.message_count or 0)


async def wait_depths(channel: AbstractChannel, expected: dict[str, int]) -> None:
    async def matches() -> bool:
        return {name: await depth(channel, name) for name in expected} == expected

    await eventually(matches, what=f"queue depths {expected}")


async def next_message(
    channel: AbstractChannel, queue: str, *, within: float = 10.0
) -> AbstractIncomingMessage:
    declared = await channel.get_queue(queue, ensure=False)

    async def get() -> AbstractIncomingMessage | None:
        return await declared.get(no_ack=False, fail=False)

    return await eventually(get, within=within, what=f"a message in {queue}")


async def _refused(
    connection: AbstractConnection, attempt: Callable[[AbstractChannel], Awaitable[object]]
) -> bool:
    """True when the broker answers PRECONDITION_FAILED (on a channel of its own)."""
    channel = await connection.channel()
    try:
        await attempt(channel)
    except aiormq.exceptions.ChannelPreconditionFailed:
        return True
    await channel.close()
    return False


async def exchange_refused(connection: AbstractConnection, name: str, kind: str) -> bool:
    async def attempt(channel: AbstractChannel) -> object:
        return await channel.declare_exchange(name, aio_pika.ExchangeType(kind), durable=True)

    return await _refused(connection, attempt)


async def queue_refused(
    connection: AbstractConnection, name: str, arguments: dict[str, Any]
) -> bool:
    async def attempt(channel: AbstractChannel) -> object:
        return await channel.declare_queue(name, durable=True, arguments=arguments)

    return await _refused(connection, attempt)


def text(value: Any) -> Any:
    return value.decode() if isinstance(value, bytes) else value


def death(message: AbstractIncomingMessage, queue: str) -> dict[str, Any]:
    for entry in message.headers["x-death"]:  # type: ignore[union-attr]
        assert isinstance(entry, dict)
        if text(entry["queue"]) == queue:
            return {k: text(v) for k, v in entry.items()}
    raise AssertionError(f"no x-death entry for {queue}")


def rabbitmqctl(url: str, *args: str) -> list[dict[str, Any]] | None:
    """``rabbitmqctl … --formatter json`` on the test vhost, or ``None`` if unusable."""
    executable = shutil.which("rabbitmqctl")
    if executable is None:
        return None
    vhost = unquote(urlsplit(url).path[1:]) or "/"
    try:
        done = subprocess.run(
            [executable, *args, "-p", vhost, "-q", "--formatter", "json"],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    if done.returncode != 0:
        return None
    result: list[dict[str, Any]] = json.loads(done.stdout)
    return result


# ---- fixtures ---------------------------------------------------------------------------


@pytest.fixture
async def org(amqp_url: str) -> AsyncIterator[int]:
    """A random 9-digit org id; its queues and exchanges are deleted afterwards.

    Clean-up runs on a connection of its own, so it works even when the test's
    connection was closed (by a 406, or by another test cutting connections).
    """
    org_id = 100_000_000 + secrets.randbelow(900_000_000)
    yield org_id
    connection = await aio_pika.connect(amqp_url)
    async with connection:
        channel = await connection.channel()
        for name in [*org_queues(org_id), fail_queue(org_id)]:
            await channel.queue_delete(name)
        for exchange in plan_topology(org_id, OrgFlags()).exchanges:
            await channel.exchange_delete(exchange.name)


@pytest.fixture
async def channel(amqp_connection: AbstractConnection) -> AsyncIterator[AbstractChannel]:
    opened = await amqp_connection.channel(publisher_confirms=True)
    yield opened
    if not opened.is_closed:
        await opened.close()


async def declare(
    channel: AbstractChannel, org: int, flags: OrgFlags, ms: int = RETRY_MS
) -> Topology:
    plan = plan_topology(org, flags, retry_delay_ms=ms)
    await declare_topology(channel, plan)
    return plan


# ---- shape ------------------------------------------------------------------------------


async def test_declared_queues_and_exchanges_have_the_spec_arguments(
    amqp_connection: AbstractConnection, channel: AbstractChannel, org: int
) -> None:
    plan = await declare(channel, org, ALL_ON)
    assert set(plan.queue_names) == {*org_queues(org), fail_queue(org), "system.deliver"}

    for exchange in plan.exchanges:
        same = await amqp_connection.channel()
        await same.declare_exchange(
            exchange.name, aio_pika.ExchangeType(exchange.kind), durable=True
        )
        await same.close()
        other = "direct" if exchange.kind != "direct" else "topic"
        assert await exchange_refused(amqp_connection, exchange.name, other), exchange.name

    for queue in plan.queues:
        # The broker accepts exactly the planned arguments…
        same = await amqp_connection.channel()
        await same.declare_queue(queue.name, durable=True, arguments=queue.arguments or None)
        await same.close()
        if queue.name == "system.deliver":
            continue
        # …and refuses to drop any of them or to add a TTL / another TTL.
        for key in queue.arguments:
            fewer = {k: v for k, v in queue.arguments.items() if k != key}
            assert await queue_refused(amqp_connection, queue.name, fewer), (queue.name, key)
        changed = {**queue.arguments, "x-message-ttl": RETRY_MS + 1}
        assert await queue_refused(amqp_connection, queue.name, changed), queue.name


async def test_broker_listing_matches_the_plan(
    amqp_url: str, channel: AbstractChannel, org: int
) -> None:
    plan = await declare(channel, org, ALL_ON)
    queues = rabbitmqctl(amqp_url, "list_queues", "name", "durable", "arguments")
    bindings = rabbitmqctl(
        amqp_url,
        "list_bindings",
        "source_name",
        "destination_name",
        "destination_kind",
        "routing_key",
    )
    exchanges = rabbitmqctl(amqp_url, "list_exchanges", "name", "type", "durable")
    if queues is None or bindings is None or exchanges is None:
        pytest.skip("rabbitmqctl is not usable here; the AMQP checks cover the arguments")

    listed = {q["name"]: q for q in queues if q["name"] in plan.queue_names}
    assert set(listed) == set(plan.queue_names)
    for queue in plan.queues:
        assert listed[queue.name]["durable"] is True
        arguments = {name: value for name, _type, value in listed[queue.name]["arguments"]}
        assert arguments == queue.arguments, queue.name

    own = {x.name for x in plan.exchanges}
    assert {(x["name"], x["type"], x["durable"]) for x in exchanges if x["name"] in own} == {
        (x.name, x.kind, True) for x in plan.exchanges
    }
    made = {
        (b["source_name"], b["destination_name"], b["routing_key"])
        for b in bindings
        if b["source_name"] in own and b["destination_kind"] == "queue"
    }
    assert made == {(b.exchange, b.queue, b.routing_key) for b in plan.bindings}


async def test_declare_is_idempotent(channel: AbstractChannel, org: int) -> None:
    plan = await declare_test_org(channel, org, retry_delay_ms=RETRY_MS)
    publisher = Publisher(channel)
    assert await publisher.publish(deliver_exchange(org), "register.bees", b"{}")
    await declare_test_org(channel, org, retry_delay_ms=RETRY_MS)
    await declare_topology(channel, plan)
    await wait_depths(channel, {deliver_queue(org): 1, fail_queue(org): 0})


async def test_another_retry_delay_is_a_clear_error(
    amqp_connection: AbstractConnection, channel: AbstractChannel, org: int
) -> None:
    await declare(channel, org, SYNC_FLAGS)
    other = await amqp_connection.channel()
    with pytest.raises(TopologyError, match=r"x-message-ttl") as caught:
        await declare(other, org, SYNC_FLAGS, ms=RETRY_MS + 100)
    assert isinstance(caught.value, ConfigError)
    assert fail_queue(org) in str(caught.value)


# ---- routing ----------------------------------------------------------------------------


async def test_messages_follow_the_bindings(
    amqp_connection: AbstractConnection, channel: AbstractChannel, org: int
) -> None:
    await declare(channel, org, ALL_ON)
    publisher = Publisher(channel)
    sends = [
        (deliver_exchange(org), "register.bees"),
        (deliver_exchange(org), "share.bees"),
        (event_exchange(org), "supporter.email_status"),
        (event_exchange(org), "confirm_created.add_staffer"),
        (f"org.{org}.confirm.supporter", "register.bees"),
        (f"org.{org}.confirm.action", "mtt.bees"),
        (retry_exchange(org), f"wrk.{org}.sqs"),
    ]
    for exchange, key in sends:
        assert await publisher.publish(exchange, key, b"{}"), (exchange, key)
    expected = {
        f"cus.{org}.deliver": 4,
        f"cus.{org}.confirm.supporter": 1,
        f"cus.{org}.confirm.action": 1,
        f"wrk.{org}.email.supporter": 3,
        f"wrk.{org}.sqs": 3,
        f"wrk.{org}.webhook": 2,
        fail_queue(org): 0,
    }
    await wait_depths(channel, expected)
    assert publisher.unroutable == 0

    report = await inspect_topology(amqp_connection, org, ALL_ON)
    assert {q.name: q.messages for q in report.queues if q.name != "system.deliver"} == expected
    assert all(q.exists for q in report.queues)
    assert report.bindings == plan_topology(org, ALL_ON).bindings


async def test_inspect_reports_missing_queues(
    amqp_connection: AbstractConnection, channel: AbstractChannel, org: int
) -> None:
    await declare(channel, org, SYNC_FLAGS)
    report = await inspect_topology(amqp_connection, org)
    assert {q.name for q in report.queues if q.exists} == {
        deliver_queue(org),
        fail_queue(org),
        "system.deliver",
    }
    assert report.state(f"wrk.{org}.sqs").exists is False


async def test_publisher_sends_like_proca(channel: AbstractChannel, org: int) -> None:
    await declare(channel, org, SYNC_FLAGS)
    publisher = Publisher(channel)
    body = orjson.dumps({"schema": "proca:event:2", "eventType": "email_status"})
    assert await publisher.publish(event_exchange(org), "supporter.email_status", body)
    message = await next_message(channel, deliver_queue(org))
    assert message.body == body
    assert message.delivery_mode == aio_pika.DeliveryMode.PERSISTENT
    assert message.content_type is None
    assert message.content_encoding is None
    # aiormq always sets a random message_id (it matches broker returns with it); the
    # server sets none. Consumers must not rely on either (messages.md §8).
    assert not message.headers
    assert message.routing_key == "supporter.email_status"
    assert message.exchange == event_exchange(org)
    await message.ack()
    # No binding matches: returned by the broker, counted, not an error.
    assert not await publisher.publish(f"org.{org}.confirm.action", "register.bees", b"{}")
    assert publisher.unroutable == 1


async def test_publisher_needs_confirms(amqp_connection: AbstractConnection) -> None:
    plain = await amqp_connection.channel(publisher_confirms=False)
    with pytest.raises(ValueError, match="publisher_confirms"):
        Publisher(plain)
    await plain.close()


# ---- retry circuit ----------------------------------------------------------------------


async def test_rejected_message_comes_back_after_the_delay(
    channel: AbstractChannel, org: int
) -> None:
    await declare_test_org(channel, org, retry_delay_ms=RETRY_MS)
    queue = deliver_queue(org)
    body = b'{"schema":"proca:action:2","actionId":1}'
    assert await Publisher(channel).publish(deliver_exchange(org), "register.bees", body)

    message = await next_message(channel, queue)
    assert retry_count(message.headers, queue) == 0
    assert not message.redelivered
    loop = asyncio.get_running_loop()
    for cycle in (1, 2):
        rejected_at = loop.time()
        await message.reject(requeue=False)
        message = await next_message(channel, queue)
        elapsed = loop.time() - rejected_at
        assert elapsed >= RETRY_MS / 1000 * 0.8, elapsed
        assert message.body == body
        assert message.redelivered is False  # a fresh publish by the broker
        assert message.exchange == retry_exchange(org)
        assert message.routing_key == queue
        assert retry_count(message.headers, queue) == cycle
        rejected = death(message, queue)
        assert rejected["reason"] == "rejected"
        assert rejected["count"] == cycle
        assert rejected["exchange"] == deliver_exchange(org)
        assert [text(k) for k in rejected["routing-keys"]] == ["register.bees"]
        expired = death(message, fail_queue(org))
        assert expired["reason"] == "expired"
        assert expired["count"] == cycle
        assert [text(k) for k in expired["routing-keys"]] == [queue]
        assert message.headers is not None
        assert text(message.headers["x-first-death-queue"]) == queue
        assert text(message.headers["x-first-death-reason"]) == "rejected"
    await message.ack()
    await wait_depths(channel, {queue: 0, fail_queue(org): 0})


async def test_switching_features_off_unbinds_without_losing_messages(
    channel: AbstractChannel, org: int
) -> None:
    delay = 1_000  # long enough for the flag change to happen while one message waits
    await declare(channel, org, SYNC_FLAGS, ms=delay)
    queue = deliver_queue(org)
    publisher = Publisher(channel)
    for n in range(2):
        assert await publisher.publish(deliver_exchange(org), "register.bees", b'{"n":%d}' % n)
    waiting = await next_message(channel, queue)
    await waiting.reject(requeue=False)  # now in the fail queue for `delay` ms

    await declare(channel, org, OrgFlags(custom_event_deliver=True), ms=delay)
    assert await depth(channel, queue) == 1  # the queue and its message stay
    assert not await publisher.publish(deliver_exchange(org), "register.bees", b"{}")
    assert await publisher.publish(event_exchange(org), "supporter.email_status", b"{}")
    # The rejected message still returns: the retry binding was kept.
    await wait_depths(channel, {queue: 3, fail_queue(org): 0})

    await declare(channel, org, OrgFlags(), ms=delay)
    assert await depth(channel, queue) == 3
    assert not await publisher.publish(event_exchange(org), "supporter.email_status", b"{}")
    assert await publisher.publish(retry_exchange(org), queue, b"{}")
    await wait_depths(channel, {queue: 4})
    assert publisher.unroutable == 2


# ---- simulated traffic ------------------------------------------------------------------


async def test_simulated_traffic_lands_in_the_delivery_queue(
    channel: AbstractChannel, org: int
) -> None:
    await declare_test_org(channel, org, retry_delay_ms=RETRY_MS)
    planned = [
        p
        for p in plan_traffic(org, actions=40, seed=1, poison=1)
        if not p.routing_key.startswith("system.")  # keep system.deliver clean
    ]
    confirm_stage = sum(p.kind == Kind.SUPPORTER_CONFIRM for p in planned)
    report = await publish_traffic(channel, planned)
    assert sum(report.counts.values()) == len(planned)
    assert report.unroutable == confirm_stage  # no cus.N.confirm.supporter queue bound
    await wait_depths(channel, {deliver_queue(org): len(planned) - confirm_stage})


async def test_publish_rate_is_respected(channel: AbstractChannel, org: int) -> None:
    await declare_test_org(channel, org, retry_delay_ms=RETRY_MS)
    planned = [p for p in plan_traffic(org, actions=5, seed=2) if p.kind == Kind.ACTION][:5]
    loop = asyncio.get_running_loop()
    started = loop.time()
    await publish_traffic(channel, planned, rate=50.0)
    assert loop.time() - started >= (len(planned) - 1) / 50.0 * 0.9
    with pytest.raises(ValueError, match="rate"):
        await publish_traffic(channel, planned, rate=0)


# ---- command line -----------------------------------------------------------------------


def test_cli_declare_and_show(amqp_url: str, org: int) -> None:
    app = typer.Typer()
    app.add_typer(topology_app, name="topology")
    app.command("simulate")(simulate)
    runner = CliRunner()
    env = {"COLUMNS": "200", "PROCA_URL": amqp_url}

    declared = runner.invoke(
        app, ["topology", "declare", "--org", str(org), "--retry-delay", "300"], env=env
    )
    assert declared.exit_code == 0, declared.output
    assert f"cus.{org}.deliver" in declared.output
    assert "guest:guest" not in declared.output  # no password in output

    shown = runner.invoke(app, ["topology", "show", "--org", str(org)], env=env)
    assert shown.exit_code == 0, shown.output
    assert re.search(rf"cus\.{org}\.deliver\s*│\s*yes\s*│\s*0", shown.output), shown.output
    assert re.search(rf"wrk\.{org}\.sqs\s*│\s*no", shown.output), shown.output

    refused = runner.invoke(
        app, ["topology", "declare", "--org", str(org), "--retry-delay", "400"], env=env
    )
    assert refused.exit_code == 2
    assert "x-message-ttl" in refused.output

    unreachable = runner.invoke(
        app, ["topology", "show", "--org", str(org), "--url", "amqp://u:secret@127.0.0.1:1/"]
    )
    assert unreachable.exit_code == 1
    assert "secret" not in unreachable.output


# ---- quorum queues ----------------------------------------------------------------------


async def test_quorum_declare_keeps_the_retry_circuit(
    amqp_url: str, amqp_connection: AbstractConnection, channel: AbstractChannel, org: int
) -> None:
    """``topology declare --quorum``: the org's queues are quorum queues (the shared
    system queue is left alone), a classic declare of them is refused, and a rejected
    message still comes back through the fail queue after the delay."""
    result = await asyncio.to_thread(
        CliRunner().invoke,
        topology_app,
        ["declare", "--org", str(org), "--quorum", "--retry-delay", str(RETRY_MS),
         "--url", amqp_url],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "quorum queues" in result.output
    plan = plan_topology(org, SYNC_FLAGS, retry_delay_ms=RETRY_MS, quorum=True)
    listed = rabbitmqctl(amqp_url, "list_queues", "name", "type")
    if listed is not None:
        types = {q["name"]: q["type"] for q in listed}
        for name in plan.queue_names:
            if name.startswith(("cus.", "org.")):
                assert types[name] in {"quorum", "rabbit_quorum_queue"}, (name, types[name])
    classic = plan_topology(org, SYNC_FLAGS, retry_delay_ms=RETRY_MS).queue(deliver_queue(org))
    assert await queue_refused(amqp_connection, classic.name, classic.arguments)

    body = b'{"schema":"proca:action:2","actionId":7}'
    assert await Publisher(channel).publish(deliver_exchange(org), "register.bees", body)
    message = await next_message(channel, deliver_queue(org))
    await message.reject(requeue=False)
    again = await next_message(channel, deliver_queue(org))
    assert again.body == body
    assert retry_count(again.headers, deliver_queue(org)) == 1
    await again.ack()
