"""The console's accounts: local users with argon2 hashes and roles, and the audit log.

A small SQL store of its own (a SQLite file by default, PostgreSQL works too): table
``web_users`` (name, role, hash) and ``web_audit`` (who did what to which id, when). The
audit log holds ids and action names only, never personal data.
"""

from __future__ import annotations

import datetime as dt
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from enum import StrEnum

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError
from sqlalchemy import Column, Integer, MetaData, String, Table, insert, select, update
from sqlalchemy import exc as sa_exc

from proca_sync.crm.sql import create_store_engine
from proca_sync.errors import ConfigError

__all__ = ["AccountStore", "AuditEntry", "HashCost", "LoginLimiter", "Role", "User"]

metadata = MetaData()

web_users = Table(
    "web_users",
    metadata,
    Column("name", String(64), primary_key=True),
    Column("role", String(16), nullable=False),
    Column("password_hash", String(255), nullable=False),
    Column("created_at", String(40), nullable=False),
)

web_audit = Table(
    "web_audit",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("at", String(40), nullable=False, index=True),
    Column("user", String(64), nullable=False),
    Column("action", String(32), nullable=False),
    Column("target", String(128), nullable=False),
)


class Role(StrEnum):
    """What a user may do; each role includes the ones below it."""

    VIEWER = "viewer"
    MODERATOR = "moderator"
    ADMIN = "admin"

    @property
    def rank(self) -> int:
        return _RANKS[self]

    def allows(self, needed: Role) -> bool:
        return self.rank >= needed.rank


_RANKS = {Role.VIEWER: 0, Role.MODERATOR: 1, Role.ADMIN: 2}

NAME_CHARS = frozenset("abcdefghijklmnopqrstuvwxyz0123456789._-")


@dataclass(frozen=True, slots=True)
class HashCost:
    """argon2id parameters of new hashes (a stored hash carries its own, so changing these
    never locks anyone out). The defaults are argon2-cffi's: RFC 9106's low-memory profile."""

    time_cost: int = 3
    memory_kib: int = 65536
    parallelism: int = 4


@dataclass(frozen=True, slots=True)
class User:
    name: str
    role: Role


@dataclass(frozen=True, slots=True)
class AuditEntry:
    at: str
    user: str
    action: str
    target: str


def _now() -> str:
    return dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def check_name(name: str) -> str:
    """A user name: 1-64 lower-case letters, digits, ``.``, ``_``, ``-``.

    Raises :class:`ConfigError` otherwise."""
    if not 1 <= len(name) <= 64 or not set(name) <= NAME_CHARS:
        raise ConfigError("a user name is 1-64 of a-z, 0-9, '.', '_', '-'")
    return name


class AccountStore:
    """Users and the audit log. Synchronous; safe to share between threads (one engine)."""

    MIN_PASSWORD = 10

    def __init__(self, url: str, *, cost: HashCost | None = None) -> None:
        self.engine, _dialect = create_store_engine(url, what="web account store")
        cost = cost or HashCost()
        self._hasher = PasswordHasher(
            time_cost=cost.time_cost, memory_cost=cost.memory_kib, parallelism=cost.parallelism
        )
        self._dummy: str | None = None

    def open_sync(self) -> None:
        """Create the tables on first use. Raises :class:`ConfigError` if unusable."""
        try:
            with self.engine.begin() as conn:
                metadata.create_all(conn, checkfirst=True)
        except sa_exc.SQLAlchemyError as exc:
            raise ConfigError(f"web account store unusable ({type(exc).__name__})") from None

    def close(self) -> None:
        self.engine.dispose()

    def set_user(self, name: str, role: Role, password: str) -> bool:
        """Create ``name`` or replace its role and password; True when it is new.

        Raises :class:`ConfigError` for a bad name or a password shorter than
        :attr:`MIN_PASSWORD`."""
        check_name(name)
        if len(password) < self.MIN_PASSWORD:
            raise ConfigError(f"a password needs at least {self.MIN_PASSWORD} characters")
        hashed = self._hasher.hash(password)
        with self.engine.begin() as conn:
            changed = conn.execute(
                update(web_users)
                .where(web_users.c.name == name)
                .values(role=role.value, password_hash=hashed)
            ).rowcount
            if not changed:
                conn.execute(
                    insert(web_users).values(
                        name=name, role=role.value, password_hash=hashed, created_at=_now()
                    )
                )
        return not changed

    def user(self, name: str) -> User | None:
        with self.engine.connect() as conn:
            row = conn.execute(
                select(web_users.c.name, web_users.c.role).where(web_users.c.name == name)
            ).first()
        return None if row is None else User(row.name, Role(row.role))

    def users(self) -> list[User]:
        with self.engine.connect() as conn:
            rows = conn.execute(select(web_users.c.name, web_users.c.role).order_by("name"))
            return [User(row.name, Role(row.role)) for row in rows]

    def authenticate(self, name: str, password: str) -> User | None:
        """The user when ``password`` is theirs, else None (same cost either way)."""
        with self.engine.connect() as conn:
            row = conn.execute(select(web_users).where(web_users.c.name == name)).first()
        if row is None:
            # An unknown name still costs one verification: no timing oracle for names.
            if self._dummy is None:
                self._dummy = self._hasher.hash("not the password of anyone")
            stored = self._dummy
        else:
            stored = str(row.password_hash)
        try:
            self._hasher.verify(stored, password)
        except (VerificationError, InvalidHashError):
            return None
        if row is None:
            return None
        return User(row.name, Role(row.role))

    def audit(self, user: str, action: str, target: str) -> None:
        """Record that ``user`` did ``action`` to ``target`` (an id, never personal data)."""
        with self.engine.begin() as conn:
            conn.execute(
                insert(web_audit).values(at=_now(), user=user, action=action, target=target)
            )

    def audit_log(self, *, limit: int = 100) -> list[AuditEntry]:
        with self.engine.connect() as conn:
            rows = conn.execute(select(web_audit).order_by(web_audit.c.id.desc()).limit(limit))
            return [AuditEntry(row.at, row.user, row.action, row.target) for row in rows]


class LoginLimiter:
    """At most ``attempts`` failed logins per key (user name, client address) within
    ``window`` seconds; a success does not reset the count of the other key."""

    def __init__(
        self,
        *,
        attempts: int = 5,
        window: float = 300.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.attempts = attempts
        self.window = window
        self._clock = clock
        self._failures: dict[str, deque[float]] = {}
        self._lock = threading.Lock()

    def _recent(self, key: str, now: float) -> deque[float]:
        stamps = self._failures.setdefault(key, deque())
        while stamps and stamps[0] <= now - self.window:
            stamps.popleft()
        return stamps

    def blocked(self, *keys: str) -> bool:
        now = self._clock()
        with self._lock:
            return any(len(self._recent(key, now)) >= self.attempts for key in keys)

    def failed(self, *keys: str) -> None:
        now = self._clock()
        with self._lock:
            for key in keys:
                self._recent(key, now).append(now)
