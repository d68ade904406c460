"""The reliability suite's quick mode (``python -m reliability --quick``) passes.

It drives the real consumer through crashes, broker restarts, a cutting proxy, a
PostgreSQL outage, a failing HTTP CRM, poison at volume and the privacy checks, and
exits non-zero when anything is lost, applied twice, wrongly parked or leaked. The
whole run must fit the CI budget of 5 minutes.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import require_service
from tests.integration.conftest import require_rabbitmqctl

pytestmark = [pytest.mark.rabbitmq, pytest.mark.postgres, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[2]
BUDGET = 300  # seconds: the CI budget of the quick mode


def require_postgres_binaries() -> None:
    if any(Path("/usr/lib/postgresql").glob("*/bin/initdb")) or os.environ.get("PG_BIN"):
        return
    if os.environ.get("CI"):
        pytest.fail("PostgreSQL server binaries (initdb, pg_ctl) are missing")
    pytest.skip("PostgreSQL server binaries (initdb, pg_ctl) are missing")


def test_quick_mode_loses_nothing_and_leaks_nothing(tmp_path: Path) -> None:
    require_service("RabbitMQ", "127.0.0.1", 5672)
    require_rabbitmqctl()
    require_postgres_binaries()
    if shutil.which("openssl") is None:
        pytest.fail("openssl is needed for the amqps checks")
    report = tmp_path / "RELIABILITY.md"
    env = {k: v for k, v in os.environ.items() if not k.startswith("PROCA_")}
    proc = subprocess.Popen(
        [sys.executable, "-m", "reliability", "--quick", "--report", str(report)],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        stdout, stderr = proc.communicate(timeout=BUDGET)
    except subprocess.TimeoutExpired:
        # SIGINT first: the scenarios' cleanup (broker restarted, PostgreSQL stopped,
        # orgs deleted) runs on KeyboardInterrupt; SIGKILL only if that hangs.
        proc.send_signal(signal.SIGINT)
        try:
            stdout, stderr = proc.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            stdout, stderr = proc.communicate()
        pytest.fail(f"the quick mode took longer than {BUDGET} s:\n{stdout[-3000:]}")
    finally:
        # Whatever happened, leave the broker running for the tests that follow.
        subprocess.run(["rabbitmqctl", "start_app"], capture_output=True, timeout=120, check=False)
    result = subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)
    assert result.returncode == 0, f"{result.stdout[-6000:]}\n{result.stderr[-3000:]}"
    text = report.read_text()
    assert "all passed" in text
    for name in ("crash", "broker-restart", "network", "postgres-outage", "http-crm", "poison",
                 "privacy"):
        assert f"| {name} |" in text


def test_untrusted_certificate_is_reported_as_a_tls_failure(tmp_path: Path) -> None:
    """The client refused the server's certificate; the message must not blame the broker."""
    require_service("RabbitMQ", "127.0.0.1", 5672)
    require_rabbitmqctl()
    from reliability.tls import RabbitTlsListener, make_certificates

    certificates = make_certificates()
    listener = RabbitTlsListener(certificates)
    listener.start()
    try:
        env = {k: v for k, v in os.environ.items() if not k.startswith("PROCA_")}
        env.update(PROCA_USERNAME="guest", PROCA_PASSWORD="guest")
        result = subprocess.run(
            [sys.executable, "-m", "proca_sync", "run", "--queue", "cus.1.deliver",
             "--url", f"amqps://127.0.0.1:{listener.port}/",
             "--crm", f"sqlite:///{tmp_path / 'crm.db'}",
             "--parked", f"sqlite:///{tmp_path / 'parked.db'}"],
            cwd=ROOT, env=env, capture_output=True, text=True, timeout=60, check=False,
        )  # fmt: skip
    finally:
        listener.stop()
        shutil.rmtree(certificates.directory, ignore_errors=True)
    assert result.returncode == 2
    assert "certificate verify failed" in result.stderr
    assert "TLS with" in result.stderr, result.stderr
    assert "refused the connection" not in result.stderr
