"""Bench: e-mails per second from the e-mail worker to a local SMTP sink.

One run: declare a fresh org with ``wrk.N.email.supporter``, pre-fill it with N
thank-you cases (not timed), start an aiosmtpd sink in this process, start
``proca-sync worker email --exit-when-idle`` as its own process and time from its start
to the N-th e-mail received by the sink. Baseline, measured in the same run against the
same sink: the same N rendered messages sent by one aiosmtplib connection in a loop (no
broker, no ledger, no templates) — the ceiling of a sequential SMTP sender here.

    python -m bench.email_worker [--n 2000] [--amqp amqp://guest:guest@127.0.0.1:5672/]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import aio_pika
import aiosmtplib
import orjson

from proca_sync.pipeline.topology import OrgFlags, email_supporter_queue
from tests.integration.conftest import _delete_org, split_credentials
from tests.support.workers import SmtpSink, declare_worker_org, email_case, write_templates

ROOT = Path(__file__).resolve().parents[1]


async def baseline(sink: SmtpSink, n: int) -> float:
    payload = (b"From: a@example.org\r\nTo: b@example.org\r\nSubject: x\r\n"
               b"Message-ID: <x@example.org>\r\n\r\n" + b"Dear Ada, thanks.\r\n" * 10)
    smtp = aiosmtplib.SMTP(hostname="127.0.0.1", port=sink.port, start_tls=False)
    await smtp.connect()
    started = time.perf_counter()
    for _ in range(n):
        await smtp.mail("a@example.org")
        await smtp.rcpt("b@example.org")
        await smtp.data(payload)
    elapsed = time.perf_counter() - started
    await smtp.quit()
    return n / elapsed


async def worker_rate(amqp: str, n: int, work: Path, sink: SmtpSink,
                      profile: Path | None = None, concurrency: int = 1) -> float:
    org = random.randint(10_000_000, 2_000_000_000)
    topology = await declare_worker_org(amqp, org, OrgFlags(email_backend=True))
    try:
        connection = await aio_pika.connect(amqp)
        channel = await connection.channel(publisher_confirms=True)
        for i in range(n):
            await channel.default_exchange.publish(
                aio_pika.Message(email_case(10_000 + i, ref=f"r{i:042d}", page_id=i),
                                 delivery_mode=aio_pika.DeliveryMode.PERSISTENT),
                routing_key=email_supporter_queue(org),
            )
        await connection.close()
        url, credentials = split_credentials(amqp)
        prefix = ["-m", "cProfile", "-o", str(profile)] if profile is not None else []
        args = [
            sys.executable, *prefix, "-m", "proca_sync", "worker", "email", "--org", str(org),
            "--url", url, "--sender", "campaigns@example.org", "--smtp-host", "127.0.0.1",
            "--smtp-port", str(sink.port), "--smtp-security", "none",
            "--templates", str(write_templates(work / "templates")),
            "--ledger", f"sqlite:///{work / f'ledger-{org}.db'}",
            "--parked", f"sqlite:///{work / f'parked-{org}.db'}", "--rate", "0",
            "--exit-when-idle", "--idle-seconds", "0.3", "--concurrency", str(concurrency),
            "--log-level", os.environ.get("BENCH_LOG_LEVEL", "WARNING"),
        ]
        env = {k: v for k, v in os.environ.items() if not k.startswith("PROCA_")}
        before = sink.handler.count()
        started = time.perf_counter()
        proc = await asyncio.create_subprocess_exec(
            *args, env={**env, **credentials}, cwd=ROOT, stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
        )
        while sink.handler.count() - before < n:
            if proc.returncode is not None:
                raise RuntimeError(f"worker exited with {proc.returncode}")
            await asyncio.sleep(0.01)  # sleep-ok: polling the sink
        elapsed = time.perf_counter() - started
        await proc.wait()
        return n / elapsed
    finally:
        await _delete_org(amqp, topology)


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--n", type=int, default=2000)
    parser.add_argument("--amqp", default="amqp://guest:guest@127.0.0.1:5672/")
    parser.add_argument("--concurrency", type=int, default=1)
    parser.add_argument("--profile", type=Path, default=None,
                        help="Write a cProfile of the worker process here.")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" /
                        "email_worker.json")
    options = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp, SmtpSink() as sink:
        base = await baseline(sink, options.n)
        rate = await worker_rate(options.amqp, options.n, Path(tmp), sink, options.profile,
                                 options.concurrency)
    result = {"n": options.n, "concurrency": options.concurrency,
              "worker_emails_per_s": round(rate, 1), "baseline_emails_per_s": round(base, 1),
              "ratio": round(rate / base, 3)}
    options.out.parent.mkdir(parents=True, exist_ok=True)
    options.out.write_bytes(orjson.dumps(result, option=orjson.OPT_INDENT_2))
    print(orjson.dumps(result).decode())


if __name__ == "__main__":
    asyncio.run(main())
