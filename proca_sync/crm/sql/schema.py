"""The embedded CRM's tables (SQLAlchemy Core); one schema for SQLite and PostgreSQL."""

from __future__ import annotations

from sqlalchemy import (
    BigInteger,
    Boolean,
    Column,
    ForeignKey,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    UniqueConstraint,
)
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.types import JSON

SCHEMA_VERSION = 1

_JSON = JSON().with_variant(JSONB(), "postgresql")

metadata = MetaData()

meta_table = Table(
    "proca_meta",
    metadata,
    Column("key", String(64), primary_key=True),
    Column("value", Text, nullable=False),
)

contacts = Table(
    "contacts",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("admitted", Boolean, nullable=False, default=False),
    Column("email", Text),
    Column("first_name", Text),
    Column("last_name", Text),
    Column("postcode", Text),
    Column("country", Text),
    Column("fields", _JSON, nullable=False),
    Column("real", Boolean, nullable=False, default=False),
    Column("opted_in", Boolean, nullable=False, default=False),
    Column("opt_in_at", Text),
    Column("email_status", Text),
    Column("email_status_changed", Text),
    Column("email_status_stamp", Text, nullable=False, default=""),
    Column("subscribed", Boolean, nullable=False, default=False),
    Column("updated_at", Text, nullable=False),
)

contact_keys = Table(
    "contact_keys",
    metadata,
    Column("kind", String(8), primary_key=True),
    Column("value", String(512), primary_key=True),
    Column("contact_id", Integer, ForeignKey("contacts.id"), nullable=False, index=True),
)

actions = Table(
    "actions",
    metadata,
    Column("action_id", BigInteger, primary_key=True, autoincrement=False),
    Column("contact_id", Integer, ForeignKey("contacts.id"), nullable=False, index=True),
    Column("action_type", Text, nullable=False),
    Column("campaign", Text, nullable=False),
    Column("created_at", Text, nullable=False),
    Column("testing", Boolean, nullable=False),
    Column("version", Text, nullable=False),
    Column("data", _JSON, nullable=False),
)

campaigns = Table(
    "campaigns",
    metadata,
    Column("name", String(255), primary_key=True),
    Column("title", Text),
    Column("external_id", BigInteger),
    Column("stamp", Text, nullable=False),
    Column("data", _JSON, nullable=False),
)

consents = Table(
    "consents",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("contact_id", Integer, ForeignKey("contacts.id"), nullable=False, index=True),
    Column("action_id", BigInteger, nullable=False),
    # Not null, so the unique constraint also collapses repeats of "not asked" consents.
    Column("opt_in", String(5), nullable=False),
    Column("given_at", String(40), nullable=False),
    UniqueConstraint("action_id", "opt_in", "given_at", name="uq_consent_fact"),
)

email_status_history = Table(
    "email_status_history",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("contact_id", Integer, ForeignKey("contacts.id"), nullable=False, index=True),
    Column("status", Text),
    Column("changed_at", Text),
    Column("stamp", String(200), nullable=False),
    Column("source", Text, nullable=False),
    UniqueConstraint("contact_id", "stamp", name="uq_status_fact"),
)

applied_messages = Table(
    "applied_messages",
    metadata,
    Column("key", String(200), primary_key=True),
    Column("kind", String(32), nullable=False),
    Column("applied_at", Text, nullable=False),
)


_OPT_IN_TEXT = {True: "true", False: "false", None: "null"}
_OPT_IN_VALUES = {text: value for value, text in _OPT_IN_TEXT.items()}
