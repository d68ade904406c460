"""SIGKILL of the e-mail worker at random (seeded) moments under load, then restart: no
action gets the same e-mail twice; none is lost except those counted as ambiguous (at
most one per kill: the worker sends one e-mail at a time).

Quick mode: 3 kills. ``PROCA_WORKER_KILLS=10`` (the full mode, documented in
docs/workers.md) runs ten.
"""

from __future__ import annotations

import asyncio
import os
import random
import signal
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import IO

import pytest

from proca_sync.pipeline.topology import OrgFlags, email_supporter_queue
from proca_sync.pipeline.workers.ledger import SentLedger
from tests.integration.conftest import (
    ROOT,
    ConsumerOrg,
    _delete_org,
    eventually,
    split_credentials,
)
from tests.support.workers import SmtpSink, declare_worker_org, email_case, write_templates

pytestmark = pytest.mark.rabbitmq

KILLS = int(os.environ.get("PROCA_WORKER_KILLS", "3"))
MESSAGES = 40 * KILLS + 40
SEED = int(os.environ.get("PROCA_WORKER_SEED", "15"))


@pytest.fixture
async def email_org(amqp_url: str) -> AsyncIterator[ConsumerOrg]:
    org = random.randint(10_000_000, 2_000_000_000)
    topology = await declare_worker_org(amqp_url, org, OrgFlags(email_backend=True))
    try:
        yield ConsumerOrg(org, amqp_url, topology)
    finally:
        await _delete_org(amqp_url, topology)


def worker_args(org: ConsumerOrg, sink: SmtpSink, tmp_path: Path, *extra: str) -> list[str]:
    url, _ = split_credentials(org.url)
    return [
        sys.executable, "-m", "proca_sync", "worker", "email", "--org", str(org.org),
        "--url", url, "--sender", "campaigns@example.org", "--smtp-host", "127.0.0.1",
        "--smtp-port", str(sink.port), "--smtp-security", "none",
        "--templates", str(tmp_path / "templates"),
        "--ledger", f"sqlite:///{tmp_path / 'ledger.db'}",
        "--parked", f"sqlite:///{tmp_path / 'parked.db'}", "--rate", "0", *extra,
    ]


async def start(args: list[str], org: ConsumerOrg, log: IO[bytes]
                ) -> asyncio.subprocess.Process:
    _, credentials = split_credentials(org.url)
    env = {k: v for k, v in os.environ.items() if not k.startswith("PROCA_")}
    return await asyncio.create_subprocess_exec(
        *args, env={**env, **credentials}, cwd=ROOT, stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL, stderr=log,
    )


async def test_sigkill_never_sends_twice(email_org: ConsumerOrg, tmp_path: Path) -> None:
    rng = random.Random(SEED)
    write_templates(tmp_path / "templates")
    ids = list(range(1000, 1000 + MESSAGES))
    bodies = [email_case(i, ref=f"ref{i:040d}", page_id=i) for i in ids]
    kill_points = sorted(rng.sample(range(5, MESSAGES - 20), KILLS))
    await email_org.publish(bodies, queue=email_supporter_queue(email_org.org))
    with SmtpSink() as sink, (tmp_path / "worker.log").open("ab") as log:
        args = worker_args(email_org, sink, tmp_path)
        in_window = 0
        for n, point in enumerate(kill_points):
            proc = await start(args, email_org, log)
            # Every other kill (the first included) lands inside the ambiguous window: the
            # SMTP server kills the worker on receiving an e-mail, before answering it.
            # The others at a random moment after the point-th e-mail.
            if n % 2 == 0:
                in_window += 1
                sink.handler.kill_at, sink.handler.kill_pid = point, proc.pid
            try:
                await eventually(lambda p=point: sink.handler.count() >= p or proc.returncode
                                 is not None, within=60, what=f"{point} e-mails", interval=0.002)
                await asyncio.sleep(rng.random() * 0.02)  # sleep-ok: the kill's moment
            finally:
                if proc.returncode is None:
                    proc.send_signal(signal.SIGKILL)
                await proc.wait()
            assert proc.returncode == -signal.SIGKILL, (tmp_path / "worker.log").read_text()
        final = await start([*args, "--exit-when-idle", "--idle-seconds", "0.5"], email_org,
                            log)
        code = await asyncio.wait_for(final.wait(), timeout=120)
        assert code == 0
        received = sink.handler.by_kind()

    ledger = SentLedger(f"sqlite:///{tmp_path / 'ledger.db'}")
    states = ledger.states()
    twice = [key for key, mails in received.items() if len(mails) > 1]
    assert not twice, f"sent twice: {twice}"
    ambiguous = {a for (a, _k), s in states.items() if s == "ambiguous"}
    lost = [i for i in ids if (i, "thank_you") not in received and i not in ambiguous]
    assert not lost, f"lost without being counted: {lost}"
    assert len(ambiguous) <= KILLS, f"{len(ambiguous)} ambiguous for {KILLS} kills"
    assert len(ambiguous) >= in_window, "a kill inside the window was not counted"
    assert sum(1 for s in states.values() if s == "sending") == 0
    assert len(received) + len(ambiguous - {a for a, _ in received}) == MESSAGES
