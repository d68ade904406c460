"""Engines for our SQL stores (CRM, parked messages) and the translation of database errors."""

from __future__ import annotations

from datetime import UTC, datetime
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
