"""What a new user meets in the first hour (issue 10): files holding personal data or keys
are 0600, mistyped locations are configuration errors (exit 2) that show the right form,
read-only commands create nothing, the help and the exit codes say what the README says,
and the webhook CRM is configurable without putting a secret on the command line."""

from __future__ import annotations

import contextlib
import os
import re
import stat
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import typer
from typer.testing import CliRunner

from proca_sync.cli import app
from proca_sync.consumer.parking import ParkingStore, ParkItem
from proca_sync.crm.sql import SqlBackend
from proca_sync.crypto import KeyPair, Keystore
from proca_sync.pipeline.demo import DemoPlan, prepare_files
from tests.conftest import FIXTURES, PG_DB, PG_HOST, PG_PORT, require_service
from tests.support.crm_server import CrmServer

FIXTURE = str(FIXTURES / "petition_optout.json")


@pytest.fixture(autouse=True)
def _restore_logging() -> Iterator[None]:
    """In-process commands point the proca_sync logger at the runner's captured stream."""
    import logging

    logger = logging.getLogger("proca_sync")
    handlers, level, propagate = list(logger.handlers), logger.level, logger.propagate
    yield
    logger.handlers[:] = handlers
    logger.setLevel(level)
    logger.propagate = propagate


def invoke(*args: str, env: dict[str, str] | None = None) -> Any:
    """The command in this process (fast); output holds stdout and stderr."""
    return CliRunner().invoke(app, list(args), env=env)


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@contextlib.contextmanager
def umask(value: int) -> Iterator[None]:
    old = os.umask(value)
    try:
        yield
    finally:
        os.umask(old)


def one_line(text: str) -> str:
    """Help text with its wrapping undone, to search for phrases."""
    return re.sub(r"\s+", " ", text)


# ---- 1. files holding personal data or keys are 0600 --------------------------------------


def test_crm_and_parking_store_files_are_0600_whatever_the_umask(tmp_path: Path) -> None:
    crm_path, parked_path = tmp_path / "crm.db", tmp_path / "parked.db"
    with umask(0o002):
        crm = SqlBackend(f"sqlite:///{crm_path}")
        parking = ParkingStore(f"sqlite:///{parked_path}")
        try:
            crm.open_sync()
            parking.park_sync(
                [ParkItem(body=b"{}", queue="q", exchange="", routing_key="q", headers=None,
                          reason="invalid_json", detail="", attempts=0)]
            )  # fmt: skip
            # While connections are open, SQLite's -wal and -shm files exist too.
            for path in (crm_path, parked_path):
                for suffix in ("", "-wal", "-shm"):
                    store_file = Path(f"{path}{suffix}")
                    assert store_file.exists(), store_file
                    assert mode(store_file) == 0o600, f"{store_file}: {mode(store_file):o}"
        finally:
            crm.close_sync()
            parking.engine.dispose()


def test_demo_key_store_and_crm_are_0600(tmp_path: Path) -> None:
    plan = DemoPlan(
        url="amqp://127.0.0.1/",
        crm=f"sqlite:///{tmp_path / 'demo.db'}",
        keys=tmp_path / "demo-keys.json",
        parked=f"sqlite:///{tmp_path / 'demo-parked.db'}",
    )
    with umask(0o000):
        prepare_files(plan)
    assert mode(tmp_path / "demo-keys.json") == 0o600
    assert mode(tmp_path / "demo.db") == 0o600


def test_demo_key_store_is_git_ignored() -> None:
    ignored = (Path(__file__).resolve().parents[2] / ".gitignore").read_text().split()
    assert "proca-demo-keys.json" in ignored and "*.db" in ignored


