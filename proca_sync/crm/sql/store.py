"""Engines for our SQL stores (CRM, parked messages) and the translation of database errors."""

from __future__ import annotations

import contextlib
import os
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from sqlalchemy import (
    Connection,
    Engine,
    create_engine,
    event,
)
from sqlalchemy import exc as sa_exc
from sqlalchemy.engine import make_url

from proca_sync.errors import (
    BackendRejectedError,
    BackendUnavailableError,
    ConfigError,
)

SQLITE_FORM = "sqlite:///path/to/file.db (sqlite:////abs/path.db for an absolute path)"
"""How a SQLite store URL is written, for error messages."""
POSTGRES_FORM = "postgresql://user@host/database"


def create_private_file(path: Path) -> bool:
    """Create ``path`` empty with mode 0600 whatever the umask; False if it existed.

    For files that hold personal data or keys: the file never exists with a wider mode.
    """
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return False
    try:
        os.fchmod(fd, 0o600)  # the umask may have narrowed it; never widened
    finally:
        os.close(fd)
    return True


def sqlite_file(url: str) -> Path | None:
    """The file a ``sqlite:///`` URL names; None for another database or in-memory SQLite."""
    try:
        parsed = make_url(normalise_url(url))
    except sa_exc.ArgumentError:
        return None
    if parsed.get_backend_name() != "sqlite":
        return None
    database = parsed.database or ""
    if database in {"", ":memory:"} or database.startswith("file:"):
        return None
    return Path(database)


def check_store_url(url: str, *, what: str) -> None:
    """Refuse a mistyped store location before anything is opened or created (the CLI
    calls it at start; engines do not, as a folder that vanishes later is an outage).

    Raises :class:`ConfigError` naming the problem and showing the right form: a bare
    path or another non-URL (``crm.db``), a SQLite file whose folder does not exist or
    that is a folder. Does no I/O beyond ``stat`` and creates nothing.
    """
    if "://" not in url:
        hint = f"sqlite:///{url}" if url.endswith((".db", ".sqlite", ".sqlite3")) else SQLITE_FORM
        raise ConfigError(
            f"{what} location is not a database URL; write it as {hint} "
            f"or {POSTGRES_FORM}"
        )
    path = sqlite_file(url)
    if path is None:
        return
    if path.is_dir():
        raise ConfigError(f"{what} path {path} is a folder; name a file: {SQLITE_FORM}")
    folder = path.parent
    if not folder.is_dir():
        raise ConfigError(
            f"{what} folder {folder} does not exist (create it, or fix the path: {SQLITE_FORM})"
        )


def normalise_url(url: str) -> str:
    """Accept the URLs users write: ``postgresql://`` means psycopg 3."""
    if url.startswith(("postgresql://", "postgres://")):
        return "postgresql+psycopg://" + url.split("://", 1)[1]
    return url


def create_store_engine(
    url: str, *, what: str, echo: bool = False, synchronous: str = "NORMAL"
) -> tuple[Engine, str]:
    """An engine for one of our SQL stores (CRM, parked messages) and its dialect name.

    SQLite runs in WAL mode with the given ``synchronous`` level and waits up to 15 s on
    a lock (``?timeout=S`` in the URL overrides it). Its transactions are begun by us,
    not by the driver (which would run a transaction's reads outside of it and begin only
    at the first write): reads see one snapshot, and a write transaction opened through
    :func:`write_engine` takes the database's write lock at ``BEGIN IMMEDIATE``, so two
    processes never interleave a read-merge-write. PostgreSQL connections are checked
    before use. Statement parameters never appear in errors or logs. Raises
    :class:`ConfigError` for an unusable URL or a missing driver.
    """
    url = normalise_url(url)
    try:
        parsed = make_url(url)
    except sa_exc.ArgumentError:
        raise ConfigError(f"{what} URL is not a database URL") from None
    dialect = parsed.get_backend_name()
    if dialect not in {"sqlite", "postgresql"}:
        raise ConfigError(f"unsupported {what} database {dialect!r} (sqlite or postgresql)")
    kwargs: dict[str, Any] = {"echo": echo, "hide_parameters": True}
    if dialect == "sqlite":
        # A locked database waits this long before failing (a transient error).
        if "timeout" not in parsed.query:
            kwargs["connect_args"] = {"timeout": 15}
    else:
        kwargs["pool_pre_ping"] = True
        kwargs["connect_args"] = {"connect_timeout": 5}
    try:
        engine = create_engine(url, **kwargs)
    except ModuleNotFoundError:
        raise ConfigError(
            "PostgreSQL needs the 'postgres' extra: pip install 'proca-sync[postgres]'"
        ) from None
    if dialect == "sqlite":

        def pragmas(dbapi_connection: Any, _record: Any) -> None:
            cursor = dbapi_connection.cursor()
            cursor.execute("PRAGMA journal_mode=WAL")
            cursor.execute(f"PRAGMA synchronous={synchronous}")
            cursor.execute("PRAGMA foreign_keys=ON")
            cursor.close()
            # We emit BEGIN ourselves (SQLAlchemy's recipe for pysqlite transactions).
            dbapi_connection.isolation_level = None

        def begin(conn: Connection) -> None:
            immediate = conn.get_execution_options().get(_WRITE_OPTION, False)
            conn.exec_driver_sql("BEGIN IMMEDIATE" if immediate else "BEGIN")

        event.listen(engine, "connect", pragmas)
        event.listen(engine, "begin", begin)
        path = sqlite_file(url)
        if path is not None:
            private = path

            def create_private(*_args: Any) -> None:
                # SQLite would create the file with the umask's mode (often 0644); it
                # gives its -wal and -shm files the mode of the database file. A missing
                # folder is left to SQLite: its error is translated (an outage).
                with contextlib.suppress(OSError):
                    create_private_file(private)

            event.listen(engine, "do_connect", create_private)
    return engine, dialect


