"""Moderation decisions: who accepted or rejected a waiting action, and when; a partial
index over the actions waiting in ``confirming`` (the console's moderation inbox).

Revision ID: 0002
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None

_ts = sa.DateTime(timezone=True)
WAITING = sa.text("status = 'confirming'")


def upgrade() -> None:
    op.create_table(
        "moderations",
        sa.Column("action_id", sa.BigInteger, sa.ForeignKey("actions.id"), primary_key=True,
                  autoincrement=False),
        sa.Column("decision", sa.String(16), nullable=False),
        sa.Column("decided_by", sa.String(255), nullable=False),
        sa.Column("decided_at", _ts, nullable=False),
    )
    op.create_index("ix_moderations_decided_at", "moderations", ["decided_at"])
    op.create_index(
        "ix_actions_confirming", "actions", ["id"], sqlite_where=WAITING, postgresql_where=WAITING
    )


def downgrade() -> None:
    op.drop_index("ix_actions_confirming", table_name="actions")
    op.drop_table("moderations")
