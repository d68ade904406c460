"""The webhook worker against a real RabbitMQ and a local HTTP server: the body arrives
unchanged and signed; 200/201/202/204 are success; 500, 429 (Retry-After) and timeouts
are retried, then delivered; 400 is parked; §11's authentication."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import itertools
import random
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

from proca_sync.config import ConsumerSettings
from proca_sync.consumer.parking import ParkingStore
from proca_sync.pipeline.topology import OrgFlags, webhook_queue
from proca_sync.pipeline.workers.base import WorkerRunner
from proca_sync.pipeline.workers.webhook import WebhookHandler, WebhookSettings
from tests.integration.conftest import ConsumerOrg, _delete_org, eventually
from tests.support.builders import dumps
from tests.support.workers import declare_worker_org, email_case

pytestmark = pytest.mark.rabbitmq

SECRET = "whsec-test"


@pytest.fixture
async def webhook_org(amqp_url: str) -> AsyncIterator[ConsumerOrg]:
    org = random.randint(10_000_000, 2_000_000_000)
    topology = await declare_worker_org(
        amqp_url, org, OrgFlags(push_backend="webhook", event_backend="webhook")
    )
    try:
        yield ConsumerOrg(org, amqp_url, topology)
    finally:
        await _delete_org(amqp_url, topology)


@dataclass
class Receiver:
    """Answers by the ``X-Script`` plan of each body's action id: a list of statuses
    (``"sleep"``: hang past the client's timeout), then 200."""

    plans: dict[int, list[Any]]
    requests: list[tuple[int, bytes, dict[str, str]]] = field(default_factory=list)
    times: dict[int, list[float]] = field(default_factory=dict)
    accepted: list[bytes] = field(default_factory=list)

    async def handle(self, request: web.Request) -> web.StreamResponse:
        body = await request.read()
        doc = __import__("orjson").loads(body)
        key = int(doc.get("actionId") or 0)
        self.requests.append((key, body, dict(request.headers)))
        self.times.setdefault(key, []).append(time.monotonic())
        plan = self.plans.get(key, [])
        step = plan.pop(0) if plan else 200
        if step == "sleep":
            await asyncio.sleep(1.0)  # sleep-ok: longer than the worker's timeout
            return web.Response(status=200)
        if step == 429:
            return web.Response(status=429, headers={"Retry-After": "1"})
        if 200 <= step < 300:
            self.accepted.append(body)
        return web.Response(status=step)


@pytest.fixture
async def receiver() -> AsyncIterator[tuple[Receiver, str]]:
    state = Receiver(plans={})
    app = web.Application()
    app.router.add_post("/hook", state.handle)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    try:
        yield state, f"http://127.0.0.1:{port}/hook"
    finally:
        await runner.cleanup()


async def run_worker(org: ConsumerOrg, settings: WebhookSettings, tmp_path: Path,
                     bodies: list[bytes], done: Any) -> tuple[WorkerRunner, ParkingStore]:
    parking = ParkingStore(f"sqlite:///{tmp_path / 'parked.db'}")
    consumer = ConsumerSettings(url=org.url, queue=webhook_queue(org.org), parked=parking.url,
                                max_retries=3, status_interval=0.2)
    runner = WorkerRunner(consumer, WebhookHandler(settings), parking=parking)
    task = asyncio.create_task(runner.run())
    try:
        await org.publish(bodies, queue=webhook_queue(org.org))
        await eventually(lambda: done(runner, parking), within=30, what="deliveries settled")
    finally:
        runner.request_stop("test")
        await asyncio.wait_for(task, timeout=30)
    return runner, parking


async def test_statuses_signature_retries(
    webhook_org: ConsumerOrg, receiver: tuple[Receiver, str], tmp_path: Path
) -> None:
    state, url = receiver
    state.plans = {
        1: [200], 2: [201], 3: [202], 4: [204],
        5: [500, 503], 6: [429, 429], 7: ["sleep"], 8: [400],
        9: [500, 500, 500, 500, 500, 500],  # past the in-process tries: the retry circuit
    }
    event = {"schema": "proca:event:2", "eventType": "email_status", "timestamp":
             "2024-01-01T00:00:00Z", "supporter": {"contact": {"contactRef": "r"},
                                                   "privacy": {"withConsent": False}}}
    bodies = [email_case(i) for i in range(1, 10)] + [dumps(event)]
    settings = WebhookSettings(url=url, secret=SECRET, timeout=0.5, attempts=3, backoff=0.05)

    def done(runner: WorkerRunner, parking: ParkingStore) -> bool:
        return len(state.accepted) == len(bodies) - 1 and parking.count() == 1

    runner, parking = await run_worker(webhook_org, settings, tmp_path, bodies, done)

    delivered = sorted(bodies)
    delivered.remove(email_case(8))
    assert sorted(state.accepted) == delivered            # unchanged bytes, 400 not among them
    assert [p.reason for p in parking.entries()] == ["destination_rejected"]
    assert parking.entries()[0].body == email_case(8)
    for _key, body, headers in state.requests:
        expected = "sha256=" + hmac.new(SECRET.encode(), body, hashlib.sha256).hexdigest()
        assert headers["X-Proca-Signature"] == expected
        assert headers["Content-Type"] == "application/json"
        assert headers["Accept"] == "application/json"
        assert "Authorization" not in headers
    ids = {k: {h["X-Proca-Delivery"] for kk, _b, h in state.requests if kk == k}
           for k, _b, _h in state.requests}
    assert all(len(v) == 1 for v in ids.values())         # one delivery id per message
    tries = {k: sum(1 for kk, _b, _h in state.requests if kk == k) for k in range(1, 10)}
    assert tries == {1: 1, 2: 1, 3: 1, 4: 1, 5: 3, 6: 3, 7: 2, 8: 1, 9: 7}
    gaps = [b - a for a, b in itertools.pairwise(state.times[6])]
    assert min(gaps) >= 0.95                               # Retry-After: 1 was honoured
    labels = runner.stats.labels
    assert labels["sent:200"] >= 5 and labels["sent:201"] == 1
    assert labels["sent:202"] == 1 and labels["sent:204"] == 1
    assert labels["TransientError"] == 2                   # message 9 went round twice


@pytest.mark.parametrize(
    ("user", "password", "expected"),
    [
        pytest.param("u", "p", "Basic " + base64.b64encode(b"u:p").decode(), id="basic"),
        pytest.param(None, "raw-token", "raw-token", id="password-only"),
    ],
)
async def test_authentication(webhook_org: ConsumerOrg, receiver: tuple[Receiver, str],
                              tmp_path: Path, user: str | None, password: str,
                              expected: str) -> None:
    state, url = receiver
    settings = WebhookSettings(url=url, user=user, password=password)
    await run_worker(webhook_org, settings, tmp_path, [email_case(1)],
                     lambda runner, _p: runner.stats.settled_total == 1)
    assert state.requests[0][2]["Authorization"] == expected
    assert "X-Proca-Signature" not in state.requests[0][2]
