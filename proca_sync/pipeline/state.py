"""The pipeline's own state: orgs, campaigns, pages, keys, supporters, actions, outbox.

SQLAlchemy Core tables (SQLite by default, PostgreSQL by URL). The schema is created and
upgraded by the Alembic migrations shipped in ``pipeline/migrations`` (:func:`migrate`);
the :data:`metadata` here mirrors the latest migration and is what the code queries.

Personal data lives in ``supporters`` (the clear fields the server keeps for e-mails) and
``contacts`` (the per-org record, clear or sealed): a SQLite file is created 0600.
"""

from __future__ import annotations

import os
from enum import StrEnum
from pathlib import Path

import orjson
from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    Column,
    DateTime,
    Engine,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Table,
    Text,
    create_engine,
    event,
    text,
)
from sqlalchemy.engine import make_url

__all__ = [
    "ActionStatus",
    "EmailStatusValue",
    "SupporterStatus",
    "actions",
    "api_keys",
    "campaigns",
    "contacts",
    "metadata",
    "migrate",
    "moderations",
    "open_engine",
    "org_keys",
    "orgs",
    "outbox",
    "pages",
    "supporters",
]

MIGRATIONS = Path(__file__).with_name("migrations")


class ActionStatus(StrEnum):
    NEW = "new"
    CONFIRMING = "confirming"
    REJECTED = "rejected"
    ACCEPTED = "accepted"
    DELIVERED = "delivered"
    REPEAT = "repeat"


class SupporterStatus(StrEnum):
    NEW = "new"
    CONFIRMING = "confirming"
    REJECTED = "rejected"
    ACCEPTED = "accepted"


class EmailStatusValue(StrEnum):
    DOUBLE_OPT_IN = "double_opt_in"
    BOUNCE = "bounce"
    BLOCKED = "blocked"
    SPAM = "spam"
    UNSUB = "unsub"
    INACTIVE = "inactive"


metadata = MetaData()
_ts = DateTime(timezone=True)
# Integer primary keys that autoincrement on both SQLite and PostgreSQL.
_Id = BigInteger().with_variant(Integer(), "sqlite")

orgs = Table(
    "orgs",
    metadata,
    Column("id", _Id, primary_key=True, autoincrement=False),
    Column("name", String(255), nullable=False, unique=True),
    Column("title", String(255), nullable=False),
    Column("custom_supporter_confirm", Boolean, nullable=False, default=False),
    Column("custom_action_confirm", Boolean, nullable=False, default=False),
    Column("custom_action_deliver", Boolean, nullable=False, default=False),
    Column("custom_event_deliver", Boolean, nullable=False, default=False),
    Column("supporter_confirm", Boolean, nullable=False, default=False),
    Column("email_backend", Boolean, nullable=False, default=False),
    Column("high_security", Boolean, nullable=False, default=False),
    Column("updated_at", _ts, nullable=False),
)

org_keys = Table(
    "org_keys",
    metadata,
    Column("id", _Id, primary_key=True, autoincrement=True),
    Column("org_id", BigInteger, ForeignKey("orgs.id"), nullable=False, index=True),
    Column("public", String(64), nullable=False),
    Column("active", Boolean, nullable=False, default=True),
    Column("created_at", _ts, nullable=False),
)

api_keys = Table(
    "api_keys",
    metadata,
    Column("id", _Id, primary_key=True, autoincrement=True),
    Column("org_id", BigInteger, ForeignKey("orgs.id"), nullable=False),
    Column("digest", String(64), nullable=False, unique=True),
    Column("created_at", _ts, nullable=False),
)

campaigns = Table(
    "campaigns",
    metadata,
    Column("id", _Id, primary_key=True, autoincrement=False),
    Column("name", String(255), nullable=False, unique=True),
    Column("title", String(255), nullable=False),
    Column("org_id", BigInteger, ForeignKey("orgs.id"), nullable=False),
    Column("external_id", BigInteger, nullable=True),
    Column("contact_schema", String(32), nullable=False, default="basic"),
    Column("supporter_confirm", Boolean, nullable=True),
    Column("action_confirm", Boolean, nullable=True),
    Column("force_delivery", Boolean, nullable=False, default=False),
    Column("config", JSON, nullable=False),
    Column("updated_at", _ts, nullable=False),
)

pages = Table(
    "pages",
    metadata,
    Column("id", _Id, primary_key=True, autoincrement=False),
    Column("name", String(255), nullable=False, unique=True),
    Column("locale", String(16), nullable=False),
    Column("campaign_id", BigInteger, ForeignKey("campaigns.id"), nullable=False),
    Column("org_id", BigInteger, ForeignKey("orgs.id"), nullable=False),
    Column("delivery", Boolean, nullable=False, default=True),
    Column("thank_you_template", String(255), nullable=True),
    Column("supporter_confirm_template", String(255), nullable=True),
    Column("location", Text, nullable=True),
)

