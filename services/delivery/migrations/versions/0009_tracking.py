"""Engagement through a message's signed links (unsubscribe, opens, clicks) and the reports of it
still owed to profile.

Revision ID: 0009
Revises: 0008
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0009"
down_revision = "0008"
branch_labels = None
depends_on = None

TZ = sa.DateTime(timezone=True)


def _message_fk() -> sa.ForeignKeyConstraint:
    return sa.ForeignKeyConstraint(
        ["tenant_id", "message_id"], ["messages.tenant_id", "messages.message_id"], ondelete="CASCADE"
    )


def upgrade() -> None:
    op.create_table(
        "engagements",
        sa.Column("tenant_id", sa.Text, primary_key=True),
        sa.Column("message_id", sa.Text, primary_key=True),
        sa.Column("kind", sa.Text, primary_key=True),
        sa.Column("link", sa.Text, primary_key=True),
        sa.Column("count", sa.Integer, nullable=False),
        sa.Column("first_at", TZ, nullable=False),
        sa.Column("last_at", TZ, nullable=False),
        _message_fk(),
    )
    op.create_table(
        "profile_reports",
        sa.Column("id", sa.BigInteger, sa.Identity(), primary_key=True),
        sa.Column("tenant_id", sa.Text, nullable=False),
        sa.Column("message_id", sa.Text, nullable=False),
        sa.Column("kind", sa.Text, nullable=False),
        sa.Column("url", sa.Text, nullable=False),
        sa.Column("at", TZ, nullable=False),
        sa.Column("attempts", sa.Integer, nullable=False),
        sa.Column("next_at", TZ, nullable=False),
        sa.Column("last_error", sa.Text, nullable=False),
        _message_fk(),
    )
    op.create_index("profile_reports_due", "profile_reports", ["next_at"])
    op.create_index("profile_reports_message", "profile_reports", ["tenant_id", "message_id"])


def downgrade() -> None:
    op.drop_table("profile_reports")
    op.drop_table("engagements")
