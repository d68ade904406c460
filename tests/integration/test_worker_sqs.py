"""The SQS worker against a real RabbitMQ and moto's standalone SQS server (started here
as a subprocess on a free port): actions and events arrive unchanged with their
attributes, in batches; an entry SQS refuses is re-sent alone, the others once."""

from __future__ import annotations

import asyncio
import random
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import boto3
import pytest

from proca_sync.config import ConsumerSettings
from proca_sync.consumer.parking import ParkingStore
from proca_sync.pipeline.topology import OrgFlags, sqs_queue
from proca_sync.pipeline.workers.base import WorkerRunner
from proca_sync.pipeline.workers.sqs import SqsHandler, SqsSettings
from tests.conftest import service_up
from tests.integration.conftest import ConsumerOrg, _delete_org, eventually
from tests.support.builders import dumps
from tests.support.workers import declare_worker_org, email_case, free_port

pytestmark = pytest.mark.rabbitmq

REGION = "eu-west-1"


@pytest.fixture(scope="module")
def moto_endpoint() -> Iterator[str]:
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 30
        while not service_up("127.0.0.1", port):
            if proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail("moto server did not start")
            time.sleep(0.05)  # sleep-ok: polling a port with a deadline
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.terminate()
        proc.wait(timeout=10)


@pytest.fixture
def aws_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """Credentials as boto3 users give them: the environment (moto accepts any)."""
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.delenv("AWS_PROFILE", raising=False)


@pytest.fixture
async def sqs_org(amqp_url: str) -> AsyncIterator[ConsumerOrg]:
    org = random.randint(10_000_000, 2_000_000_000)
    topology = await declare_worker_org(
        amqp_url, org, OrgFlags(push_backend="sqs", event_backend="sqs")
    )
    try:
        yield ConsumerOrg(org, amqp_url, topology)
    finally:
        await _delete_org(amqp_url, topology)


def client(endpoint: str) -> Any:
    return boto3.client("sqs", region_name=REGION, endpoint_url=endpoint)


def received(endpoint: str, queue_url: str) -> list[dict[str, Any]]:
    sqs = client(endpoint)
    found: list[dict[str, Any]] = []
    while True:
        answer = sqs.receive_message(QueueUrl=queue_url, MaxNumberOfMessages=10,
                                     MessageAttributeNames=["All"], WaitTimeSeconds=0)
        batch = answer.get("Messages", [])
        if not batch:
            return found
        found.extend(batch)


def events() -> list[bytes]:
    email_status = {
        "schema": "proca:event:2", "eventType": "email_status",
        "timestamp": "2024-01-01T00:00:00Z", "actionId": None,
        "supporter": {"contact": {"contactRef": "ref-e", "dupeRank": 0},
                      "privacy": {"withConsent": False, "emailStatus": "double_opt_in"}},
    }
    confirm_created = {
        "schema": "proca:event:2", "eventType": "confirm_created",
        "timestamp": "2024-01-01T00:00:01Z",
        "confirm": {"code": "abc", "operation": "launch_page"},
    }
    return [dumps(email_status), dumps(confirm_created)]


async def run(org: ConsumerOrg, handler: SqsHandler, tmp_path: Path, bodies: list[bytes],
              settled: int) -> tuple[WorkerRunner, ParkingStore]:
    parking = ParkingStore(f"sqlite:///{tmp_path / 'parked.db'}")
    consumer = ConsumerSettings(url=org.url, queue=sqs_queue(org.org), parked=parking.url,
                                max_retries=0, status_interval=0.2)
    runner = WorkerRunner(consumer, handler, parking=parking)
    task = asyncio.create_task(runner.run())
    try:
        await eventually(lambda: runner.stats.connected is True, within=15, what="connected")
        await org.publish(bodies, queue=sqs_queue(org.org))
        await eventually(lambda: runner.stats.settled_total >= settled, within=30,
                         what="settled")
    finally:
        runner.request_stop("test")
        await asyncio.wait_for(task, timeout=30)
    return runner, parking


async def test_actions_and_events_batched_with_attributes(
    sqs_org: ConsumerOrg, moto_endpoint: str, aws_env: None, tmp_path: Path
) -> None:
    queue_url = client(moto_endpoint).create_queue(
        QueueName=f"proca-{sqs_org.org}")["QueueUrl"]
    actions = [email_case(i) for i in range(1, 14)]
    bodies = actions + events()
    handler = SqsHandler(SqsSettings(queue_url=queue_url, endpoint_url=moto_endpoint,
                                     region=REGION, batch_wait=1.0))
    runner, _parking = await run(sqs_org, handler, tmp_path, bodies, len(bodies))

    assert runner.stats.labels["sent"] == len(bodies)
    assert all(size <= 10 for size in handler.call_sizes)
    assert len(handler.call_sizes) == 2                    # 15 messages, 2 calls
    messages = received(moto_endpoint, queue_url)
    assert sorted(m["Body"].encode() for m in messages) == sorted(bodies)
    by_body = {m["Body"].encode(): m.get("MessageAttributes", {}) for m in messages}
    first = {k: v["StringValue"] for k, v in by_body[actions[0]].items()}
    assert first == {"Schema": "proca:action:2", "Stage": "deliver",
                     "CampaignName": "petition_x", "ActionType": "register"}
    status = {k: v["StringValue"] for k, v in by_body[events()[0]].items()}
    assert status == {"Schema": "proca:event:2", "EventType": "email_status"}
    assert all(v["DataType"] == "String" for v in by_body[actions[0]].values())


