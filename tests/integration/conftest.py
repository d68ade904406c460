"""Shared fixtures of the integration tests: the RabbitMQ broker on loopback.

A test that needs the broker skips when it is absent locally and fails when ``CI`` is
set (``require_service`` in ``tests/conftest.py``). ``PROCA_TEST_AMQP_URL`` points the
tests at another broker or vhost.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Iterator
from urllib.parse import urlsplit

import aio_pika
import pytest
from aio_pika.abc import AbstractConnection

from tests.conftest import require_service

AMQP_URL = os.environ.get("PROCA_TEST_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/")


@pytest.fixture
def amqp_url() -> str:
    """The test broker's URL; skips (or fails under CI) when nothing listens there."""
    parts = urlsplit(AMQP_URL)
    require_service("RabbitMQ", parts.hostname or "127.0.0.1", parts.port or 5672)
    return AMQP_URL


@pytest.fixture
async def amqp_connection(amqp_url: str) -> AsyncIterator[AbstractConnection]:
    """One plain connection per test, closed afterwards."""
    connection = await aio_pika.connect(amqp_url)
    try:
        yield connection
    finally:
        await connection.close()


# ---- the queue consumer's tests: one Proca org per test ------------------------------------
# (tests/integration/test_consumer*.py; helpers are imported from here)

import asyncio  # noqa: E402
import contextlib  # noqa: E402
import random  # noqa: E402
import shutil  # noqa: E402
import signal  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from collections.abc import Awaitable, Callable, Iterable  # noqa: E402
from dataclasses import dataclass, field  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402
from urllib.parse import urlunsplit  # noqa: E402

import orjson  # noqa: E402

from proca_sync.crm.base import NullBackend  # noqa: E402
from proca_sync.crypto import KeyPair, Keystore  # noqa: E402
from proca_sync.engine import Engine  # noqa: E402
from proca_sync.errors import PermanentError  # noqa: E402
from proca_sync.pipeline.topology import (  # noqa: E402
    SYSTEM_QUEUE,
    Topology,
    declare_test_org,
    deliver_queue,
    fail_queue,
)
from proca_sync.sync.model import body_digest  # noqa: E402
from proca_sync.sync.records import Ignored  # noqa: E402
from tests.conftest import all_fixture_bodies  # noqa: E402
from tests.support.builders import ORG, action, campaign_updated, dumps, email_status  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]


async def eventually(
    check: Callable[[], Awaitable[bool] | bool],
    *,
    within: float,
    what: str,
    interval: float = 0.05,
) -> None:
    """Poll ``check`` until it is true; fail with ``what`` after ``within`` seconds."""
    deadline = time.monotonic() + within
    while True:
        result = check()
        if not isinstance(result, bool):
            result = await result
        if result:
            return
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {within} s waiting for {what}")
        await asyncio.sleep(interval)


@dataclass
class ConsumerOrg:
    """A Proca org declared on the test broker (fail-queue TTL 500 ms)."""

    org: int
    url: str
    topology: Topology

    @property
    def queue(self) -> str:
        return deliver_queue(self.org)

    @property
    def fail(self) -> str:
        return fail_queue(self.org)

    async def publish(self, bodies: Iterable[bytes], *, queue: str | None = None) -> int:
        """Publish like an operator re-send (default exchange, persistent), confirmed."""
        connection = await aio_pika.connect(self.url)
        count = 0
        try:
            channel = await connection.channel(publisher_confirms=True)
            for body in bodies:
                await channel.default_exchange.publish(
                    aio_pika.Message(body, delivery_mode=aio_pika.DeliveryMode.PERSISTENT),
                    routing_key=queue or self.queue,
                )
                count += 1
        finally:
            await connection.close()
        return count

    async def depths(self, *names: str) -> list[int]:
        """Ready messages of each queue (a fresh connection: survives connection kills)."""
        connection = await aio_pika.connect(self.url)
        try:
            result = []
            for name in names or (self.queue, self.fail):
                channel = await connection.channel()
                queue = await channel.declare_queue(name, passive=True)
                result.append(int(queue.declaration_result.message_count or 0))
                await channel.close()
            return result
        finally:
            await connection.close()

    async def drained(self) -> bool:
        return sum(await self.depths()) == 0


