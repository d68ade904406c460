"""``proca-sync demo`` end to end on the local broker, as the README runs it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import FIXTURES, require_service

pytestmark = [pytest.mark.rabbitmq, pytest.mark.slow]


def run(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PROCA_")}
    return subprocess.run(
        [sys.executable, "-m", "proca_sync", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )


def test_demo_syncs_and_summarises(tmp_path: Path) -> None:
    require_service("RabbitMQ", "127.0.0.1", 5672)
    org = str(900000 + os.getpid() % 90000)
    result = run("demo", "--org", org, "--actions", "400", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    for label in (
        "contacts",
        "subscribed",
        "bounced or blocked",
        "parked: decrypt_failed",
        "parked: unknown_key",
        "save_the_bees / register",
    ):
        assert label in result.stdout
    assert oct((tmp_path / "proca-demo-keys.json").stat().st_mode & 0o777) == "0o600"
    export = json.loads(run("crm", "export", cwd=tmp_path).stdout)
    assert len(export["contacts"]) > 50
    assert any(c["emailStatus"] == "double_opt_in" for c in export["contacts"])
    # Run again: the demo resets its own CRM and gives the same picture.
    again = run("demo", "--org", org, "--actions", "400", cwd=tmp_path)
    assert again.returncode == 0, again.stderr[-2000:]
    assert len(json.loads(run("crm", "export", cwd=tmp_path).stdout)["contacts"]) == len(
        export["contacts"]
    )


def test_demo_never_touches_a_real_crm(tmp_path: Path) -> None:
    require_service("RabbitMQ", "127.0.0.1", 5672)
    files = [str(p) for p in sorted(FIXTURES.glob("*.json"))]
    assert run("replay", *files, cwd=tmp_path).returncode == 0
    before = (tmp_path / "proca-crm.db").read_bytes()
    result = run("demo", "--actions", "10", cwd=tmp_path)
    assert result.returncode == 2
    assert "did not create" in result.stderr
    assert (tmp_path / "proca-crm.db").read_bytes() == before


def test_demo_says_what_is_missing_without_a_broker(tmp_path: Path) -> None:
    result = run("demo", "--url", "amqp://guest:guest@127.0.0.1:1/", cwd=tmp_path)
    assert result.returncode == 1
    assert "no RabbitMQ answers" in result.stderr and "scripts/services.sh" in result.stderr
