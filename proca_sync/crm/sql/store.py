"""Engines for our SQL stores (CRM, parked messages) and the translation of database errors."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
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
    a lock (``?timeout=S`` in the URL overrides it); PostgreSQL connections are checked
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

        event.listen(engine, "connect", pragmas)
    return engine, dialect


def _now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _translate(exc: sa_exc.SQLAlchemyError) -> Exception:
    """Map a database error to our tree, naming its class only (no parameters)."""
    name = type(getattr(exc, "orig", None) or exc).__name__
    if isinstance(exc, sa_exc.DataError):
        return BackendRejectedError(f"database refused a value ({name})")
    if isinstance(exc, sa_exc.IntegrityError):
        # Another writer raced us on the same key: trying again sees its row.
        return BackendUnavailableError(f"concurrent write conflict ({name})")
    return BackendUnavailableError(f"database unavailable ({name})")
