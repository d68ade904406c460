"""A real ``proca-sync pipeline serve`` process for tests, with its own SQLite state, an
org with a random id on the test broker, and helpers to talk to it and read its queues."""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aio_pika
import aiohttp
import orjson

from proca_sync.pipeline import admin
from proca_sync.pipeline.instance import InstanceSecrets
from proca_sync.pipeline.state import migrate, open_engine
from proca_sync.pipeline.topology import SYSTEM_QUEUE, OrgFlags, plan_topology

ROOT = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def submission(page: int, n: int, *, opt_in: bool | None = True, **extra: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "actionPageId": page,
        "action": {"actionType": "register", "customFields": {"comment": f"c{n}"}},
        "contact": {
            "firstName": f"First{n}",
            "lastName": f"Last{n}",
            "email": f"person{n}@example.org",
            "address": {"country": "DE", "postcode": "10115"},
        },
        "privacy": {"optIn": opt_in},
        "tracking": {"source": "news", "medium": "email", "campaign": "oct"},
    }
    body.update(extra)
    return body


@dataclass
class Pipeline:
    """One pipeline instance: its files, its org/campaign/page ids, its process."""

    tmp: Path
    amqp_url: str
    org: int = field(default_factory=lambda: random.randint(10_000_000, 2_000_000_000))
    port: int = field(default_factory=free_port)
    proc: subprocess.Popen[bytes] | None = None
    api_key: str = field(default="", repr=False)

    def __post_init__(self) -> None:
        self.db = f"sqlite:///{self.tmp / 'pipeline.db'}"
        self.secrets_path = self.tmp / "secrets.json"
        InstanceSecrets.generate().save(self.secrets_path)
        self.secrets = InstanceSecrets.load(self.secrets_path)
        self.engine = open_engine(self.db)
        migrate(self.engine)
        self.campaign = self.org % 1_000_000_000 + 1
        self.page = self.campaign + 1
        self.log = self.tmp / f"serve-{self.port}.log"

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def setup(self, *, campaign: dict[str, Any] | None = None, **flags: bool) -> None:
        admin.add_org(self.engine, org_id=self.org, name=f"org{self.org}", title="Test org",
                      **flags)
        admin.add_campaign(self.engine, campaign_id=self.campaign, name=f"camp{self.campaign}",
                           title="Test campaign", org_id=self.org, **(campaign or {}))
        admin.add_page(self.engine, page_id=self.page, name=f"example.org/p{self.page}",
                       locale="de", campaign_id=self.campaign, org_id=self.org,
                       location="https://example.org/petition")
        self.api_key = admin.new_api_key(self.engine, self.org)

    def start_without_broker(self) -> None:
        """Serve the HTTP side only (the outbox fills, nothing is published)."""
        self.start(broker=False)

    def start(self, *args: str, broker: bool = True) -> None:
        env = {k: v for k, v in os.environ.items() if not k.startswith("PROCA_")}
        env.update(PROCA_PIPELINE_DB=self.db, PROCA_PIPELINE_SECRETS=str(self.secrets_path))
        if broker:
            env["PROCA_PIPELINE_BROKER"] = self.amqp_url
        handle = self.log.open("ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "proca_sync", "pipeline", "serve", "--port", str(self.port),
             "--retry-delay-ms", "500", "--rate", "0", *args],
            cwd=ROOT, env=env, stdin=subprocess.DEVNULL, stdout=handle, stderr=handle,
        )
        handle.close()
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError("pipeline exited:\n" + self.log.read_text()[-3000:])
            with contextlib.suppress(OSError), socket.create_connection(
                ("127.0.0.1", self.port), timeout=0.2
            ):
                return
            time.sleep(0.05)  # sleep-ok: polling for the port with a deadline
        raise AssertionError("pipeline did not listen within 30 s")

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait()

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.kill()

    async def post(self, path: str, body: Any, **headers: str) -> tuple[int, Any]:
        async with aiohttp.ClientSession() as session, session.post(
            self.base + path, json=body, headers=headers
        ) as response:
            text = await response.text()
            with contextlib.suppress(ValueError):
                return response.status, orjson.loads(text)
            return response.status, text

    async def post_raw(self, path: str, body: bytes, signature: str) -> tuple[int, Any]:
        async with aiohttp.ClientSession() as session, session.post(
            self.base + path, data=body,
            headers={"Content-Type": "application/json", "X-Proca-Signature": signature},
        ) as response:
            return response.status, await response.json(content_type=None)

    async def get(self, path: str, *, api: bool = False) -> tuple[int, Any, Any]:
        headers = {"X-Api-Key": self.api_key} if api else {}
        async with aiohttp.ClientSession() as session, session.get(
            self.base + path, headers=headers, allow_redirects=False
        ) as response:
            text = await response.text()
            try:
                data: Any = orjson.loads(text)
            except ValueError:
                data = text
            return response.status, data, response.headers

    async def manage(self, path: str, method: str = "POST", body: Any = None) -> tuple[int, Any]:
        async with aiohttp.ClientSession() as session, session.request(
            method, self.base + path, json=body, headers={"X-Api-Key": self.api_key}
        ) as response:
            return response.status, await response.json(content_type=None)

    async def drain(self, queue: str, *, expect: int, within: float = 30) -> list[aio_pika.abc.AbstractIncomingMessage]:
        """Take messages from ``queue`` (acked) until ``expect`` arrived or the deadline."""
        got: list[aio_pika.abc.AbstractIncomingMessage] = []
        connection = await aio_pika.connect(self.amqp_url)
        try:
            channel = await connection.channel()
            source = await channel.get_queue(queue, ensure=True)
            deadline = time.monotonic() + within
            while len(got) < expect and time.monotonic() < deadline:
                message = await source.get(no_ack=True, fail=False)
                if message is None:
                    await asyncio.sleep(0.05)  # sleep-ok: poll interval inside a deadline
                    continue
                got.append(message)
        finally:
            await connection.close()
        return got

    async def depth(self, queue: str) -> int:
        connection = await aio_pika.connect(self.amqp_url)
        try:
            channel = await connection.channel()
            declared = await channel.declare_queue(queue, passive=True)
            return int(declared.declaration_result.message_count or 0)
        finally:
            await connection.close()

    async def cleanup(self) -> None:
        self.stop()
        self.engine.dispose()
        topology = plan_topology(self.org, OrgFlags(
            custom_supporter_confirm=True, custom_action_confirm=True,
            custom_action_deliver=True, custom_event_deliver=True, email_backend=True,
        ))
        connection = await aio_pika.connect(self.amqp_url)
        try:
            channel = await connection.channel()
            for queue in topology.queues:
                if queue.name != SYSTEM_QUEUE:
                    await channel.queue_delete(queue.name)
            for exchange in topology.exchanges:
                await channel.exchange_delete(exchange.name)
            # system.* copies of our campaign_updated events: leave the shared queue alone.
        finally:
            await connection.close()


def bodies(messages: list[aio_pika.abc.AbstractIncomingMessage]) -> list[dict[str, Any]]:
    return [orjson.loads(m.body) for m in messages]
