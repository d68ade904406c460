"""``python -m bench.pipeline``: the pipeline's intake rate, end to end.

    python -m bench.pipeline [--n 5000] [--concurrency 32] [--amqp-url URL] [--repeat 3]

Starts ``proca-sync pipeline serve`` (SQLite state in a temporary directory, rate limit
off) for a fresh org with custom action delivery, posts N ``addActionContact``
submissions from C concurrent HTTP clients and times from the first request until all N
deliver messages are in ``cus.N.deliver`` (intake → state → outbox → broker, confirmed).
The baseline, measured in the same run against the same process and client: ``GET
/health`` at the same concurrency (the HTTP stack's ceiling on this machine). Writes
``bench/results/pipeline.json`` and ``bench/results/pipeline.md`` and puts that
section into ``BENCHMARKS.md`` (``bench/report.py`` includes it when it regenerates).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import socket
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aio_pika
import aiohttp
import orjson

from proca_sync.pipeline import admin
from proca_sync.pipeline.instance import InstanceSecrets
from proca_sync.pipeline.state import migrate, open_engine
from proca_sync.pipeline.topology import deliver_queue

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"


def _port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _body(page: int, n: int) -> dict[str, Any]:
    return {
        "actionPageId": page,
        "action": {"actionType": "register", "customFields": {"comment": "bench"}},
        "contact": {"firstName": f"F{n}", "lastName": "L", "email": f"b{n}@example.org",
                    "address": {"country": "DE", "postcode": "10115"}},
        "privacy": {"optIn": n % 2 == 0},
        "tracking": {"source": "bench", "medium": "http", "campaign": "bench"},
    }


async def _fire(url: str, bodies: list[Any] | None, count: int, concurrency: int) -> float:
    """Send ``count`` requests (POST ``bodies`` or GET) with ``concurrency`` workers."""
    queue = iter(range(count))
    connector = aiohttp.TCPConnector(limit=concurrency)
    started = time.perf_counter()
    async with aiohttp.ClientSession(connector=connector) as session:

        async def worker() -> None:
            for i in queue:
                if bodies is None:
                    async with session.get(url) as response:
                        await response.read()
                else:
                    async with session.post(url, data=bodies[i], headers={
                            "Content-Type": "application/json"}) as response:
                        await response.read()
                        if response.status != 200:
                            raise RuntimeError(f"intake answered {response.status}")

        await asyncio.gather(*(worker() for _ in range(concurrency)))
    return time.perf_counter() - started


async def _wait_depth(url: str, queue: str, n: int, started: float, limit: float) -> float:
    connection = await aio_pika.connect(url)
    try:
        channel = await connection.channel()
        while True:
            declared = await channel.declare_queue(queue, passive=True)
            if int(declared.declaration_result.message_count or 0) >= n:
                return time.perf_counter() - started
            if time.perf_counter() - started > limit:
                raise RuntimeError("the deliver queue did not fill in time")
            await asyncio.sleep(0.02)
    finally:
        await connection.close()


async def _cleanup(url: str, org: int) -> None:
    connection = await aio_pika.connect(url)
    try:
        channel = await connection.channel()
        await channel.queue_delete(deliver_queue(org))
        await channel.queue_delete(f"org.{org}.fail")
        for kind in ("confirm.supporter", "confirm.action", "deliver", "event", "fail", "retry"):
            await channel.exchange_delete(f"org.{org}.{kind}")
    finally:
        await connection.close()


def _cpu_seconds(pid: int) -> float:
    """utime + stime of ``pid`` (Linux /proc), in seconds."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _spawn(port: int, env: dict[str, str]) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-m", "proca_sync", "pipeline", "serve", "--port", str(port),
         "--rate", "0", "--log-level", "WARNING"],
        cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )


async def one_run(amqp_url: str, n: int, concurrency: int, tmp: Path) -> dict[str, Any]:
    org = random.randint(10_000_000, 2_000_000_000)
    db = f"sqlite:///{tmp / f'state-{org}.db'}"
    secrets = tmp / f"secrets-{org}.json"
    InstanceSecrets.generate().save(secrets)
    engine = open_engine(db)
    migrate(engine)
    admin.add_org(engine, org_id=org, name=f"bench{org}", title="Bench",
                  custom_action_deliver=True)
    admin.add_campaign(engine, campaign_id=1, name=f"bench{org}", title="Bench", org_id=org)
    admin.add_page(engine, page_id=1, name=f"bench/{org}", locale="en", campaign_id=1,
                   org_id=org)
    engine.dispose()
    port = _port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("PROCA_")}
    env.update(PROCA_PIPELINE_DB=db, PROCA_PIPELINE_SECRETS=str(secrets),
               PROCA_PIPELINE_BROKER=amqp_url)
    proc = _spawn(port, env)
    base = f"http://127.0.0.1:{port}"
    try:
        for _ in range(300):
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                    break
            except OSError:
                await asyncio.sleep(0.05)
        health = await _fire(base + "/health", None, n, concurrency)
        bodies = [orjson.dumps(_body(1, i)) for i in range(n)]
        cpu_before = _cpu_seconds(proc.pid)
        started = time.perf_counter()
        intake = await _fire(base + "/api/actions", bodies, n, concurrency)
        end_to_end = await _wait_depth(amqp_url, deliver_queue(org), n, started, 600)
        server_cpu = _cpu_seconds(proc.pid) - cpu_before
    finally:
        proc.terminate()
        proc.wait(20)
        await _cleanup(amqp_url, org)
    return {
        "n": n,
        "concurrency": concurrency,
        "health_rps": n / health,
        "intake_rps": n / intake,
        "end_to_end_rps": n / end_to_end,
        "ratio_to_http_ceiling": (n / end_to_end) / (n / health),
        "server_cpu_s": server_cpu,
        "actions_per_server_cpu_s": n / server_cpu if server_cpu else None,
        "load_average": os.getloadavg()[0],
    }


