"""``proca-sync replay`` / ``crm`` / ``keys`` as a user runs them: a real process, a real
SQLite file, and a check that no personal data reaches the terminal or the logs."""

from __future__ import annotations

import json
import os
import re
import stat
import subprocess
import sys
from pathlib import Path
from typing import Any

import orjson
import pytest

from proca_sync.crypto import Keystore, b64decode, b64encode
from tests.conftest import FIXTURES, fixture_bytes
from tests.support import vector
from tests.support.builders import ORG, action, dumps

TEST_VECTOR_ACTION: dict[str, Any] = {
    **orjson.loads(fixture_bytes("petition_optout.json")),
    "actionId": 4722133,
    "contact": {
        "contactRef": "q3J0cYq3J0cYq3J0cYq3J0cYq3J0cYq3J0cYq3J0cYq",
        "dupeRank": 0,
        "firstName": "Selina",
        "email": "selina@example.org",
        "area": "DE",
    },
    "personalInfo": vector.personal_info(),
}


def cli(
    *args: str, stdin: bytes | None = None, cwd: Path | None = None
) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PROCA_")}
    proc = subprocess.run(
        [sys.executable, "-m", "proca_sync", *args],
        input=stdin.decode() if stdin is not None else None,
        capture_output=True,
        text=True,
        cwd=cwd,
        env=env,
        timeout=120,
        check=False,
    )
    return proc


def personal_strings(bodies: list[bytes]) -> set[str]:
    """Every e-mail, name and postcode appearing anywhere in the input messages."""
    found: set[str] = set()

    def walk(node: Any, key: str = "") -> None:
        if isinstance(node, dict):
            for k, v in node.items():
                walk(v, k)
        elif isinstance(node, list):
            for v in node:
                walk(v, key)
        elif (
            isinstance(node, str)
            and key
            in {
                "email",
                "firstName",
                "lastName",
                "postcode",
                "phone",
                "street",
            }
            and len(node) >= 4
        ):
            found.add(node)

    for body in bodies:
        try:
            walk(orjson.loads(body))
        except orjson.JSONDecodeError:
            continue
    found.update({"simone@example.org", "de Beauvoir", "75001"})  # inside the ciphertext
    return found


def test_fixtures_replay_and_export(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'crm.db'}"
    files = sorted(str(p) for p in FIXTURES.glob("*.json"))
    result = cli("replay", *files, "--crm", url)
    assert result.returncode == 0, result.stderr
    assert "synced" in result.stdout
    export = json.loads(cli("crm", "export", "--crm", url).stdout)
    by_ref = {ref: c for c in export["contacts"] for ref in c["contactRefs"]}
    assert set(by_ref) == {
        "MDWJu2fbogTgTHgLTLl-OFvRII63xZE76i7w3qHfbbE",
        "MDWJu2fbogTgTHgLTLl-OFvRII63xZE76i7w3qHfbbX",
        "1E4HalXr1WJkKnaeSyOgI8zTG8cKMu-vgFzWqeICtxY",
    }
    signer = by_ref["MDWJu2fbogTgTHgLTLl-OFvRII63xZE76i7w3qHfbbE"]
    assert signer["subscribed"] is True and signer["emailStatus"] == "double_opt_in"
    assert {a["actionType"] for a in signer["actions"]} == {"register", "share"}
    optout = by_ref["MDWJu2fbogTgTHgLTLl-OFvRII63xZE76i7w3qHfbbX"]
    assert optout["subscribed"] is False and optout["emailStatus"] is None
    assert optout["actions"][0]["testing"] is True
    # the applied double-opt-in event: a contact made from the event, subscribed
    doi = by_ref["1E4HalXr1WJkKnaeSyOgI8zTG8cKMu-vgFzWqeICtxY"]
    assert doi["subscribed"] is True and doi["emailStatusHistory"][0]["status"] == "double_opt_in"
    for contact in export["contacts"]:
        assert set(contact) >= {
            "email",
            "firstName",
            "lastName",
            "postcode",
            "country",
            "contactRefs",
            "subscribed",
            "emailStatus",
            "actions",
        }
        for a in contact["actions"]:
            assert set(a) >= {
                "actionId",
                "actionType",
                "campaign",
                "createdAt",
                "customFields",
                "testing",
            }
    assert {c["name"] for c in export["campaigns"]} == {"animalconsult", "test", "petition_x"}
    assert set(export["campaigns"][0]) >= {"name", "title", "externalId"}