async def _delete_org(url: str, topology: Topology, extra_queues: Iterable[str] = ()) -> None:
    connection = await aio_pika.connect(url)
    try:
        channel = await connection.channel()
        for name in [*(q.name for q in topology.queues if q.name != SYSTEM_QUEUE), *extra_queues]:
            await channel.queue_delete(name, if_unused=False, if_empty=False)
        for exchange in topology.exchanges:
            await channel.exchange_delete(exchange.name)
    finally:
        await connection.close()


@pytest.fixture
async def consumer_org(amqp_url: str) -> AsyncIterator[ConsumerOrg]:
    """A fresh org id (random) with custom delivery on; everything deleted afterwards."""
    org = random.randint(10_000_000, 2_000_000_000)
    connection = await aio_pika.connect(amqp_url)
    try:
        topology = await declare_test_org(await connection.channel(), org, retry_delay_ms=500)
    finally:
        await connection.close()
    try:
        yield ConsumerOrg(org, amqp_url, topology)
    finally:
        await _delete_org(amqp_url, topology)


def split_credentials(url: str) -> tuple[str, dict[str, str]]:
    """``url`` without user and password, and the PROCA_* variables that carry them."""
    parts = urlsplit(url)
    host = parts.netloc.rsplit("@", 1)[-1]
    env = {}
    if parts.username:
        env["PROCA_USERNAME"] = parts.username
    if parts.password:
        env["PROCA_PASSWORD"] = parts.password
    return urlunsplit(parts._replace(netloc=host)), env


class ConsumerProcess:
    """``python -m proca_sync run …`` as a child process; stderr JSON lines are collected."""

    def __init__(self, org: ConsumerOrg, *args: str, env: dict[str, str] | None = None) -> None:
        url, credentials = split_credentials(org.url)
        self.args = [sys.executable, "-m", "proca_sync", "run", "--url", url,
                     "--queue", org.queue, *args]
        base = {k: v for k, v in os.environ.items() if not k.startswith("PROCA_")}
        self.env = {**base, **credentials, **(env or {})}
        self.proc: asyncio.subprocess.Process | None = None
        self.lines: list[str] = []
        self._reader: asyncio.Task[None] | None = None

    async def start(self) -> ConsumerProcess:
        self.proc = await asyncio.create_subprocess_exec(
            *self.args, env=self.env, cwd=ROOT, stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
        )
        self._reader = asyncio.create_task(self._read())
        return self

    async def _read(self) -> None:
        assert self.proc is not None and self.proc.stderr is not None
        async for raw in self.proc.stderr:
            self.lines.append(raw.decode("utf-8", "replace").rstrip("\n"))

    @property
    def events(self) -> list[dict[str, Any]]:
        events = []
        for line in self.lines:
            with contextlib.suppress(orjson.JSONDecodeError):
                entry = orjson.loads(line)
                if isinstance(entry, dict):
                    events.append(entry)
        return events

    def event(self, name: str) -> list[dict[str, Any]]:
        return [e for e in self.events if e.get("event") == name]

    def signal(self, sig: int) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)

    async def wait(self, within: float = 60) -> int:
        assert self.proc is not None
        try:
            code = await asyncio.wait_for(self.proc.wait(), timeout=within)
        except TimeoutError:
            self.proc.kill()
            await self.proc.wait()
            pytest.fail(f"consumer did not exit within {within} s:\n" + "\n".join(self.lines[-30:]))
        if self._reader is not None:
            await self._reader
        return code

    async def stop(self) -> None:
        if self.proc is not None and self.proc.returncode is None:
            self.proc.send_signal(signal.SIGKILL)
            await self.proc.wait()
        if self._reader is not None:
            with contextlib.suppress(Exception):
                await self._reader


