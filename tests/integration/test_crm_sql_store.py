"""``crm/sql/store.py`` rule by rule, on real SQLite files and the PostgreSQL on loopback:
store URLs checked before anything is created, private files, the engines' transactions
(one snapshot per read, ``BEGIN IMMEDIATE`` for writes), and which database errors are a
missing database or a clash with another writer. Messages are pinned literally: operators
read them (the mutation run relies on it too)."""

from __future__ import annotations

import os
import re
import sqlite3
import stat
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import psycopg
import pytest
from psycopg import errors as pg_errors
from sqlalchemy import exc as sa_exc
from sqlalchemy import text

from proca_sync.crm.sql import (
    check_store_url,
    create_private_file,
    create_store_engine,
    sqlite_file,
)
from proca_sync.crm.sql.changelog import upgrade
from proca_sync.crm.sql.store import (
    _now,
    _translate,
    conflict,
    missing_database,
    normalise_url,
    write_engine,
)
from proca_sync.errors import BackendUnavailableError, ConfigError

SQLITE_FORM = re.escape("sqlite:///path/to/file.db (sqlite:////abs/path.db for an absolute path)")


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


# ---- locations -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("sqlite:///crm.db", Path("crm.db")),
        ("sqlite:////abs/crm.db", Path("/abs/crm.db")),
        ("sqlite:///crm.db?timeout=3", Path("crm.db")),
        ("sqlite://", None),
        ("sqlite:///:memory:", None),
        ("sqlite:///file:mem?mode=memory&uri=true", None),
        ("postgresql://u@h/crm.db", None),
        ("not a url", None),
    ],
)
def test_sqlite_file_names_the_file_of_a_sqlite_url_only(url: str, expected: Path | None) -> None:
    assert sqlite_file(url) == expected


@pytest.mark.parametrize(
    ("location", "message"),
    [
        ("crm.db", "write it as sqlite:///crm.db or postgresql://user@host/database"),
        ("data/crm.sqlite", "write it as sqlite:///data/crm.sqlite or postgresql://"),
        ("crm.sqlite3", "write it as sqlite:///crm.sqlite3 or postgresql://"),
        ("crm", f"write it as {SQLITE_FORM} or postgresql://user@host/database"),
        ("crm.db.txt", f"write it as {SQLITE_FORM} or"),
    ],
)
def test_a_location_that_is_not_a_url_is_refused_showing_the_right_form(
    location: str, message: str
) -> None:
    with pytest.raises(ConfigError, match=rf"^parking location is not a database URL; {message}"):
        check_store_url(location, what="parking")


def test_a_sqlite_location_must_be_a_file_in_an_existing_folder(tmp_path: Path) -> None:
    folder = tmp_path / "crm.db"
    folder.mkdir()
    with pytest.raises(
        ConfigError, match=rf"^CRM path {re.escape(str(folder))} is a folder; name a file: "
        rf"{SQLITE_FORM}$",
    ):
        check_store_url(f"sqlite:///{folder}", what="CRM")
    missing = tmp_path / "missing"
    with pytest.raises(
        ConfigError,
        match=rf"^CRM folder {re.escape(str(missing))} does not exist \(create it, or fix the "
        rf"path: {SQLITE_FORM}\)$",
    ):
        check_store_url(f"sqlite:///{missing / 'crm.db'}", what="CRM")
    for fine in (f"sqlite:///{tmp_path / 'crm.db2'}", "sqlite://", "postgresql://u@h/db"):
        check_store_url(fine, what="CRM")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["crm.db"]  # nothing created


def test_a_private_file_is_created_0600_whatever_the_umask(tmp_path: Path) -> None:
    path = tmp_path / "store.db"
    old = os.umask(0o277)  # would give 0400
    try:
        assert create_private_file(path) is True
    finally:
        os.umask(old)
    assert mode(path) == 0o600 and path.read_bytes() == b""
    path.write_bytes(b"kept")
    path.chmod(0o644)
    assert create_private_file(path) is False  # an existing file is left as it is
    assert path.read_bytes() == b"kept" and mode(path) == 0o644


def test_only_the_scheme_of_a_postgres_url_is_rewritten() -> None:
    url = "postgres://u@h/db?application_name=a://b"
    assert normalise_url(url) == "postgresql+psycopg://u@h/db?application_name=a://b"


# ---- engines ---------------------------------------------------------------------------


def test_a_missing_driver_is_a_config_error_and_sql_is_not_echoed() -> None:
    # pg8000 is not installed (psycopg is the driver proca-sync installs)
    with pytest.raises(
        ConfigError,
        match=r"^PostgreSQL needs the 'postgres' extra: pip install 'proca-sync\[postgres\]'$",
    ):
        create_store_engine("postgresql+pg8000://u@h/db", what="CRM")
    engine, _ = create_store_engine("sqlite://", what="CRM")
    assert engine.echo is False
    engine.dispose()