def test_each_bad_message_has_its_reason_and_the_rest_syncs(tmp_path: Path) -> None:
    keys = tmp_path / "keys.json"
    Keystore([ORG]).save(keys)
    tampered = json.loads(json.dumps(TEST_VECTOR_ACTION))
    raw = bytearray(b64decode(tampered["personalInfo"]["payload"]))
    raw[20] ^= 0x01
    tampered["personalInfo"]["payload"] = b64encode(bytes(raw))
    tampered["actionId"] = 1
    unknown_key = json.loads(json.dumps(TEST_VECTOR_ACTION))
    unknown_key["personalInfo"]["encryptKey"]["public"] = "x" * 43
    unknown_key["actionId"] = 2
    no_action = {
        k: v for k, v in orjson.loads(fixture_bytes("petition_optin.json")).items() if k != "action"
    }
    lines = [
        dumps(TEST_VECTOR_ACTION),
        dumps(tampered),
        dumps(unknown_key),
        b'{"schema": "proca:action:2", "stage": "deliver", "contact": {"email": "broken@example.org"',
        dumps({**orjson.loads(fixture_bytes("share_twitter.json")), "schema": "proca:action:9"}),
        dumps(no_action),
        fixture_bytes("petition_optout.json").replace(b"\n", b""),
        dumps(
            action(
                77,
                ref="Z" * 43,
                email="zed@example.org",
                created="2024-05-01T00:00:00Z",
                first_name="Zed",
            )
        ),
    ]
    stream = tmp_path / "mixed.jsonl"
    stream.write_bytes(b"\n".join(lines) + b"\n")
    url = f"sqlite:///{tmp_path / 'crm.db'}"
    result = cli("replay", str(stream), "--crm", url, "--keys", str(keys), "--json")
    assert result.returncode == 1, result.stderr
    summary = json.loads(result.stdout)
    assert summary["synced"] == 3
    assert summary["rejected"] == {
        "decrypt_failed": 1,
        "unknown_key": 1,
        "invalid_json": 1,
        "unknown_schema": 1,
        "missing_field": 1,
    }
    export = json.loads(cli("crm", "export", "--crm", url).stdout)
    emails = {c["email"] for c in export["contacts"]}
    assert emails == {"simone@example.org", "another.test@example.org", "zed@example.org"}
    simone = next(c for c in export["contacts"] if c["email"] == "simone@example.org")
    assert simone["lastName"] == "de Beauvoir" and simone["postcode"] == "75001"
    # nothing personal in what replay printed or logged
    printed = result.stdout + result.stderr
    for secret in personal_strings(lines):
        assert secret not in printed, "personal data in replay output"
    assert re.search(r"missing_field", result.stderr)


def test_stdin_and_usage_errors(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'crm.db'}"
    result = cli("replay", "-", "--crm", url, stdin=fixture_bytes("petition_optin.json"))
    assert result.returncode == 0, result.stderr
    assert cli("replay", str(tmp_path / "missing.json"), "--crm", url).returncode == 2
    assert cli("replay", "-", "--crm", url, "--mode", "bogus", stdin=b"").returncode == 2
    assert (
        cli(
            "replay", "-", "--crm", url, "--keys", str(tmp_path / "nokeys.json"), stdin=b""
        ).returncode
        == 2
    )


def test_modes_and_skip_testing(tmp_path: Path) -> None:
    files = sorted(str(p) for p in FIXTURES.glob("*.json"))
    url = f"sqlite:///{tmp_path / 'doi.db'}"
    assert cli("replay", *files, "--crm", url, "--mode", "double-opt-in").returncode == 0
    export = json.loads(cli("crm", "export", "--crm", url).stdout)
    assert all(c["emailStatus"] == "double_opt_in" for c in export["contacts"])
    url = f"sqlite:///{tmp_path / 'skip.db'}"
    result = cli("replay", *files, "--crm", url, "--skip-testing", "--json")
    assert json.loads(result.stdout)["ignored"] == {"testing_skipped": 3}


