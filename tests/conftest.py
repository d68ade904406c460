"""Shared fixtures: the sample messages and real services (skipped locally when absent,
a failure when CI is set)."""

from __future__ import annotations

import os
import secrets
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

# shared/ sits beside the repository (CI clones main next to it); PROCA_SHARED overrides.
FIXTURES = Path(
    os.environ.get("PROCA_SHARED", Path(__file__).resolve().parents[2] / "shared")
) / "fixtures"

# Mutation testing (scripts/mutation.sh): while mutmut maps which tests reach which
# function, it marks the process with MUTANT_UNDER_TEST=stats, and a proca-sync subprocess
# started by a test inherits it and then looks for mutmut's settings in its own working
# directory (a tmp dir), where it fails. mutmut keeps its own copy of the mark in this
# process, so taking it out of the environment only spares the subprocesses. (The mark of a
# mutant under test stays: a subprocess runs that mutant too.)
if os.environ.get("MUTANT_UNDER_TEST") == "stats":
    del os.environ["MUTANT_UNDER_TEST"]

PG_HOST = os.environ.get("PROCA_TEST_PG_HOST", "127.0.0.1")
PG_PORT = int(os.environ.get("PROCA_TEST_PG_PORT", "5432"))
PG_DB = os.environ.get("PROCA_TEST_PG_DB", "test")


def service_up(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=1):
            return True
    except OSError:
        return False


def require_service(name: str, host: str, port: int) -> None:
    """Skip when a service is absent on a developer machine; fail when CI is set."""
    if service_up(host, port):
        return
    message = f"{name} is not reachable on {host}:{port}"
    if os.environ.get("CI"):
        pytest.fail(message)
    pytest.skip(message)


def fixture_bytes(name: str) -> bytes:
    return (FIXTURES / name).read_bytes()


def all_fixture_bodies() -> list[bytes]:
    return [path.read_bytes() for path in sorted(FIXTURES.glob("*.json"))]


@pytest.fixture
def pg_url() -> Iterator[str]:
    """A PostgreSQL URL whose search_path is a fresh schema, dropped afterwards."""
    require_service("PostgreSQL", PG_HOST, PG_PORT)
    import psycopg

    schema = "t_" + secrets.token_hex(6)
    dsn = f"host={PG_HOST} port={PG_PORT} dbname={PG_DB} user=postgres"
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(f'CREATE SCHEMA "{schema}"')
    try:
        yield (
            f"postgresql://postgres@{PG_HOST}:{PG_PORT}/{PG_DB}?options=-csearch_path%3D{schema}"
        )
    finally:
        with psycopg.connect(dsn, autocommit=True) as conn:
            conn.execute(f'DROP SCHEMA "{schema}" CASCADE')


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def crm_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """Every SQL CRM the engine must work on: a SQLite file and a PostgreSQL schema."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'crm.db'}"
    url: str = request.getfixturevalue("pg_url")
    return url