async def test_a_refused_call_is_split_so_one_bad_entry_waits_alone(
    sqs_org: ConsumerOrg, moto_endpoint: str, aws_env: None, tmp_path: Path
) -> None:
    # A FIFO queue refuses a per-message DelaySeconds: with event_delay on, moto refuses
    # the whole call (it checks every entry first); the worker sends each entry alone, so
    # the actions are stored once and only the event is refused (and parked).
    queue_url = client(moto_endpoint).create_queue(
        QueueName=f"proca-{sqs_org.org}.fifo",
        Attributes={"FifoQueue": "true", "ContentBasedDeduplication": "false"},
    )["QueueUrl"]
    actions = [email_case(i, ref=f"ref-{i}") for i in range(1, 4)]
    bodies = [*actions, events()[0]]
    handler = SqsHandler(SqsSettings(queue_url=queue_url, endpoint_url=moto_endpoint,
                                     region=REGION, event_delay=5, attempts=3, backoff=0.05,
                                     batch_wait=1.0))
    runner, parking = await run(sqs_org, handler, tmp_path, bodies, len(bodies))

    assert handler.call_sizes == [4, 1, 1, 1, 1]           # refused call → one entry each
    assert runner.stats.labels["sent"] == 3
    parked = parking.entries()
    assert [p.reason for p in parked] == ["destination_rejected"]
    assert parked[0].body == events()[0]
    assert "InvalidParameterValue" in parked[0].detail
    messages = received(moto_endpoint, queue_url)
    assert sorted(m["Body"].encode() for m in messages) == sorted(actions)


# ---- per-entry failures: moto reports a failed entry only for DelaySeconds > 900, which
# the worker cannot send; a local server answers SendMessageBatch as SQS documents it
# (JSON protocol: Successful / Failed with Id, SenderFault, Code, Message).


async def test_a_failed_entry_is_retried_alone_then_delivered(
    sqs_org: ConsumerOrg, aws_env: None, tmp_path: Path
) -> None:
    from aiohttp import web

    calls: list[list[dict[str, Any]]] = []
    stored: list[str] = []
    failed_once: set[str] = set()

    async def handle(request: web.Request) -> web.Response:
        assert request.headers["X-Amz-Target"] == "AmazonSQS.SendMessageBatch"
        payload = await request.json(loads=__import__("json").loads)
        entries = payload["Entries"]
        calls.append(entries)
        ok, failed = [], []
        for entry in entries:
            if '"actionId":2,' in entry["MessageBody"] and entry["MessageBody"] not in failed_once:
                failed_once.add(entry["MessageBody"])
                failed.append({"Id": entry["Id"], "SenderFault": False,
                               "Code": "InternalError", "Message": "try again"})
            else:
                stored.append(entry["MessageBody"])
                ok.append({"Id": entry["Id"], "MessageId": entry["Id"],
                           "MD5OfMessageBody": __import__("hashlib").md5(
                               entry["MessageBody"].encode()).hexdigest()})
        return web.json_response({"Successful": ok, "Failed": failed},
                                 content_type="application/x-amz-json-1.0")

    app = web.Application()
    app.router.add_post("/", handle)
    runner_ = web.AppRunner(app)
    await runner_.setup()
    site = web.TCPSite(runner_, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    try:
        endpoint = f"http://127.0.0.1:{port}"
        bodies = [email_case(i) for i in range(1, 5)]
        handler = SqsHandler(SqsSettings(queue_url=f"{endpoint}/123456789012/proca",
                                         endpoint_url=endpoint, region=REGION, backoff=0.05))
        runner, parking = await run(sqs_org, handler, tmp_path, bodies, len(bodies))
    finally:
        await runner_.cleanup()
    assert handler.call_sizes == [4, 1]
    assert [len(c) for c in calls] == [4, 1]
    assert '"actionId":2,' in calls[1][0]["MessageBody"]   # only the failed entry again
    assert sorted(stored) == sorted(b.decode() for b in bodies)
    assert runner.stats.labels["sent"] == 4 and parking.count() == 0