def markdown(doc: dict[str, Any]) -> str:
    best = doc["best"]
    rows = "\n".join(
        f"| {i + 1} | {r['end_to_end_rps']:,.0f} | {r['intake_rps']:,.0f} | "
        f"{r['health_rps']:,.0f} | {r['ratio_to_http_ceiling']:.2f}× | "
        f"{r['actions_per_server_cpu_s']:,.0f} | {r['load_average']:.1f} |"
        for i, r in enumerate(doc["runs"])
    )
    verdict = "met" if best["end_to_end_rps"] >= 500 else "NOT met"
    busiest = max(r["load_average"] for r in doc["runs"])
    machine = (
        "**The machine was shared and busy** (load average up to "
        f"{busiest:.1f} on 2 cores) while this ran; figures are lower bounds of what the "
        "code does on a quiet host."
        if busiest > 2.5
        else f"The machine was otherwise quiet (load average up to {busiest:.1f}); the "
        "client, the broker and the server share its 2 cores."
    )
    return f"""## Pipeline intake (intake → cus.N.deliver)

`python -m bench.pipeline --n {doc['n']} --concurrency {doc['concurrency']} --repeat \
{len(doc['runs'])}` — {doc['when']}. {machine}

Each run: a fresh `proca-sync pipeline serve` (SQLite state, rate limit off, one process),
{doc['n']:,} `POST /api/actions` from {doc['concurrency']} concurrent clients; the time
runs from the first request until all deliver messages are in `cus.N.deliver` (stored,
outboxed, published with publisher confirms). Baseline in the same run: `GET /health`,
same process, same client and concurrency (the HTTP stack's ceiling here).

| run | end to end (actions/s) | HTTP answers (actions/s) | `GET /health` (req/s) | ÷ health \
| actions per server CPU-second | load average |
|---|---:|---:|---:|---:|---:|---:|
{rows}

Best end-to-end rate **{best['end_to_end_rps']:,.0f} actions/s** — target ≥ 500/s
**{verdict}** on this machine as it was during the run. What bounds it: one Python
process parses HTTP, validates, runs about eight SQL statements per action in shared
transactions (group commit) and publishes with confirms; it got only a share of a core
(load average in the table, 2 cores). The load-independent figure is the server's own
CPU time: {best['actions_per_server_cpu_s']:,.0f} actions per CPU-second of the
`pipeline serve` process (intake through publishing), i.e. that rate with one core to
itself — whether ≥ 500/s holds end to end then depends on the client and the broker
having the other core. Not measured here: a quiet machine.
"""


def splice(path: Path, section: str) -> None:
    """Put ``section`` into BENCHMARKS.md in place of an older one (else before "## Method").

    ``bench/report.py`` includes ``bench/results/pipeline.md`` the same way when it
    regenerates the file, so the two stay in step.
    """
    text = path.read_text()
    heading = section.splitlines()[0]
    if heading in text:
        start = text.index(heading)
        end = text.find("\n## ", start + len(heading))
        text = text[:start] + section.rstrip() + "\n" + (text[end:] if end != -1 else "")
    else:
        marker = "## Method"
        at = text.index(marker) if marker in text else len(text)
        text = text[:at] + section.rstrip() + "\n\n" + text[at:]
    path.write_text(text)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.pipeline")
    parser.add_argument("--n", type=int, default=5000)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--amqp-url", default="amqp://guest:guest@127.0.0.1:5672/")
    parser.add_argument("--no-report", action="store_true", help="Do not touch BENCHMARKS.md.")
    args = parser.parse_args(argv)
    runs = []
    with tempfile.TemporaryDirectory() as tmp:
        for _ in range(args.repeat):
            run = asyncio.run(one_run(args.amqp_url, args.n, args.concurrency, Path(tmp)))
            print(orjson.dumps(run).decode())
            runs.append(run)
    doc = {
        "when": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "n": args.n,
        "concurrency": args.concurrency,
        "runs": runs,
        "best": max(runs, key=lambda r: r["end_to_end_rps"]),
    }
    if not args.no_report:
        RESULTS.mkdir(parents=True, exist_ok=True)
        (RESULTS / "pipeline.json").write_bytes(orjson.dumps(doc, option=orjson.OPT_INDENT_2))
        section = markdown(doc)
        (RESULTS / "pipeline.md").write_text(section)
        splice(ROOT / "BENCHMARKS.md", section)
    return 0


if __name__ == "__main__":
    sys.exit(main())
