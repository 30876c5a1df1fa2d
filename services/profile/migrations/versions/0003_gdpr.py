"""GDPR: hashed suppressions of erased people's identifiers, erasure requests and their progress.

Revision ID: 0003
Revises: 0002
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects.postgresql import ARRAY

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None

TZ = sa.DateTime(timezone=True)


def upgrade() -> None:
    op.create_table(
        "suppressions",
        sa.Column("tenant_id", sa.Text, nullable=False),
        sa.Column("kind", sa.Text, nullable=False),
        sa.Column("value_hash", sa.Text, nullable=False),
        sa.Column("created_at", TZ, nullable=False),
        sa.PrimaryKeyConstraint("tenant_id", "kind", "value_hash"),
    )
    op.create_table(
        "erasures",
        sa.Column("tenant_id", sa.Text, nullable=False),
        sa.Column("erasure_id", sa.Text, nullable=False),
        sa.Column("request_id", sa.Text, nullable=False),
        sa.Column("profile_id", sa.Text, nullable=False),
        sa.Column("state", sa.Text, nullable=False),
        sa.Column("services_done", ARRAY(sa.Text), nullable=False),
        sa.Column("requested_at", TZ, nullable=False),
        sa.Column("completed_at", TZ),
        sa.PrimaryKeyConstraint("tenant_id", "erasure_id"),
        sa.UniqueConstraint("tenant_id", "request_id", name="erasures_request_id"),
        sa.CheckConstraint("state IN ('pending', 'done')", name="erasures_state"),
    )


def downgrade() -> None:
    op.drop_table("erasures")
    op.drop_table("suppressions")
