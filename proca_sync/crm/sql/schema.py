"""The embedded CRM's tables (SQLAlchemy Core); one schema for SQLite and PostgreSQL."""

from __future__ import annotations

from sqlalchemy import (
    BigInteger,
    Boolean,
    Column,
    Float,
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

SCHEMA_VERSION = 2
"""1: the CRM tables. 2: the change log, erasure tombstones and the destinations' state
(an existing database is upgraded in place by :func:`proca_sync.crm.sql.changelog.upgrade`)."""

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

# ---- version 2: the change log (outbox), erasure, the destinations' state ----------------

changes = Table(
    "changes",
    metadata,
    # Commit-ordered on PostgreSQL (see changelog.py); SQLite serialises writers anyway.
    Column("seq", BigInteger().with_variant(Integer, "sqlite"), primary_key=True),
    # contact | action | campaign | erasure | merge (a contact merged away) | retired
    Column("kind", String(16), nullable=False),
    # ledger id, action id, campaign name, tombstone id, "<merged-away id>:<merged into>"
    Column("entity", String(255), nullable=False),
    Column("at", Float, nullable=False),  # epoch seconds of the commit (for the lag)
    sqlite_autoincrement=True,
)

tombstones = Table(
    "tombstones",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("erased_at", Text, nullable=False),
    # Kept only until every destination that erases has done it, then scrubbed (NULL, []).
    Column("email", Text),
    Column("refs", _JSON, nullable=False),
)

tombstone_keys = Table(
    "tombstone_keys",
    metadata,
    Column("hash", String(64), primary_key=True),  # keyed hash of an e-mail or a ref
    Column("tombstone_id", Integer, ForeignKey("tombstones.id"), nullable=False),
    Column("erased_at", Text, nullable=False),
)

destinations = Table(
    "destinations",
    metadata,
    Column("name", String(255), primary_key=True),
    Column("cursor", BigInteger, nullable=False),
    Column("last_success", Float),
    Column("lease_owner", String(128)),
    Column("lease_until", Float),
)

# kind: contact, action, erasure, address (hash of the address a contact was pushed
# under), campaign (digest of what was projected of it).
destination_items = Table(
    "destination_items",
    metadata,
    Column("destination", String(255), primary_key=True),
    Column("kind", String(16), primary_key=True),
    Column("entity", String(255), primary_key=True),
    Column("version", BigInteger, nullable=False),
    Column("digest", String(64), nullable=False),
)

destination_parked = Table(
    "destination_parked",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("destination", String(255), nullable=False, index=True),
    Column("kind", String(16), nullable=False),
    Column("entity", String(255), nullable=False),
    Column("version", BigInteger, nullable=False),
    Column("code", String(128), nullable=False),
    Column("message", Text, nullable=False),
    Column("parked_at", Float, nullable=False),
    UniqueConstraint("destination", "kind", "entity", name="uq_destination_parked"),
)


_OPT_IN_TEXT = {True: "true", False: "false", None: "null"}
_OPT_IN_VALUES = {text: value for value, text in _OPT_IN_TEXT.items()}
