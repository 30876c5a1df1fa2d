"""On-site banners: the banners placed by web messages, the moments withdrawn, the web consents
followed, and the web fields of templates.

Revision ID: 0010
Revises: 0009
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects.postgresql import ARRAY

revision = "0010"
down_revision = "0009"
branch_labels = None
depends_on = None

TZ = sa.DateTime(timezone=True)


def upgrade() -> None:
    op.add_column("templates", sa.Column("placement", sa.Text, nullable=False, server_default=""))
    op.add_column("templates", sa.Column("banner_lifetime", sa.Interval, nullable=True))
    op.add_column("templates", sa.Column("link_url", sa.Text, nullable=False, server_default=""))
    op.create_table(
        "banners",
        sa.Column("tenant_id", sa.Text, nullable=False),
        sa.Column("message_id", sa.Text, nullable=False),
        sa.Column("profile_id", sa.Text, nullable=False),
        sa.Column("anonymous_ids", ARRAY(sa.Text), nullable=False),
        sa.Column("trigger_id", sa.Text, nullable=False),
        sa.Column("purpose", sa.Text, nullable=False),
        sa.Column("placement", sa.Text, nullable=False),
        sa.Column("title", sa.Text, nullable=False),
        sa.Column("body_text", sa.Text, nullable=False),
        sa.Column("link_url", sa.Text, nullable=False),
        sa.Column("priority", sa.Integer, nullable=False),
        sa.Column("placed_at", TZ, nullable=False),
        sa.Column("expire_at", TZ, nullable=False),
        sa.Column("withdrawn_at", TZ, nullable=True),
        sa.Column("withdraw_reason", sa.Text, nullable=False, server_default=""),
        sa.Column("shown_count", sa.BigInteger, nullable=False, server_default="0"),
        sa.Column("first_shown_at", TZ, nullable=True),
        sa.Column("requested_at", TZ, nullable=False),
        sa.PrimaryKeyConstraint("tenant_id", "message_id"),
    )
    op.create_table(
        "banner_withdrawals",
        sa.Column("tenant_id", sa.Text, nullable=False),
        sa.Column("profile_id", sa.Text, nullable=False),
        sa.Column("trigger_id", sa.Text, nullable=False),
        sa.Column("withdrawn_at", TZ, nullable=False),
        sa.Column("reason", sa.Text, nullable=False),
        sa.PrimaryKeyConstraint("tenant_id", "profile_id", "trigger_id"),
    )
    op.create_table(
        "banner_consents",
        sa.Column("tenant_id", sa.Text, nullable=False),
        sa.Column("profile_id", sa.Text, nullable=False),
        sa.Column("purpose", sa.Text, nullable=False),
        sa.Column("refused", sa.Boolean, nullable=False),
        sa.Column("changed_at", TZ, nullable=False),
        sa.PrimaryKeyConstraint("tenant_id", "profile_id", "purpose"),
    )
    op.create_index("banners_person", "banners", ["tenant_id", "profile_id", "trigger_id"])
    op.create_index(
        "banners_live", "banners", ["expire_at"], postgresql_where=sa.text("withdrawn_at IS NULL")
    )


def downgrade() -> None:
    op.drop_table("banner_consents")
    op.drop_table("banner_withdrawals")
    op.drop_table("banners")
    for column in ("link_url", "banner_lifetime", "placement"):
        op.drop_column("templates", column)
