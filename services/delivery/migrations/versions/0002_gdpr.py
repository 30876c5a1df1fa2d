"""GDPR: hashed addresses of erased people, never sent to again; erased profile ids.

Revision ID: 0002
Revises: 0001
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

from relevans.kit.people import create_erased_profiles

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None

TZ = sa.DateTime(timezone=True)


def upgrade() -> None:
    op.create_table(
        "suppressions",
        sa.Column("tenant_id", sa.Text, nullable=False),
        sa.Column("value_hash", sa.Text, nullable=False),
        sa.Column("reason", sa.Text, nullable=False),
        sa.Column("created_at", TZ, nullable=False),
        sa.PrimaryKeyConstraint("tenant_id", "value_hash"),
    )
    create_erased_profiles(op)


def downgrade() -> None:
    op.drop_table("erased_profiles")
    op.drop_table("suppressions")