def test_a_sqlite_store_and_its_wal_are_created_0600(tmp_path: Path, umask: None) -> None:
    path = tmp_path / "crm.db"
    engine, _ = create_store_engine(f"sqlite:///{path}", what="CRM")
    try:
        with engine.begin() as conn:
            conn.execute(text("CREATE TABLE t (x INTEGER)"))
            conn.execute(text("INSERT INTO t VALUES (1)"))
            # NORMAL by default (the tests of the engine settings set FULL)
            assert conn.exec_driver_sql("PRAGMA synchronous").scalar() == 1
        # SQLite gives its -wal file the database file's mode
        assert (mode(path), mode(tmp_path / "crm.db-wal")) == (0o600, 0o600)
    finally:
        engine.dispose()
    # A missing folder: SQLite's own error (translated by the stores as an outage).
    engine, _ = create_store_engine(f"sqlite:///{tmp_path / 'no' / 'crm.db'}", what="CRM")
    with pytest.raises(sa_exc.OperationalError, match="unable to open database file"):
        engine.connect()
    engine.dispose()


def test_sqlite_reads_see_one_snapshot_and_writes_take_the_lock_at_begin(tmp_path: Path) -> None:
    path = tmp_path / "crm.db"
    engine, _ = create_store_engine(f"sqlite:///{path}?timeout=0.1", what="CRM")
    with engine.begin() as conn:
        conn.execute(text("CREATE TABLE t (x INTEGER)"))
    other = sqlite3.connect(path, timeout=0.1, isolation_level=None)
    try:
        with engine.begin() as conn:
            assert conn.execute(text("SELECT count(*) FROM t")).scalar() == 0
            other.execute("INSERT INTO t VALUES (1)")  # commits at once
            assert conn.execute(text("SELECT count(*) FROM t")).scalar() == 0  # same snapshot
            # a read transaction holds no write lock
            other.execute("BEGIN IMMEDIATE")
            other.execute("ROLLBACK")
        with write_engine(engine).begin() as conn:
            with pytest.raises(sqlite3.OperationalError, match="database is locked"):
                other.execute("BEGIN IMMEDIATE")  # ours holds it from BEGIN on
            assert conn.execute(text("SELECT count(*) FROM t")).scalar() == 1
        other.execute("BEGIN IMMEDIATE")  # released at the commit
        other.execute("ROLLBACK")
    finally:
        other.close()
        engine.dispose()


@pytest.mark.postgres
def test_postgres_connections_give_up_after_5_seconds(pg_url: str) -> None:
    engine, _ = create_store_engine(pg_url, what="CRM")
    try:
        with engine.connect() as conn:
            raw = conn.connection.dbapi_connection
            assert isinstance(raw, psycopg.Connection)
            assert raw.info.get_parameters()["connect_timeout"] == "5"
    finally:
        engine.dispose()


