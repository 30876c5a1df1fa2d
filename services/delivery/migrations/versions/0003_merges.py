"""Profile merges: a merged-away profile id stands for its survivor.

Revision ID: 0003
Revises: 0002
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None

TZ = sa.DateTime(timezone=True)


def upgrade() -> None:
    op.create_table(
        "merged_profiles",
        sa.Column("tenant_id", sa.Text, nullable=False),
        sa.Column("profile_id", sa.Text, nullable=False),
        sa.Column("surviving_profile_id", sa.Text, nullable=False),
        sa.Column("merged_at", TZ, nullable=False),
        sa.PrimaryKeyConstraint("tenant_id", "profile_id"),
    )
    op.create_index("merged_profiles_survivor", "merged_profiles", ["tenant_id", "surviving_profile_id"])


def downgrade() -> None:
    op.drop_table("merged_profiles")