@pytest.mark.rabbitmq
async def test_dump_files_are_0600(consumer_org: object, tmp_path: Path) -> None:
    from tests.integration.conftest import ConsumerOrg, split_credentials

    assert isinstance(consumer_org, ConsumerOrg)
    await consumer_org.publish([b'{"a": 1}', b'{\n  "pretty": true\n}'])
    url, credentials = split_credentials(consumer_org.url)
    out_dir = tmp_path / "dumped"
    with umask(0o022):
        result = cli_env(
            credentials, "dump", "--queue", consumer_org.queue, "--url", url, "--out", str(out_dir)
        )
    assert result.returncode == 0, result.stderr
    files = sorted(out_dir.iterdir())
    assert len(files) == 2  # one .jsonl, one .json for the multi-line body
    for path in files:
        assert mode(path) == 0o600, f"{path.name}: {mode(path):o}"


def cli_env(env: dict[str, str], *args: str, cwd: Path | None = None) -> object:
    """``cli`` with extra variables (the PROCA_* ones of the caller are dropped)."""
    import subprocess
    import sys

    base = {k: v for k, v in os.environ.items() if not k.startswith("PROCA_")}
    return subprocess.run(
        [sys.executable, "-m", "proca_sync", *args], capture_output=True, text=True,
        cwd=cwd, env={**base, **env}, timeout=120, check=False,
    )  # fmt: skip


def readable_keys(tmp_path: Path) -> Path:
    path = tmp_path / "keys.json"
    Keystore([KeyPair.generate()]).save(path)
    path.chmod(0o644)
    return path


def test_replay_warns_once_when_the_key_store_is_readable(tmp_path: Path) -> None:
    keys = readable_keys(tmp_path)
    result = invoke("replay", FIXTURE, "--keys", str(keys), "--crm", f"sqlite:///{tmp_path / 'c.db'}")
    assert result.exit_code == 0, result.output
    assert result.output.count("readable by others") == 1, result.output


# ---- 2. a mistyped CRM location is a configuration error ----------------------------------


@pytest.mark.parametrize(
    ("command", "location", "expected"),
    [
        pytest.param(["replay", FIXTURE], "crm.db", "sqlite:///crm.db", id="replay-bare-path"),
        pytest.param(["crm", "contacts"], "crm.db", "sqlite:///crm.db", id="contacts-bare-path"),
        pytest.param(
            ["replay", FIXTURE], "sqlite:///{tmp}/missing/crm.db", "does not exist",
            id="replay-missing-folder",
        ),
        pytest.param(
            ["run", "--queue", "cus.1.deliver", "--url", "amqp://127.0.0.1:1/"],
            "sqlite:///{tmp}/missing/crm.db", "does not exist", id="run-missing-folder",
        ),
        pytest.param(
            ["run", "--queue", "cus.1.deliver", "--url", "amqp://127.0.0.1:1/"], "crm.db",
            "sqlite:///crm.db", id="run-bare-path",
        ),
    ],
)  # fmt: skip
def test_mistyped_crm_location_exits_2_showing_the_right_form(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    command: list[str],
    location: str,
    expected: str,
) -> None:
    monkeypatch.chdir(tmp_path)
    result = invoke(*command, "--crm", location.format(tmp=tmp_path))
    assert result.exit_code == 2, result.output
    text = one_line(result.output)
    assert expected in text
    assert "sqlite:///" in text  # the right form is shown
    assert list(tmp_path.iterdir()) == [], "nothing may be created"


@pytest.mark.postgres
def test_missing_postgres_database_exits_2_and_a_down_one_stays_transient(
    tmp_path: Path,
) -> None:
    require_service("PostgreSQL", PG_HOST, PG_PORT)
    missing = invoke(
        "replay", FIXTURE, "--crm", f"postgresql://postgres@{PG_HOST}:{PG_PORT}/no_such_db_i10"
    )
    assert missing.exit_code == 2, missing.output
    text = one_line(missing.output)
    assert "does not exist" in text and "postgresql://" in text
    contacts = invoke(
        "crm", "contacts", "--crm", f"postgresql://postgres@{PG_HOST}:{PG_PORT}/nodb_i10"
    )
    assert contacts.exit_code == 2, contacts.output
    # A server that is down (nothing listens) is an outage: exit 1, as before.
    down = invoke("replay", FIXTURE, "--crm", f"postgresql://postgres@{PG_HOST}:1/{PG_DB}")
    assert down.exit_code == 1, down.output
    assert "unavailable" in down.output


