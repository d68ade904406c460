"""The benchmark harness still runs: ``python -m bench.run --quick`` end to end.

Not a performance test (no rate is compared with anything): it fails when a case
crashes, when the harness stops producing its JSON, or when a case reports no rate. The
Node cases run when ``bench/node_modules`` is installed (``npm ci --prefix bench``).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from urllib.parse import urlsplit

import orjson
import pytest

from tests.conftest import PG_DB, PG_HOST, PG_PORT, require_service
from tests.integration.conftest import AMQP_URL

pytestmark = [pytest.mark.slow, pytest.mark.rabbitmq, pytest.mark.postgres]

ROOT = Path(__file__).resolve().parents[2]
NODE_CASES = {"node-raw", "peer-clear", "peer-encrypted"}
QUICK_CASES = {
    "aiormq",
    "aio-pika",
    *NODE_CASES,
    "proca-null",
    "proca-sqlite",
    "proca-postgres",
    "proca-sqlite-w2",  # the supervisor's path; the 3-worker cases run in full mode only
    "proca-postgres-w2",
    "slow-crm",
}


def test_quick_run_reports_every_case(tmp_path: Path) -> None:
    parts = urlsplit(AMQP_URL)
    require_service("RabbitMQ", parts.hostname or "127.0.0.1", parts.port or 5672)
    require_service("PostgreSQL", PG_HOST, PG_PORT)
    node = (ROOT / "bench" / "node_modules" / "@proca" / "queue").is_dir()
    command = [
        sys.executable, "-m", "bench.run", "--quick", "--out", str(tmp_path),
        "--amqp-url", AMQP_URL,
        "--pg-url", f"postgresql://postgres@{PG_HOST}:{PG_PORT}/{PG_DB}",
    ]  # fmt: skip
    if not node:
        command.append("--no-node")
    done = subprocess.run(
        command,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "PGPASSWORD": os.environ.get("PGPASSWORD", "postgres")},
        check=False,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]

    results = orjson.loads((tmp_path / "latest.json").read_bytes())
    cases = results["cases"]
    assert set(cases) == QUICK_CASES
    expected_to_run = QUICK_CASES if node else QUICK_CASES - NODE_CASES
    for name in expected_to_run:
        assert cases[name]["status"] == "ok", (name, cases[name])
        assert cases[name]["rate"] > 0, name
    for name in QUICK_CASES - expected_to_run:
        assert cases[name]["status"] == "skipped", name
    assert [p["concurrency"] for p in cases["slow-crm"]["points"]] == [1, 16]
    assert all(p["ordered"] for p in cases["slow-crm"]["points"])
    assert results["machine"]["nproc"] >= 1
    assert {t["name"] for t in results["targets"]} >= {"clear-null-vs-peer", "postgres-vs-sqlite"}
    assert (tmp_path / "BENCHMARKS.md").read_text().startswith("# Benchmarks")