_WRITE_OPTION = "proca_write"


def write_engine(engine: Engine) -> Engine:
    """``engine`` for write transactions: on SQLite they begin with ``BEGIN IMMEDIATE``
    (the write lock first, waiting up to the busy timeout), so that another process
    cannot commit between this transaction's reads and its writes."""
    return engine.execution_options(**{_WRITE_OPTION: True})


SCHEMA_LOCK = 0x70726F6361_5C  # "proca\" — any constant shared by every process
"""PostgreSQL advisory lock held while a store creates or checks its tables."""


def lock_schema(conn: Connection) -> None:
    """Serialise table creation between processes starting at once: PostgreSQL's
    ``CREATE TABLE IF NOT EXISTS`` races on its catalogue (a unique violation in
    ``pg_type``). SQLite's ``BEGIN IMMEDIATE`` already serialises it."""
    if conn.dialect.name == "postgresql":
        conn.exec_driver_sql(f"SELECT pg_advisory_xact_lock({SCHEMA_LOCK})")


def _now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def missing_database(exc: sa_exc.SQLAlchemyError, *, what: str) -> ConfigError | None:
    """A ConfigError when ``exc`` says the PostgreSQL database does not exist (a typo in
    the URL, not an outage), else None."""
    orig = getattr(exc, "orig", None)
    if getattr(orig, "sqlstate", None) == "3D000" or (
        isinstance(exc, sa_exc.OperationalError)
        and "database" in str(orig)
        and "does not exist" in str(orig)
    ):
        return ConfigError(
            f"{what} database does not exist on that PostgreSQL server; create it "
            f"(createdb NAME) or fix the URL: {POSTGRES_FORM}"
        )
    return None


def _translate(exc: sa_exc.SQLAlchemyError) -> Exception:
    """Map a database error to our tree, naming its class only (no parameters)."""
    orig = getattr(exc, "orig", None)
    name = type(orig or exc).__name__
    if conflict(orig or exc):
        return BackendUnavailableError(f"concurrent write conflict ({name})")
    if isinstance(exc, sa_exc.DataError):
        return BackendRejectedError(f"database refused a value ({name})")
    if isinstance(exc, sa_exc.IntegrityError):
        # Another writer raced us on the same key: trying again sees its row.
        return BackendUnavailableError(f"concurrent write conflict ({name})")
    return BackendUnavailableError(f"database unavailable ({name})")


CONFLICT_STATES = frozenset({"40001", "40P01"})
"""PostgreSQL's serialization failure and deadlock: nothing is wrong with the data."""


def conflict(exc: BaseException) -> bool:
    """Whether ``exc`` (a driver error) is a clash with another writer that trying the
    same transaction again resolves: a PostgreSQL serialization failure or deadlock, a
    unique key another transaction took first, a SQLite database busy or locked."""
    state = getattr(exc, "sqlstate", None)
    if state in CONFLICT_STATES or state == "23505":
        return True
    if type(exc).__module__.startswith("sqlite3") and type(exc).__name__ == "OperationalError":
        text = str(exc)
        return "locked" in text or "busy" in text
    return False
