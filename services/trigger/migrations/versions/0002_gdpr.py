"""GDPR: erased people, whose late events start nothing.

Revision ID: 0002
Revises: 0001
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None

TZ = sa.DateTime(timezone=True)


def upgrade() -> None:
    op.create_table(
        "erased_profiles",
        sa.Column("tenant_id", sa.Text, nullable=False),
        sa.Column("profile_id", sa.Text, nullable=False),
        sa.Column("erased_at", TZ, nullable=False),
        sa.PrimaryKeyConstraint("tenant_id", "profile_id"),
    )


def downgrade() -> None:
    op.drop_table("erased_profiles")