# ---- 3. read-only commands create nothing; run connects first ------------------------------


@pytest.mark.parametrize(
    ("command", "option"),
    [
        pytest.param(["crm", "contacts"], "--crm", id="crm-contacts"),
        pytest.param(["crm", "show", "someone@example.org"], "--crm", id="crm-show"),
        pytest.param(["crm", "export"], "--crm", id="crm-export"),
        pytest.param(["parked", "list"], "--parked", id="parked-list"),
        pytest.param(["parked", "show", "1"], "--parked", id="parked-show"),
    ],
)
def test_read_only_commands_on_a_missing_file_say_so_and_create_nothing(
    tmp_path: Path, command: list[str], option: str
) -> None:
    target = tmp_path / "absent.db"
    result = CliRunner().invoke(app, [*command, option, f"sqlite:///{target}"])
    assert result.exit_code == 2, result.output
    assert "does not exist" in one_line(result.output)
    assert list(tmp_path.iterdir()) == []


def test_run_reaches_the_broker_before_creating_any_file(tmp_path: Path) -> None:
    keys = readable_keys(tmp_path)
    result = invoke(
        "run", "--queue", "cus.1.deliver", "--url", "amqp://127.0.0.1:1/", "--keys", str(keys),
        "--crm", f"sqlite:///{tmp_path / 'crm.db'}", "--parked", f"sqlite:///{tmp_path / 'p.db'}",
    )  # fmt: skip
    # 4. an unreachable broker is an outage: exit 1, as the README says.
    assert result.exit_code == 1, result.output
    assert "unreachable" in result.output
    assert result.output.count("readable by others") == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["keys.json"]


# ---- 4. no password on the command line ---------------------------------------------------


def test_password_in_url_on_the_command_line_is_refused_with_a_hint(tmp_path: Path) -> None:
    secret = "s3cretPW"
    for command in (["run"], ["queue", "status"], ["peek"], ["dump", "--out", str(tmp_path)]):
        result = CliRunner().invoke(
            app, [*command, "--queue", "q", "--url", f"amqp://guest:{secret}@127.0.0.1:1/"]
        )
        assert result.exit_code == 2, result.output
        text = one_line(result.output)
        assert "PROCA_PASSWORD" in text and "--env-file" in text
        assert secret not in result.output
    # The same URL from the environment (or an env file) is not on argv: accepted, and
    # the unreachable broker is then exit 1 without the password in the message.
    from_env = invoke("peek", "--queue", "q", env={"PROCA_URL": f"amqp://guest:{secret}@127.0.0.1:1/"})
    assert from_env.exit_code == 1, from_env.output
    assert secret not in from_env.output


# ---- 9. the help says what the tool does ---------------------------------------------------


def all_commands() -> Iterator[tuple[str, object]]:
    def walk(command: object, path: str) -> Iterator[tuple[str, object]]:
        children = getattr(command, "commands", None)
        if children:
            for name, child in children.items():
                yield from walk(child, f"{path} {name}".strip())
        else:
            yield path, command

    yield from walk(typer.main.get_command(app), "")


def help_of(*words: str) -> str:
    result = CliRunner().invoke(app, [*words, "--help"], env={"COLUMNS": "80"})
    assert result.exit_code == 0, result.output
    return result.output


def test_help_shows_flags_as_flags_and_fits_80_columns() -> None:
    for path, _command in all_commands():
        text = help_of(*path.split())
        assert "<bool>" not in text, path
        assert max(len(line) for line in text.splitlines()) <= 80, path
    root = help_of()
    assert re.search(r"^\s+--help\s+Show this message", root, re.M)
    declare = help_of("topology", "declare")
    for flag in ("--custom-supporter-confirm", "--no-custom-action-deliver", "--email-backend"):
        assert flag in declare  # whole, not cut with an ellipsis


