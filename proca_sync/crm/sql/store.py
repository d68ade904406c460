"""Engines for our SQL stores (CRM, parked messages) and the translation of database errors."""

from __future__ import annotations

import contextlib
import os
from datetime import UTC, datetime
from pathlib import Path
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
    name = type(getattr(exc, "orig", None) or exc).__name__
    if isinstance(exc, sa_exc.DataError):
        return BackendRejectedError(f"database refused a value ({name})")
    if isinstance(exc, sa_exc.IntegrityError):
        # Another writer raced us on the same key: trying again sees its row.
        return BackendUnavailableError(f"concurrent write conflict ({name})")
    return BackendUnavailableError(f"database unavailable ({name})")