@pytest.mark.parametrize("padded", [False, True])
def test_keys_generate_and_check(tmp_path: Path, padded: bool) -> None:
    path = tmp_path / "keys.json"
    result = cli("keys", "generate", "--out", str(path))
    assert result.returncode == 0, result.stderr
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    store = json.loads(path.read_text())
    ((public, entry),) = store.items()
    assert entry["private"] not in result.stdout
    if padded:
        path.write_text(json.dumps({public + "=": {"private": entry["private"] + "="}}))
    checked = cli("keys", "check", str(path))
    assert checked.returncode == 0 and public in checked.stdout
    assert cli("keys", "generate", "--out", str(path)).returncode == 2  # never overwrite
    other = json.loads(path.read_text())
    other[public.rstrip("=")] = {"private": b64encode(bytes(32))}
    path.write_text(json.dumps(other))
    assert cli("keys", "check", str(path)).returncode == 2


def refused_stream(tmp_path: Path) -> tuple[Path, list[bytes]]:
    """Three actions; the CRM refuses the one of ``refused@example.org`` for good."""
    lines = [
        dumps(action(301, ref="A" * 43, email="kept.one@example.org", created="2024-05-01T00:00:00Z",
                     first_name="Keptone", record={"lastName": "Firstperson", "postcode": "1000"})),
        dumps(action(302, ref="B" * 43, email="refused@example.org", created="2024-05-01T00:00:00Z",
                     first_name="Refusedname", record={"lastName": "Refusedlast",
                                                       "postcode": "2000"})),
        dumps(action(303, ref="C" * 43, email="kept.two@example.org", created="2024-05-01T00:00:00Z",
                     first_name="Kepttwo", record={"lastName": "Secondperson",
                                                   "postcode": "3000"})),
    ]
    stream = tmp_path / "refused.jsonl"
    stream.write_bytes(b"\n".join(lines) + b"\n")
    return stream, lines


def check_refusal_printed_nothing_personal(
    stream: Path, lines: list[bytes], crm: str
) -> None:
    secrets = personal_strings(lines) | {"A" * 43, "B" * 43, "C" * 43}
    for extra in ([], ["--json"]):
        result = cli("replay", str(stream), "--crm", crm, *extra)
        assert result.returncode == 1, result.stderr
        printed = result.stdout + result.stderr
        assert "crm_rejected" in printed
        for secret in secrets:
            assert secret not in printed, f"personal data in replay output: {secret}"
        if extra:
            summary = json.loads(result.stdout)
            assert summary["rejected"] == {"crm_rejected": 1}
            assert summary["synced"] + summary["duplicates"] == 2


def test_replay_into_a_webhook_crm_that_refuses_a_record_prints_no_personal_data(
    tmp_path: Path,
) -> None:
    """The CRM answers 422 and echoes the record's e-mail addresses in its answer."""
    from tests.support.crm_server import CrmServer

    stream, lines = refused_stream(tmp_path)
    with CrmServer() as server:
        server.validation_error_for(
            lambda payload: "refused@example.org" in json.dumps(payload)
        )
        check_refusal_printed_nothing_personal(stream, lines, server.url)
        assert {r.status for r in server.received()} >= {422}


@pytest.mark.postgres
def test_replay_into_postgres_that_refuses_a_record_prints_no_personal_data(
    tmp_path: Path, pg_url: str
) -> None:
    """PostgreSQL refuses the contact row with a data exception quoting the e-mail."""
    import psycopg

    from proca_sync.crm.sql import SqlBackend

    with SqlBackend(pg_url):
        pass  # the schema exists before the trigger
    schema = pg_url.rsplit("%3D", 1)[1]
    dsn = pg_url.split("?", 1)[0]
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(
            f'CREATE FUNCTION "{schema}".refuse() RETURNS trigger AS $$ BEGIN '
            "IF NEW.email = 'refused@example.org' THEN "
            "RAISE EXCEPTION 'bad address %', NEW.email USING ERRCODE = '22023'; END IF; "
            "RETURN NEW; END $$ LANGUAGE plpgsql"
        )
        conn.execute(
            f'CREATE TRIGGER refuse BEFORE INSERT OR UPDATE ON "{schema}".contacts '
            f'FOR EACH ROW EXECUTE FUNCTION "{schema}".refuse()'
        )
    stream, lines = refused_stream(tmp_path)
    check_refusal_printed_nothing_personal(stream, lines, pg_url)
