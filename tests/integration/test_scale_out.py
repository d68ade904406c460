"""Several consumer processes on one queue into one CRM (``python -m reliability --quick
--only scale-postgres scale-sqlite``): three processes into PostgreSQL (CRM and parking
store in one database) with seeded random SIGKILLs of one of them, and two processes
into SQLite, each ending in the state ``replay`` gives — nothing lost, nothing applied
twice, nothing wrongly parked, no error logged, no personal data in any output."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import require_service
from tests.integration.test_reliability_quick import require_postgres_binaries

pytestmark = [pytest.mark.rabbitmq, pytest.mark.postgres, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[2]
BUDGET = 240


def test_concurrent_consumers_reach_the_replay_state(tmp_path: Path) -> None:
    require_service("RabbitMQ", "127.0.0.1", 5672)
    require_postgres_binaries()
    report = tmp_path / "report.md"
    env = {k: v for k, v in os.environ.items() if not k.startswith("PROCA_")}
    result = subprocess.run(
        [sys.executable, "-m", "reliability", "--quick", "--only", "scale-postgres",
         "scale-sqlite", "--report", str(report)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=BUDGET, check=False,
    )  # fmt: skip
    assert result.returncode == 0, f"{result.stdout[-6000:]}\n{result.stderr[-3000:]}"
    text = report.read_text()
    for name in ("scale-postgres", "scale-sqlite"):
        assert f"| {name} |" in text