@pytest.mark.parametrize("zone", ["UTC0", "PROCA-14", "PROCA+11"])  # POSIX: UTC+14, UTC-11
def test_now_is_utc_with_microseconds_whatever_the_local_time_zone(
    zone: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Erasure times are compared with the records' UTC times: a local time would
    # misjudge which records are older than an erasure.
    monkeypatch.setenv("TZ", zone)
    time.tzset()
    try:
        before = datetime.now(UTC)
        now = _now()
        after = datetime.now(UTC)
    finally:
        monkeypatch.undo()
        time.tzset()
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z", now)
    parsed = datetime.strptime(now, "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=UTC)
    assert before - timedelta(seconds=1) <= parsed <= after


# ---- errors ----------------------------------------------------------------------------


MISSING = (
    r"^CRM database does not exist on that PostgreSQL server; create it \(createdb NAME\) "
    r"or fix the URL: postgresql://user@host/database$"
)


class Orig(Exception):
    pass


@pytest.mark.postgres
def test_a_missing_database_is_told_from_other_errors(pg_url: str) -> None:
    engine, _ = create_store_engine(pg_url, what="CRM")
    caught: list[sa_exc.SQLAlchemyError] = []
    try:
        for sql in (
            "SELECT pg_database_size('no_such_db_i9')",  # 3D000, a ProgrammingError
            "SELECT * FROM no_such_table_i9",  # "relation … does not exist"
        ):
            with engine.connect() as conn, pytest.raises(sa_exc.SQLAlchemyError) as info:
                conn.execute(text(sql))
            caught.append(info.value)
    finally:
        engine.dispose()
    by_state, other = caught
    assert isinstance(getattr(by_state, "orig", None), pg_errors.InvalidCatalogName)
    assert not isinstance(by_state, sa_exc.OperationalError)
    missing = missing_database(by_state, what="CRM")
    assert isinstance(missing, ConfigError) and re.match(MISSING, str(missing))
    assert missing_database(other, what="CRM") is None


@pytest.mark.parametrize(
    ("error", "missing"),
    [
        # the driver's connection failure has no SQLSTATE: its text tells
        (sa_exc.OperationalError("connect", {}, Orig('database "crm" does not exist')), True),
        (sa_exc.OperationalError("connect", {}, Orig('role "crm" does not exist')), False),
        (sa_exc.OperationalError("connect", {}, Orig("unable to open database file")), False),
        (sa_exc.ProgrammingError("x", {}, Orig('database "crm" does not exist')), False),
        (sa_exc.TimeoutError(), False),  # no driver error at all
    ],
    ids=["no-database", "no-role", "sqlite", "not-operational", "pool-timeout"],
)
def test_a_missing_database_by_the_connection_errors_text(
    error: sa_exc.SQLAlchemyError, missing: bool
) -> None:
    found = missing_database(error, what="CRM")
    if missing:
        assert isinstance(found, ConfigError) and re.match(MISSING, str(found))
    else:
        assert found is None


@pytest.mark.parametrize(
    ("error", "clash"),
    [
        (pg_errors.SerializationFailure(), True),
        (pg_errors.DeadlockDetected(), True),
        (pg_errors.UniqueViolation(), True),
        (pg_errors.ForeignKeyViolation(), False),
        (pg_errors.LockNotAvailable(), False),
        (sqlite3.OperationalError("database is locked"), True),
        (sqlite3.OperationalError("database table is locked"), True),
        (sqlite3.OperationalError("database is busy"), True),
        (sqlite3.OperationalError("unable to open database file"), False),
        (sqlite3.IntegrityError("UNIQUE constraint failed: t.x (locked)"), False),
        (Orig("database is locked"), False),
    ],
    ids=lambda value: value if isinstance(value, bool) else f"{type(value).__name__}:{value}",
)
def test_a_clash_with_another_writer_is_told_from_other_errors(
    error: BaseException, clash: bool
) -> None:
    assert conflict(error) is clash


@pytest.mark.parametrize(
    ("orig", "message"),
    [
        (pg_errors.SerializationFailure(), "concurrent write conflict (SerializationFailure)"),
        (pg_errors.DeadlockDetected(), "concurrent write conflict (DeadlockDetected)"),
        (sqlite3.OperationalError("database is locked"), "concurrent write conflict "
                                                         "(OperationalError)"),
    ],
    ids=["serialization", "deadlock", "sqlite-locked"],
)
def test_a_clash_is_translated_as_a_transient_conflict(orig: Exception, message: str) -> None:
    translated = _translate(sa_exc.OperationalError("UPDATE", {}, orig))
    assert type(translated) is BackendUnavailableError
    assert str(translated) == message


def test_an_upgrade_from_the_current_version_logs_nothing(tmp_path: Path) -> None:
    from proca_sync.crm.sql import SCHEMA_VERSION, SqlBackend

    with SqlBackend(f"sqlite:///{tmp_path / 'crm.db'}") as backend:
        backend.open_sync()
        with backend.engine.begin() as conn:
            conn.execute(text("INSERT INTO campaigns (name, stamp, data) VALUES ('c', 's', '{}')"))
            upgrade(conn, SCHEMA_VERSION)
            assert conn.execute(text("SELECT count(*) FROM changes")).scalar() == 0
            upgrade(conn, 1)
            assert conn.execute(text("SELECT kind, entity FROM changes")).all() == [
                ("campaign", "c")
            ]


@pytest.mark.postgres
def test_a_crm_schema_created_by_another_process_is_waited_for(pg_url: str) -> None:
    """Two processes starting on a fresh PostgreSQL schema at once: the second waits for
    the first's table creation (the schema lock) instead of failing on the catalogue's
    unique index (``CREATE TABLE IF NOT EXISTS`` races there)."""
    import threading

    from proca_sync.crm.sql import SqlBackend
    from proca_sync.crm.sql.schema import metadata
    from proca_sync.crm.sql.store import lock_schema

    first, _ = create_store_engine(pg_url, what="CRM")
    try:
        with first.begin() as conn:  # what a starting process does, held uncommitted
            lock_schema(conn)
            metadata.create_all(conn, checkfirst=True)
            done = threading.Event()
            failed: list[BaseException] = []

            def start() -> None:
                try:
                    with SqlBackend(pg_url) as backend:
                        backend.open_sync()
                except BaseException as exc:  # reported below
                    failed.append(exc)
                done.set()

            second = threading.Thread(target=start)
            second.start()
            assert not done.wait(1.0)  # a bounded wait for something that must not happen
        second.join(30)
        assert done.is_set() and failed == []
    finally:
        first.dispose()
