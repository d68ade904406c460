"""The configuration file and the destinations' commands: file keys as option defaults
(the command line wins), secrets refused, ``config check`` exit codes, ``push`` exit
codes, ``destinations status`` without personal data, erasure keys created 0600."""

from __future__ import annotations

import stat
from pathlib import Path

import orjson
import pytest
from typer.testing import CliRunner

from proca_sync.cli import app
from tests.conftest import FIXTURES

runner = CliRunner()


@pytest.fixture
def workdir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.chdir(tmp_path)
    return tmp_path


def _replay(url: str) -> None:
    paths = [str(p) for p in sorted(FIXTURES.glob("*.json"))]
    result = runner.invoke(app, ["replay", *paths, "--crm", url])
    assert result.exit_code == 0, result.output


def test_file_keys_are_defaults_and_the_command_line_wins(workdir: Path) -> None:
    (workdir / "proca-sync.toml").write_text(
        'crm = "sqlite:///from-file.db"\n[destinations.out]\ntype = "jsonl"\npath = "out"\n'
    )
    _replay("sqlite:///from-file.db")
    _replay("sqlite:///from-cli.db")
    pushed = runner.invoke(app, ["push", "out"])  # ./proca-sync.toml, its crm
    assert pushed.exit_code == 0, pushed.output
    status = runner.invoke(app, ["destinations", "status", "--json"])
    assert orjson.loads(status.stdout)[0]["pending"] == 0
    other = runner.invoke(
        app, ["destinations", "status", "--json", "--crm", "sqlite:///from-cli.db"]
    )
    assert orjson.loads(other.stdout)[0]["pending"] > 0  # the option won: not pushed there
    assert "@" not in status.stdout + other.stdout
    contacts = (workdir / "out" / "contacts.jsonl")
    assert stat.S_IMODE(contacts.stat().st_mode) == 0o600


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        ('[destinations.x]\ntype = "jsonl"\npath = "o"\napi_key = "s3cret"\n', "secrets"),
        ('password = "s3cret"\n', "secrets"),
        ("not toml [", "TOML"),
        ('bogus_option = 1\n', "unknown option"),
    ],
    ids=["api-key-in-table", "password", "invalid", "unknown-run-option"],
)
def test_a_bad_file_refuses_to_start(workdir: Path, text: str, needle: str) -> None:
    path = workdir / "bad.toml"
    path.write_text(text)
    result = runner.invoke(app, ["run", "--queue", "q", "--config", str(path)])
    assert result.exit_code == 2
    assert needle in result.output
    assert "s3cret" not in result.output


def test_config_check_exit_codes(workdir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    good = workdir / "good.toml"
    good.write_text('[destinations.out]\ntype = "jsonl"\npath = "out"\n')
    assert runner.invoke(app, ["config", "check", "--config", str(good)]).exit_code == 0
    unknown = workdir / "unknown.toml"
    unknown.write_text('[destinations.x]\ntype = "nosuch"\n')
    result = runner.invoke(app, ["config", "check", "--config", str(unknown)])
    assert result.exit_code == 2 and "unknown destination type" in result.output
    down = workdir / "down.toml"
    down.write_text(
        '[destinations.toy]\ntype = "tests.support.emulators.toy:ToyDestination"\n'
        'base_url = "http://127.0.0.1:9"\napi_key_env = "TOY_CHECK_KEY"\ntimeout = 1.0\n'
    )
    monkeypatch.setenv("TOY_CHECK_KEY", "k")
    result = runner.invoke(app, ["config", "check", "--config", str(down)])
    assert result.exit_code == 1, result.output
    monkeypatch.delenv("TOY_CHECK_KEY")
    missing = runner.invoke(app, ["config", "check", "--config", str(down)])
    assert missing.exit_code == 2  # the key's variable is not set


def test_push_of_an_undefined_destination_is_a_config_error(workdir: Path) -> None:
    result = runner.invoke(app, ["push", "nowhere", "--crm", "sqlite:///x.db"])
    assert result.exit_code == 2
    assert "not defined" in result.output


def test_forget_creates_the_erasure_key_0600_and_prints_no_address(workdir: Path) -> None:
    _replay("sqlite:///crm.db")
    forget = ["crm", "forget", "test@example.org", "--crm", "sqlite:///crm.db"]
    result = runner.invoke(app, forget)
    assert result.exit_code == 0, result.output
    assert "example.org" not in result.output
    key = workdir / "proca-erasure.key"
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    again = runner.invoke(app, forget)
    assert again.exit_code == 1
    # Without the key, writing into a CRM with erased people is refused (exit, not resurrection).
    key.rename(workdir / "elsewhere.key")
    paths = [str(p) for p in sorted(FIXTURES.glob("*.json"))]
    refused = runner.invoke(app, ["replay", *paths, "--crm", "sqlite:///crm.db"])
    assert refused.exit_code != 0
    assert "erasure key" in refused.output


def test_a_running_writer_picks_up_the_key_the_first_forget_creates(workdir: Path) -> None:
    import asyncio

    from proca_sync.crm.sql import SqlBackend
    from proca_sync.engine import Engine
    from tests.support.builders import action, dumps

    _replay("sqlite:///crm.db")
    key = workdir / "proca-erasure.key"
    backend = SqlBackend("sqlite:///crm.db")
    backend.watch_erasure_key(key)  # what `run` does: no key file yet
    backend.open_sync()
    assert not key.exists()
    forget = ["crm", "forget", "test@example.org", "--crm", "sqlite:///crm.db"]
    assert runner.invoke(app, forget).exit_code == 0
    older = action(
        9_200_001, ref="Z" * 43, email="test@example.org", created="2019-05-01T10:00:00Z"
    )

    async def go() -> None:
        try:  # no open(): the key must be picked up by the batch itself
            summary = await Engine(backend=backend).run([dumps(older)])
            assert not summary.rejected
        finally:
            await backend.close()

    asyncio.run(go())
    with SqlBackend("sqlite:///crm.db") as reader:
        emails = {e for c in reader.export()["contacts"] for e in c["emails"]}
    assert "test@example.org" not in emails