@pytest.fixture
async def consumer_processes() -> AsyncIterator[list[ConsumerProcess]]:
    """Register started consumers here; any still running is killed at teardown."""
    started: list[ConsumerProcess] = []
    yield started
    for process in started:
        await process.stop()


def require_rabbitmqctl() -> str:
    path = shutil.which("rabbitmqctl")
    ok = path is not None and subprocess.run(
        [path, "status"], capture_output=True, timeout=30, check=False
    ).returncode == 0
    if not ok:
        if os.environ.get("CI"):
            pytest.fail("rabbitmqctl is not usable")
        pytest.skip("rabbitmqctl is not usable here")
    assert path is not None
    return path


def close_connections_named(fragment: str) -> int:
    """Force-close the broker connections whose client-given name contains ``fragment``
    (``rabbitmqctl close_connection``; other users of the broker are left alone)."""
    ctl = require_rabbitmqctl()
    listing = subprocess.run(
        [ctl, "list_connections", "pid", "client_properties", "-q", "--no-table-headers"],
        capture_output=True, text=True, timeout=30, check=True,
    ).stdout
    closed = 0
    for line in listing.splitlines():
        if fragment in line:
            pid = line.split("\t", 1)[0]
            subprocess.run([ctl, "close_connection", pid, "test"], capture_output=True,
                           timeout=30, check=True)
            closed += 1
    return closed


# ---- message streams ------------------------------------------------------------------------

STRANGER = KeyPair.generate()


def _ref(n: int) -> str:
    return f"c{n:05d}".ljust(43, "x")


@dataclass
class Stream:
    """Bodies to publish, with what the engine makes of each (the oracle for parking)."""

    bodies: list[bytes]
    keystore: Keystore
    poison: dict[str, str] = field(default_factory=dict)  # digest → reason code
    ignored: int = 0
    records: int = 0

    def write(self, directory: Path) -> Path:
        """One .json file per body (bytes unchanged), as `proca-sync replay DIR` reads."""
        directory.mkdir(parents=True, exist_ok=True)
        for number, body in enumerate(self.bodies):
            (directory / f"m{number:06d}.json").write_bytes(body)
        return directory


def classify(stream: Stream) -> Stream:
    engine = Engine(backend=NullBackend(), keystore=stream.keystore)
    stream.poison.clear()
    stream.ignored = stream.records = 0
    for body in stream.bodies:
        try:
            prepared = engine.prepare(body)
        except PermanentError as exc:
            stream.poison[body_digest(body)] = str(exc.reason)
            continue
        if isinstance(prepared, Ignored):
            stream.ignored += 1
        else:
            stream.records += 1
    return stream


def poison_bodies() -> list[bytes]:
    """Messages that must be parked: one per permanent failure kind."""
    tampered = action(990001, ref=_ref(99001), email=None, created="2024-05-01T10:00:00Z",
                      record={"email": "t@example.org", "lastName": "T"}, encrypt_for=ORG)
    payload = tampered["personalInfo"]["payload"]
    tampered["personalInfo"]["payload"] = ("A" if payload[0] != "A" else "B") + payload[1:]
    unknown_key = action(990002, ref=_ref(99002), email=None, created="2024-05-01T10:00:00Z",
                         record={"email": "u@example.org"}, encrypt_for=STRANGER)
    no_id = action(990003, ref=_ref(99003), email="n@example.org", created="2024-05-01T10:00:00Z")
    del no_id["actionId"]
    return [
        b"this is not json {",
        b"[1, 2, 3]",
        b'{"schema": "proca:action:9", "actionId": 1}',
        dumps(tampered),
        dumps(unknown_key),
        dumps(no_id),
    ]


