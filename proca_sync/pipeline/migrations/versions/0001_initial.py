"""The first pipeline schema: orgs, keys, campaigns, pages, supporters, contacts, actions,
and the outbox of messages to publish.

Revision ID: 0001
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None

_Id = sa.BigInteger().with_variant(sa.Integer(), "sqlite")
_ts = sa.DateTime(timezone=True)


def upgrade() -> None:
    op.create_table(
        "orgs",
        sa.Column("id", _Id, primary_key=True, autoincrement=False),
        sa.Column("name", sa.String(255), nullable=False, unique=True),
        sa.Column("title", sa.String(255), nullable=False),
        sa.Column("custom_supporter_confirm", sa.Boolean, nullable=False),
        sa.Column("custom_action_confirm", sa.Boolean, nullable=False),
        sa.Column("custom_action_deliver", sa.Boolean, nullable=False),
        sa.Column("custom_event_deliver", sa.Boolean, nullable=False),
        sa.Column("supporter_confirm", sa.Boolean, nullable=False),
        sa.Column("email_backend", sa.Boolean, nullable=False),
        sa.Column("high_security", sa.Boolean, nullable=False),
        sa.Column("updated_at", _ts, nullable=False),
    )
    op.create_table(
        "org_keys",
        sa.Column("id", _Id, primary_key=True, autoincrement=True),
        sa.Column("org_id", sa.BigInteger, sa.ForeignKey("orgs.id"), nullable=False),
        sa.Column("public", sa.String(64), nullable=False),
        sa.Column("active", sa.Boolean, nullable=False),
        sa.Column("created_at", _ts, nullable=False),
    )
    op.create_index("ix_org_keys_org_id", "org_keys", ["org_id"])
    op.create_table(
        "api_keys",
        sa.Column("id", _Id, primary_key=True, autoincrement=True),
        sa.Column("org_id", sa.BigInteger, sa.ForeignKey("orgs.id"), nullable=False),
        sa.Column("digest", sa.String(64), nullable=False, unique=True),
        sa.Column("created_at", _ts, nullable=False),
    )
    op.create_table(
        "campaigns",
        sa.Column("id", _Id, primary_key=True, autoincrement=False),
        sa.Column("name", sa.String(255), nullable=False, unique=True),
        sa.Column("title", sa.String(255), nullable=False),
        sa.Column("org_id", sa.BigInteger, sa.ForeignKey("orgs.id"), nullable=False),
        sa.Column("external_id", sa.BigInteger, nullable=True),
        sa.Column("contact_schema", sa.String(32), nullable=False),
        sa.Column("supporter_confirm", sa.Boolean, nullable=True),
        sa.Column("action_confirm", sa.Boolean, nullable=True),
        sa.Column("force_delivery", sa.Boolean, nullable=False),
        sa.Column("config", sa.JSON, nullable=False),
        sa.Column("updated_at", _ts, nullable=False),
    )
    op.create_table(
        "pages",
        sa.Column("id", _Id, primary_key=True, autoincrement=False),
        sa.Column("name", sa.String(255), nullable=False, unique=True),
        sa.Column("locale", sa.String(16), nullable=False),
        sa.Column("campaign_id", sa.BigInteger, sa.ForeignKey("campaigns.id"), nullable=False),
        sa.Column("org_id", sa.BigInteger, sa.ForeignKey("orgs.id"), nullable=False),
        sa.Column("delivery", sa.Boolean, nullable=False),
        sa.Column("thank_you_template", sa.String(255), nullable=True),
        sa.Column("supporter_confirm_template", sa.String(255), nullable=True),
        sa.Column("location", sa.Text, nullable=True),
    )
    op.create_table(
        "supporters",
        sa.Column("id", _Id, primary_key=True, autoincrement=True),
        sa.Column("contact_ref", sa.String(64), nullable=False),
        sa.Column("campaign_id", sa.BigInteger, sa.ForeignKey("campaigns.id"), nullable=False),
        sa.Column("page_id", sa.BigInteger, sa.ForeignKey("pages.id"), nullable=False),
        sa.Column("org_id", sa.BigInteger, sa.ForeignKey("orgs.id"), nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("email_status", sa.String(16), nullable=True),
        sa.Column("email_status_changed", _ts, nullable=True),
        sa.Column("dupe_rank", sa.Integer, nullable=True),
        sa.Column("first_name", sa.String(255), nullable=True),
        sa.Column("email", sa.String(255), nullable=True),
        sa.Column("area", sa.String(64), nullable=True),
        sa.Column("created_at", _ts, nullable=False),
    )
    op.create_index("ix_supporters_ref_campaign", "supporters", ["contact_ref", "campaign_id"])
    op.create_index("ix_supporters_ref_org", "supporters", ["contact_ref", "org_id"])
    op.create_table(
        "contacts",
        sa.Column("id", _Id, primary_key=True, autoincrement=True),
        sa.Column("supporter_id", sa.BigInteger, sa.ForeignKey("supporters.id"), nullable=False),
        sa.Column("org_id", sa.BigInteger, sa.ForeignKey("orgs.id"), nullable=False),
        sa.Column("record", sa.JSON, nullable=True),
        sa.Column("personal_info", sa.JSON, nullable=True),
        sa.Column("opt_in", sa.Boolean, nullable=True),
        sa.Column("delivery", sa.Boolean, nullable=False),
        sa.Column("created_at", _ts, nullable=False),
    )
    op.create_index("ix_contacts_supporter_id", "contacts", ["supporter_id"])
    op.create_table(
        "actions",
        sa.Column("id", _Id, primary_key=True, autoincrement=True),
        sa.Column("action_type", sa.String(64), nullable=False),
        sa.Column("custom_fields", sa.JSON, nullable=False),
        sa.Column("donation", sa.JSON, nullable=True),
        sa.Column("tracking", sa.JSON, nullable=True),
        sa.Column("testing", sa.Boolean, nullable=False),
        sa.Column("with_consent", sa.Boolean, nullable=False),
        sa.Column("contact_ref", sa.String(64), nullable=False),
        sa.Column("supporter_id", sa.BigInteger, sa.ForeignKey("supporters.id"), nullable=True),
        sa.Column("page_id", sa.BigInteger, sa.ForeignKey("pages.id"), nullable=False),
        sa.Column("campaign_id", sa.BigInteger, sa.ForeignKey("campaigns.id"), nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("created_at", _ts, nullable=False),
    )
    op.create_index("ix_actions_supporter_id", "actions", ["supporter_id"])
    op.create_index("ix_actions_unlinked", "actions", ["contact_ref", "supporter_id"])
    op.create_table(
        "outbox",
        sa.Column("id", _Id, primary_key=True, autoincrement=True),
        sa.Column("exchange", sa.String(255), nullable=False),
        sa.Column("routing_key", sa.String(255), nullable=False),
        sa.Column("body", sa.LargeBinary, nullable=False),
        sa.Column("action_id", sa.BigInteger, nullable=True),
        sa.Column("created_at", _ts, nullable=False),
        sa.Column("published_at", _ts, nullable=True),
    )
    op.create_index("ix_outbox_pending", "outbox", ["published_at", "id"])


def downgrade() -> None:
    for table in (
        "outbox",
        "actions",
        "contacts",
        "supporters",
        "pages",
        "campaigns",
        "api_keys",
        "org_keys",
        "orgs",
    ):
        op.drop_table(table)