def test_version_and_log_levels() -> None:
    result = CliRunner().invoke(app, ["--version"])
    assert result.exit_code == 0
    assert re.fullmatch(r"proca-sync \d+\.\d+\.\d+\S*\n", result.output)
    text = one_line(help_of("run"))
    assert re.search(r"--log-level [\[<]?DEBUG\|INFO\|WARNING\|ERROR", text, re.I), text


@pytest.mark.parametrize(
    ("words", "schemes"),
    [
        pytest.param(("run",), ("sqlite:///", "postgresql://", "http(s)://", "null:"), id="run"),
        pytest.param(
            ("replay",), ("sqlite:///", "postgresql://", "http(s)://", "null:"), id="replay"
        ),
        pytest.param(
            ("parked", "retry"), ("sqlite:///", "postgresql://", "http(s)://", "null:"),
            id="parked-retry",
        ),
        pytest.param(("crm", "contacts"), ("sqlite:///", "postgresql://"), id="crm-contacts"),
        pytest.param(("crm", "show"), ("sqlite:///", "postgresql://"), id="crm-show"),
        pytest.param(("crm", "export"), ("sqlite:///", "postgresql://"), id="crm-export"),
        pytest.param(("demo",), ("sqlite:///",), id="demo"),
    ],
)  # fmt: skip
def test_every_crm_help_lists_the_schemes_it_accepts(
    words: tuple[str, ...], schemes: tuple[str, ...]
) -> None:
    text = one_line(help_of(*words))
    crm_help = text[text.index("--crm") :]
    for scheme in schemes:
        assert scheme in crm_help, (words, scheme)


def test_every_command_taking_crm_or_keys_takes_env_file() -> None:
    checked = 0
    for path, command in all_commands():
        names = {opt for param in command.params for opt in param.opts}  # type: ignore[attr-defined]
        if names & {"--crm", "--keys"}:
            checked += 1
            assert "--env-file" in names, path
    assert checked >= 7


def test_replay_of_nothing_warns(tmp_path: Path) -> None:
    empty_dir = tmp_path / "empty"
    empty_dir.mkdir()
    empty_file = tmp_path / "empty.jsonl"
    empty_file.write_bytes(b"\n")
    crm = f"sqlite:///{tmp_path / 'crm.db'}"
    for target, warning in ((empty_dir, "no .json"), (empty_file, "no message found")):
        result = CliRunner().invoke(app, ["replay", str(target), "--crm", crm])
        assert result.exit_code == 0, result.output
        assert warning in one_line(result.output), result.output


# ---- 10. the webhook CRM from the CLI and an env file --------------------------------------


def test_webhook_secret_headers_and_timeout_from_an_env_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    secret = "hmac-secret-i10"
    env_file = tmp_path / "proca.env"
    env_file.write_text(
        f"PROCA_WEBHOOK_SECRET={secret}\n"
        "PROCA_WEBHOOK_HEADERS='Authorization: Bearer tok-i10\nX-Tenant: 7'\n"
        "PROCA_WEBHOOK_TIMEOUT=3\n"
    )
    env_file.chmod(0o600)
    # --env-file loads into this process's environment: undo it when the test ends.
    for name in ("PROCA_WEBHOOK_SECRET", "PROCA_WEBHOOK_HEADERS", "PROCA_WEBHOOK_TIMEOUT"):
        monkeypatch.setenv(name, "")
        monkeypatch.delenv(name)
    with CrmServer(secret=secret) as crm:
        result = invoke("replay", FIXTURE, "--env-file", str(env_file), "--crm", crm.url)
        assert result.exit_code == 0, result.output
        received = crm.received()
    assert received and all(r.status == 200 for r in received)  # signature checked: 401 else
    assert received[0].headers["authorization"] == "Bearer tok-i10"
    assert received[0].headers["x-tenant"] == "7"
    assert "tok-i10" not in result.output
    assert secret not in result.output


