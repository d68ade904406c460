"""``proca-sync run --workers N``: one supervisor, N consumer processes on one queue.

On the demo's traffic (simulated Proca actions and events, mostly encrypted, with
poison): a worker killed mid-stream is restarted, SIGTERM stops them all cleanly (exit
0, no process left), ``--exit-when-idle`` stops them once all find the queue drained,
and the CRM then holds what ``replay`` makes of the same messages. ``/metrics`` sums
the workers; ``--max-messages`` counts across them; the webhook CRM is refused.
"""

from __future__ import annotations

import asyncio
import os
import random
import signal
import subprocess
import sys
import urllib.request
from pathlib import Path
from typing import Any

import aio_pika
import pytest

from proca_sync.crm.sql import SqlBackend
from proca_sync.crypto import KeyPair, Keystore
from proca_sync.engine import Engine
from proca_sync.pipeline.simulate import plan_traffic, publish_traffic
from proca_sync.pipeline.topology import declare_test_org
from tests.integration.conftest import ROOT, ConsumerOrg, ConsumerProcess, eventually

pytestmark = [pytest.mark.rabbitmq, pytest.mark.slow]


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PROCA_")}
    return subprocess.run([sys.executable, "-m", "proca_sync", *args], capture_output=True,
                          text=True, cwd=ROOT, env=env, timeout=60, check=False)  # fmt: skip


async def publish_demo(org: ConsumerOrg, tmp_path: Path, actions: int) -> tuple[list[bytes], Path]:
    """The demo's traffic for ``org`` (as ``proca-sync demo`` publishes it); the bodies
    and the org's key store."""
    pair = KeyPair.generate()
    keys = tmp_path / "keys.json"
    Keystore([pair]).save(keys)
    planned = plan_traffic(org.org, actions=actions, seed=2024, keys=pair, poison=1)
    connection = await aio_pika.connect(org.url)
    async with connection:
        channel = await connection.channel(publisher_confirms=True)
        await declare_test_org(channel, org.org, retry_delay_ms=500)
        report = await publish_traffic(channel, planned)
    routed = [p.body for p in planned]
    assert report.unroutable == 0 or len(routed) > report.unroutable
    return routed, keys


def replay_state(bodies: list[bytes], keys: Path, tmp_path: Path) -> dict[str, Any]:
    url = f"sqlite:///{tmp_path / 'replay.db'}"
    backend = SqlBackend(url)

    async def go() -> None:
        await backend.open()
        try:
            await Engine(backend=backend, keystore=Keystore.load(keys)).run(bodies)
        finally:
            await backend.close()

    # The test's own loop is running: replay on a loop of its own, in a thread.
    with __import__("concurrent.futures").futures.ThreadPoolExecutor(1) as pool:
        pool.submit(asyncio.run, go()).result()
    with SqlBackend(url) as reader:
        return reader.export()


def applied(crm: Path) -> int:
    import sqlite3

    if not crm.exists():
        return 0
    try:
        with sqlite3.connect(f"file:{crm}?mode=ro", uri=True, timeout=1) as conn:
            return int(conn.execute("SELECT count(*) FROM applied_messages").fetchone()[0])
    except sqlite3.Error:
        return 0


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie (exited, not yet reaped by its parent) counts as gone.
    try:
        state = Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0]
    except OSError:
        return False
    return state != "Z"