def ignored_bodies() -> list[bytes]:
    confirm = {"schema": "proca:event:2", "eventType": "confirm_created",
               "timestamp": "2024-05-01T10:00:00Z",
               "confirm": {"operation": "launch_page", "code": "x", "email": "", "message": "",
                           "subjectId": 1, "objectId": "", "creator": {},
                           "acceptLink": "https://x/a", "rejectLink": "https://x/r"}}
    unknown_event = {"schema": "proca:event:2", "eventType": "something_new",
                     "timestamp": "2024-05-01T10:00:00Z"}
    return [dumps(confirm), dumps(unknown_event)]


def mixed_stream(*, contacts: int, per_contact: int, seed: int) -> Stream:
    """Actions (clear and encrypted), e-mail status events, campaign updates, ignored
    messages, poison, the shared fixtures — each contact's messages interleaved with the
    others' in a seeded random order (a contact's own order is kept)."""
    rng = random.Random(seed)
    lanes: list[list[bytes]] = []
    for c in range(contacts):
        ref = _ref(c)
        email = f"person{c}@example.org"
        own: list[bytes] = []
        for k in range(per_contact):
            action_id = 100_000 + c * 1000 + k
            created = f"2024-0{1 + k % 9}-{1 + c % 27:02d}T{k % 24:02d}:00:00Z"
            encrypt = ORG if c % 3 == 0 else None
            own.append(dumps(action(
                action_id, ref=ref, email=None if encrypt else email, created=created,
                record={"email": email, "postcode": f"{1000 + k}", "country": "BE"},
                encrypt_for=encrypt, opt_in=(k % 2 == 0), action_type="register" if k == 0 else "share",
                with_consent=k == 0, given_at="2024-01-01T00:00:00Z",
                campaign=f"campaign_{c % 4}",
            )))
            if k % 4 == 3:
                status = rng.choice(["double_opt_in", "bounce", "unsub"])
                own.append(dumps(email_status(
                    ref=ref, email=None, status=status,
                    changed=f"2024-0{1 + k % 9}-{1 + c % 27:02d}T{k % 24:02d}:30:00Z",
                    action_id=action_id, created=created,
                )))
        lanes.append(own)
    lanes.append([dumps(campaign_updated(f"campaign_{n}", f"Campaign {n}", when="2024-02-01T00:00:00Z"))
                  for n in range(4)])
    lanes.append(poison_bodies())
    lanes.append(ignored_bodies())
    lanes.append(all_fixture_bodies())
    bodies: list[bytes] = []
    cursors = [0] * len(lanes)
    live = [i for i, lane in enumerate(lanes) if lane]
    while live:
        i = rng.choice(live)
        bodies.append(lanes[i][cursors[i]])
        cursors[i] += 1
        if cursors[i] == len(lanes[i]):
            live.remove(i)
    keystore = Keystore([ORG])
    return classify(Stream(bodies, keystore))


def replay_export(stream: Stream, tmp_path: Path) -> dict[str, Any]:
    """The CRM state `proca-sync replay` reaches with the same messages (another file)."""
    from proca_sync.crm.sql import SqlBackend

    directory = stream.write(tmp_path / "replay-input")
    keys = tmp_path / "replay-keys.json"
    stream.keystore.save(keys)
    crm = f"sqlite:///{tmp_path / 'replay.db'}"
    result = subprocess.run(
        [sys.executable, "-m", "proca_sync", "replay", str(directory), "--crm", crm,
         "--keys", str(keys), "--json"],
        capture_output=True, text=True, cwd=ROOT, timeout=120, check=False,
    )
    assert result.returncode in (0, 1), result.stderr
    backend = SqlBackend(crm)
    try:
        return backend.export()
    finally:
        backend.engine.dispose()


def crm_export(url: str) -> dict[str, Any]:
    from proca_sync.crm.sql import SqlBackend

    backend = SqlBackend(url)
    try:
        return backend.export()
    finally:
        backend.engine.dispose()


@pytest.fixture
def umask() -> Iterator[None]:
    """A permissive umask, so that only our own code can make a file private."""
    old = os.umask(0o022)
    try:
        yield
    finally:
        os.umask(old)
