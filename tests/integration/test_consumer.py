"""`proca-sync run` against a real broker carrying a test org's Proca topology.

The end state of the CRM after consuming a stream must equal `proca-sync replay` of the
same messages; poison messages are parked with their reason, the rest is acked, and the
queue (with its fail queue) ends empty.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import orjson
import pytest

from proca_sync.consumer.parking import ParkingStore
from proca_sync.crypto import Keystore
from proca_sync.sync.model import body_digest
from tests.integration.conftest import (
    ROOT,
    ConsumerOrg,
    ConsumerProcess,
    Stream,
    classify,
    crm_export,
    mixed_stream,
    replay_export,
    split_credentials,
)

pytestmark = pytest.mark.rabbitmq


def cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    import os

    base = {k: v for k, v in os.environ.items() if not k.startswith("PROCA_")}
    return subprocess.run(
        [sys.executable, "-m", "proca_sync", *args],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env={**base, **(env or {})},
        timeout=120,
        check=False,
    )


def parked_reasons(url: str) -> dict[str, str]:
    store = ParkingStore(url)
    try:
        return {row.digest: row.reason for row in store.entries(limit=10_000)}
    finally:
        store.engine.dispose()


@pytest.mark.slow
async def test_stream_ends_like_replay(
    consumer_org: ConsumerOrg, consumer_processes: list[ConsumerProcess], tmp_path: Path
) -> None:
    stream = mixed_stream(contacts=30, per_contact=6, seed=1)
    assert len(stream.poison) == 6 and stream.ignored >= 2
    await consumer_org.publish(stream.bodies)
    keys = tmp_path / "keys.json"
    stream.keystore.save(keys)
    crm = f"sqlite:///{tmp_path / 'crm.db'}"
    parked = f"sqlite:///{tmp_path / 'parked.db'}"
    process = await ConsumerProcess(
        consumer_org, "--crm", crm, "--parked", parked, "--keys", str(keys),
        "--concurrency", "8", "--exit-when-idle", "--log-level", "DEBUG",
    ).start()
    consumer_processes.append(process)
    assert await process.wait(within=90) == 0, "\n".join(process.lines[-20:])

    assert crm_export(crm) == replay_export(stream, tmp_path)
    assert parked_reasons(parked) == stream.poison
    assert await consumer_org.depths() == [0, 0]
    (stopped,) = process.event("stopped")
    assert stopped["reason"] == "idle"
    assert stopped["acked"] == len(stream.bodies) - len(stream.poison)
    assert stopped["parked"] == len(stream.poison)
    # At DEBUG one JSON line per outcome, with ids and reason codes — never personal
    # data; a summary line (one a second) sums up the batches.
    batches = process.event("batches")
    # (Ignored messages and poison are settled on arrival, outside any batch.)
    assert sum(b["acked"] for b in batches) == stopped["acked"] - stream.ignored
    outcomes = process.event("message")
    assert len(outcomes) == len(stream.bodies)
    text = "\n".join(process.lines)
    assert "@example.org" not in text and "guest" not in text.replace("guest:***", "")
    for body_digest_, reason in stream.poison.items():
        assert any(e.get("digest") == body_digest_ and e["reason"] == reason for e in outcomes)


async def test_missing_queue_is_one_line_exit_2(consumer_org: ConsumerOrg, tmp_path: Path) -> None:
    url, credentials = split_credentials(consumer_org.url)
    result = cli(
        "run",
        "--url",
        url,
        "--queue",
        f"cus.{consumer_org.org + 1}.deliver",
        "--crm",
        f"sqlite:///{tmp_path / 'crm.db'}",
        "--parked",
        f"sqlite:///{tmp_path / 'p.db'}",
        env=credentials,
    )
    assert result.returncode == 2
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert "does not exist" in result.stderr


async def test_refused_credentials_are_one_line_exit_2(
    consumer_org: ConsumerOrg, tmp_path: Path
) -> None:
    url, _ = split_credentials(consumer_org.url)
    secret = "wrong-pa$$word"
    result = cli(
        "run",
        "--url",
        url,
        "--queue",
        consumer_org.queue,
        "--crm",
        f"sqlite:///{tmp_path / 'crm.db'}",
        "--parked",
        f"sqlite:///{tmp_path / 'p.db'}",
        env={"PROCA_USERNAME": "guest", "PROCA_PASSWORD": secret},
    )
    assert result.returncode == 2, result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert secret not in result.stderr and "pa%24%24word" not in result.stderr


async def test_env_file_supplies_the_connection(
    consumer_org: ConsumerOrg, consumer_processes: list[ConsumerProcess], tmp_path: Path
) -> None:
    url, credentials = split_credentials(consumer_org.url)
    env_file = tmp_path / ".env"
    env_file.write_text(
        f"PROCA_URL={url}\nPROCA_QUEUE={consumer_org.queue}\n"
        + "".join(f"{k}={v}\n" for k, v in credentials.items())
    )
    result = cli("queue", "status", "--env-file", str(env_file), "--json")
    assert result.returncode == 0, result.stderr
    rows = orjson.loads(result.stdout)
    assert [r["queue"] for r in rows] == [consumer_org.queue, consumer_org.fail]
    assert all(r["exists"] for r in rows)


@pytest.mark.slow
async def test_peek_returns_messages_untouched_and_dump_moves_them(
    consumer_org: ConsumerOrg, tmp_path: Path
) -> None:
    stream = mixed_stream(contacts=3, per_contact=2, seed=2)
    await consumer_org.publish(stream.bodies)
    url, credentials = split_credentials(consumer_org.url)
    base = ["--url", url, "--queue", consumer_org.queue]

    peeked = cli("peek", *base, "--count", "5", "--json", env=credentials)
    assert peeked.returncode == 0, peeked.stderr
    rows = [orjson.loads(line) for line in peeked.stdout.splitlines()]
    assert len(rows) == 5
    assert {"schema", "kind", "actionId", "actionType", "campaign", "encrypted"} <= set(rows[0])
    assert "@example.org" not in peeked.stdout
    assert await consumer_org.depths(consumer_org.queue) == [len(stream.bodies)]

    status = cli("queue", "status", *base, "--json", env=credentials)
    assert orjson.loads(status.stdout)[0]["messages"] == len(stream.bodies)

    out = tmp_path / "dump"
    dumped = cli("dump", *base, "--out", str(out), "--count", "7", env=credentials)
    assert dumped.returncode == 0, dumped.stderr
    assert await consumer_org.depths(consumer_org.queue) == [len(stream.bodies) - 7]
    dumped = cli("dump", *base, "--out", str(out), env=credentials)
    assert await consumer_org.depths(consumer_org.queue) == [0]

    # The files hold every body, bytes unchanged, and replay accepts them.
    from proca_sync.cli import read_bodies

    files = sorted(str(p) for p in out.iterdir())
    assert sorted(body_digest(b) for _, b in read_bodies(files)) == sorted(
        body_digest(b) for b in stream.bodies
    )
    crm = f"sqlite:///{tmp_path / 'from-dump.db'}"
    keys = tmp_path / "keys.json"
    stream.keystore.save(keys)
    replayed = cli("replay", str(out), "--crm", crm, "--keys", str(keys))
    assert replayed.returncode in (0, 1), replayed.stderr
    assert crm_export(crm) == replay_export(stream, tmp_path)


@pytest.mark.slow
async def test_parked_messages_can_be_shown_retried_and_dropped(
    consumer_org: ConsumerOrg, consumer_processes: list[ConsumerProcess], tmp_path: Path
) -> None:
    """Run without the key store: encrypted actions are parked (no key). `parked retry`
    with the keys syncs them and clears them from the store; real poison stays."""
    stream = mixed_stream(contacts=6, per_contact=1, seed=3)
    encrypted = [b for b in stream.bodies if b'"personalInfo":{' in b]
    assert encrypted
    await consumer_org.publish(stream.bodies)
    crm = f"sqlite:///{tmp_path / 'crm.db'}"
    parked = f"sqlite:///{tmp_path / 'parked.db'}"
    process = await ConsumerProcess(
        consumer_org, "--crm", crm, "--parked", parked, "--exit-when-idle"
    ).start()
    consumer_processes.append(process)
    assert await process.wait() == 0
    reasons = parked_reasons(parked)
    without_keys = classify(Stream(stream.bodies, Keystore())).poison
    assert reasons == without_keys
    assert sum(1 for r in reasons.values() if r == "no_keystore") == len(encrypted)

    listed = cli("parked", "list", "--parked", parked, "--json")
    rows = [orjson.loads(line) for line in listed.stdout.splitlines()]
    assert len(rows) == len(reasons)
    shown = cli("parked", "show", str(rows[0]["id"]), "--parked", parked)
    assert shown.returncode == 0 and "reason" in shown.stdout
    assert "@example.org" not in shown.stdout  # the body only with --body
    with_body = cli("parked", "show", str(rows[0]["id"]), "--parked", parked, "--body")
    assert with_body.returncode == 0

    keys = tmp_path / "keys.json"
    stream.keystore.save(keys)
    retried = cli("parked", "retry", "--all", "--parked", parked, "--crm", crm, "--keys", str(keys))
    assert retried.returncode == 1  # the real poison is still refused
    left = parked_reasons(parked)
    assert left == stream.poison
    assert crm_export(crm) == replay_export(stream, tmp_path)

    some_id = orjson.loads(
        cli("parked", "list", "--parked", parked, "--json").stdout.splitlines()[0]
    )["id"]
    assert cli("parked", "drop", str(some_id), "--parked", parked).returncode == 0
    assert len(parked_reasons(parked)) == len(stream.poison) - 1
    assert cli("parked", "drop", str(some_id), "--parked", parked).returncode == 1