def test_webhook_secret_file_and_a_bad_headers_file(tmp_path: Path) -> None:
    secret = "file-secret-i10"
    (tmp_path / "secret").write_text(secret + "\n")
    (tmp_path / "headers").write_text("Authorization Bearer missing-colon\n")
    with CrmServer(secret=secret) as crm:
        good = CliRunner().invoke(
            app,
            ["replay", FIXTURE, "--crm", crm.url, "--webhook-secret-file", str(tmp_path / "secret"),
             "--webhook-timeout", "2"],
        )  # fmt: skip
        assert good.exit_code == 0, good.output
        assert all(r.status == 200 for r in crm.received())
        bad = CliRunner().invoke(
            app,
            ["replay", FIXTURE, "--crm", crm.url,
             "--webhook-headers-file", str(tmp_path / "headers")],
        )  # fmt: skip
    assert bad.exit_code == 2
    assert "line 1" in bad.output and "missing-colon" not in bad.output


# ---- 7. tables fit 80 columns; contacts can be searched and exported ----------------------


def test_contacts_fit_80_columns_and_filter(tmp_path: Path) -> None:
    import csv
    import io
    import json

    crm = f"sqlite:///{tmp_path / 'crm.db'}"
    files = [str(p) for p in sorted(FIXTURES.glob("*.json"))]
    assert invoke("replay", *files, "--crm", crm).exit_code in (0, 1)
    contacts = json.loads(invoke("crm", "contacts", "--crm", crm, "--format", "json").output)
    assert contacts
    table = CliRunner().invoke(app, ["crm", "contacts", "--crm", crm], env={"COLUMNS": "80"})
    assert table.exit_code == 0, table.output
    assert max(len(line) for line in table.output.splitlines()) <= 80
    for contact in contacts:
        assert contact["email"] in table.output  # whole, on one line: never cut
    subscribed = [c for c in contacts if c["subscribed"]]
    only = json.loads(
        invoke("crm", "contacts", "--crm", crm, "--subscribed", "--format", "json").output
    )
    assert [c["email"] for c in only] == [c["email"] for c in subscribed]
    unsub = invoke("crm", "contacts", "--crm", crm, "--unsubscribed", "--format", "csv").output
    rows = list(csv.DictReader(io.StringIO(unsub)))
    assert len(rows) == len(contacts) - len(subscribed)
    wanted = contacts[0]["email"]
    found = json.loads(
        invoke("crm", "contacts", "--crm", crm, "--search", wanted.upper(), "--format", "json").output
    )
    assert [c["email"] for c in found] == [wanted]


@pytest.mark.rabbitmq
@pytest.mark.postgres
async def test_run_with_a_missing_postgres_database_exits_2_creating_nothing(
    consumer_org: object, tmp_path: Path
) -> None:
    import asyncio

    from tests.integration.conftest import ConsumerOrg, split_credentials

    require_service("PostgreSQL", PG_HOST, PG_PORT)
    assert isinstance(consumer_org, ConsumerOrg)
    url, credentials = split_credentials(consumer_org.url)
    result = await asyncio.to_thread(
        cli_env, credentials, "run", "--url", url, "--queue", consumer_org.queue,
        "--crm", f"postgresql://postgres@{PG_HOST}:{PG_PORT}/no_such_db_i10",
        "--parked", f"sqlite:///{tmp_path / 'parked.db'}",
    )  # fmt: skip
    assert result.returncode == 2, result.stderr  # type: ignore[attr-defined]
    assert "does not exist" in result.stderr  # type: ignore[attr-defined]
    assert await asyncio.to_thread(os.listdir, tmp_path) == []


def test_an_unknown_event_loop_exits_2_before_connecting(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("PROCA_EVENT_LOOP", "trio")
    result = invoke("run", "--queue", "cus.1.deliver", "--url", "amqp://127.0.0.1:1/")
    assert result.exit_code == 2, result.output
    assert "PROCA_EVENT_LOOP must be auto, uvloop or asyncio" in one_line(result.output)
    assert list(tmp_path.iterdir()) == [], "nothing may be created"