supporters = Table(
    "supporters",
    metadata,
    Column("id", _Id, primary_key=True, autoincrement=True),
    Column("contact_ref", String(64), nullable=False),
    Column("campaign_id", BigInteger, ForeignKey("campaigns.id"), nullable=False),
    Column("page_id", BigInteger, ForeignKey("pages.id"), nullable=False),
    Column("org_id", BigInteger, ForeignKey("orgs.id"), nullable=False),
    Column("status", String(16), nullable=False),
    Column("email_status", String(16), nullable=True),
    Column("email_status_changed", _ts, nullable=True),
    Column("dupe_rank", Integer, nullable=True),
    # Clear copies kept for e-mail sending; e-mail and last name are cleared on delivery.
    Column("first_name", String(255), nullable=True),
    Column("email", String(255), nullable=True),
    Column("area", String(64), nullable=True),
    Column("created_at", _ts, nullable=False),
    Index("ix_supporters_ref_campaign", "contact_ref", "campaign_id"),
    Index("ix_supporters_ref_org", "contact_ref", "org_id"),
)

contacts = Table(
    "contacts",
    metadata,
    Column("id", _Id, primary_key=True, autoincrement=True),
    Column("supporter_id", BigInteger, ForeignKey("supporters.id"), nullable=False, index=True),
    Column("org_id", BigInteger, ForeignKey("orgs.id"), nullable=False),
    # Exactly one of: the clear record (JSON) or the sealed personalInfo object.
    Column("record", JSON, nullable=True),
    Column("personal_info", JSON, nullable=True),
    Column("opt_in", Boolean, nullable=True),
    Column("delivery", Boolean, nullable=False),
    Column("created_at", _ts, nullable=False),
)

actions = Table(
    "actions",
    metadata,
    Column("id", _Id, primary_key=True, autoincrement=True),
    Column("action_type", String(64), nullable=False),
    Column("custom_fields", JSON, nullable=False),
    Column("donation", JSON, nullable=True),
    Column("tracking", JSON, nullable=True),
    Column("testing", Boolean, nullable=False, default=False),
    Column("with_consent", Boolean, nullable=False),
    Column("contact_ref", String(64), nullable=False),
    Column("supporter_id", BigInteger, ForeignKey("supporters.id"), nullable=True, index=True),
    Column("page_id", BigInteger, ForeignKey("pages.id"), nullable=False),
    Column("campaign_id", BigInteger, ForeignKey("campaigns.id"), nullable=False),
    Column("status", String(16), nullable=False),
    Column("created_at", _ts, nullable=False),
    Index("ix_actions_unlinked", "contact_ref", "supporter_id"),
    # The moderation inbox lists the actions waiting in `confirming`: a partial index holds
    # only those, so it costs the intake nothing for the others.
    Index(
        "ix_actions_confirming",
        "id",
        sqlite_where=text("status = 'confirming'"),
        postgresql_where=text("status = 'confirming'"),
    ),
)

moderations = Table(
    "moderations",
    metadata,
    # One row per moderated action, written in the transaction that decided it: the key
    # makes a second decision of the same action impossible, and the row says who won.
    Column("action_id", BigInteger, ForeignKey("actions.id"), primary_key=True,
           autoincrement=False),
    Column("decision", String(16), nullable=False),
    Column("decided_by", String(255), nullable=False),
    Column("decided_at", _ts, nullable=False),
    Index("ix_moderations_decided_at", "decided_at"),
)

outbox = Table(
    "outbox",
    metadata,
    Column("id", _Id, primary_key=True, autoincrement=True),
    Column("exchange", String(255), nullable=False),
    Column("routing_key", String(255), nullable=False),
    Column("body", LargeBinary, nullable=False),
    Column("action_id", BigInteger, nullable=True),
    Column("created_at", _ts, nullable=False),
    Column("published_at", _ts, nullable=True),
    Index("ix_outbox_pending", "published_at", "id"),
)


def _sqlite_file(url: str) -> Path | None:
    parsed = make_url(url)
    if parsed.get_backend_name() != "sqlite" or parsed.database in (None, "", ":memory:"):
        return None
    return Path(str(parsed.database))


def open_engine(url: str) -> Engine:
    """An engine for ``url``; a new SQLite file is created 0600 and runs in WAL mode."""
    path = _sqlite_file(url)
    if path is not None and not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_CREAT | os.O_WRONLY, 0o600)
        os.close(fd)
    if make_url(url).get_backend_name() == "postgresql" and "+" not in url.split("://", 1)[0]:
        url = url.replace("postgresql://", "postgresql+psycopg://", 1)
    engine = create_engine(
        url,
        hide_parameters=True,  # SQL errors must not carry personal data into logs
        json_serializer=lambda value: orjson.dumps(value).decode(),
        json_deserializer=orjson.loads,
    )
    if path is not None:

        @event.listens_for(engine, "connect")
        def _pragmas(dbapi_connection: object, _record: object) -> None:
            cursor = dbapi_connection.cursor()  # type: ignore[attr-defined]
            cursor.execute("PRAGMA journal_mode=WAL")
            cursor.execute("PRAGMA synchronous=NORMAL")
            cursor.execute("PRAGMA busy_timeout=10000")
            cursor.execute("PRAGMA foreign_keys=ON")
            cursor.close()

    return engine


def migrate(engine: Engine, revision: str = "head") -> None:
    """Bring the database to ``revision`` with the shipped Alembic migrations."""
    from alembic import command
    from alembic.config import Config

    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    with engine.begin() as connection:
        config.attributes["connection"] = connection
        command.upgrade(config, revision)