async def test_workers_on_the_demo_restart_stop_and_drain(
    consumer_org: ConsumerOrg, consumer_processes: list[ConsumerProcess], tmp_path: Path
) -> None:
    bodies, keys = await publish_demo(consumer_org, tmp_path, actions=900)
    crm_file = tmp_path / "crm.db"
    args = ("--workers", "2", "--crm", f"sqlite:///{crm_file}",
            "--parked", f"sqlite:///{tmp_path / 'parked.db'}", "--keys", str(keys),
            "--batch-size", "10", "--prefetch", "20")  # fmt: skip
    first = await ConsumerProcess(consumer_org, *args, "--metrics-port", "0").start()
    consumer_processes.append(first)
    await eventually(lambda: len(first.event("worker_started")) == 2, within=60,
                     what="two workers started")  # fmt: skip
    await eventually(lambda: applied(crm_file) >= 100, within=90, what="100 applied")

    # One /metrics for both: the supervisor sums its workers' counters.
    port = first.event("metrics")[0]["port"]
    scraped: list[bytes] = []

    async def summed() -> bool:
        url = f"http://127.0.0.1:{port}/metrics"
        text = await asyncio.to_thread(lambda: urllib.request.urlopen(url, timeout=5).read())
        scraped[:] = [text]
        return b"proca_sync_workers 2.0" in text and b"proca_sync_connected 2.0" in text and (
            b'proca_sync_messages_total{label="applied",outcome="ack"}' in text
        )

    await eventually(summed, within=30, what="/metrics summing both workers")

    # A worker killed mid-stream is restarted.
    victim = random.choice(first.event("worker_started"))
    os.kill(victim["pid"], signal.SIGKILL)
    await eventually(lambda: len(first.event("worker_started")) == 3, within=30,
                     what="the killed worker restarted")  # fmt: skip
    (exit_line,) = first.event("worker_exit")
    assert exit_line["worker"] == victim["worker"] and exit_line["code"] == -signal.SIGKILL
    # Each run of a worker reports once when it is ready to consume, with its start-up time.
    await eventually(lambda: len(first.event("worker_ready")) == 3, within=30,
                     what="the restarted worker ready")  # fmt: skip
    ready = first.event("worker_ready")
    assert sorted(e["worker"] for e in ready) == sorted([0, 1, victim["worker"]])
    assert all(0 < e["seconds"] < 60 for e in ready), ready

    # SIGTERM stops them all: exit 0, no worker left behind.
    first.signal(signal.SIGTERM)
    code = await first.wait(within=60)
    notable = [line for line in first.lines if '"event":"message"' not in line]
    assert code == 0, "\n".join(notable[-20:])
    (stopped,) = [e for e in first.event("stopped") if "workers" in e]
    assert stopped["reason"] == "SIGTERM"
    assert stopped["in_flight"] == 0
    for started in first.event("worker_started"):
        assert not alive(started["pid"]), "a worker outlived the supervisor"

    # Drained by both, then the CRM holds what replay makes of the same messages.
    second = await ConsumerProcess(consumer_org, *args, "--exit-when-idle").start()
    consumer_processes.append(second)
    assert await second.wait(within=120) == 0, "\n".join(second.lines[-20:])
    (stopped,) = [e for e in second.event("stopped") if "workers" in e]
    assert stopped["reason"] == "idle"
    assert await consumer_org.depths() == [0, 0]
    with SqlBackend(f"sqlite:///{crm_file}") as reader:
        actual = reader.export()
    assert actual == replay_state(bodies, keys, tmp_path)


async def test_max_messages_counts_across_workers(
    consumer_org: ConsumerOrg, consumer_processes: list[ConsumerProcess], tmp_path: Path
) -> None:
    _bodies, keys = await publish_demo(consumer_org, tmp_path, actions=300)
    process = await ConsumerProcess(
        consumer_org, "--workers", "2", "--max-messages", "60", "--batch-size", "5",
        "--prefetch", "10", "--crm", "null:", "--parked", f"sqlite:///{tmp_path / 'p.db'}",
        "--keys", str(keys),
    ).start()  # fmt: skip
    consumer_processes.append(process)
    assert await process.wait(within=60) == 0, "\n".join(process.lines[-20:])
    (stopped,) = [e for e in process.event("stopped") if "workers" in e]
    assert stopped["reason"] == "max_messages"
    settled = stopped["acked"] + stopped["parked"] + stopped["retried"]
    # Counted across both: not 60 each. Running batches finish, so a few more may settle.
    assert 60 <= settled < 120, stopped


def test_webhook_crm_refuses_more_than_one_worker(tmp_path: Path) -> None:
    result = cli(
        "run", "--queue", "cus.1.deliver", "--workers", "2", "--crm", "http://127.0.0.1:9/x",
        "--parked", f"sqlite:///{tmp_path / 'p.db'}",
    )  # fmt: skip
    assert result.returncode == 2
    assert "--workers above 1" in result.stderr and "in order" in result.stderr
    bad = cli("run", "--queue", "cus.1.deliver", "--workers", "none")
    assert bad.returncode == 2 and "--workers" in bad.stderr
