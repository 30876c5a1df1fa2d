"""Bulk import: last name and phone on profiles, tags, traits with a source.

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
    op.add_column("profiles", sa.Column("last_name", sa.Text))
    op.add_column("profiles", sa.Column("phone", sa.Text))
    op.create_table(
        "profile_tags",
        sa.Column("tenant_id", sa.Text, nullable=False),
        sa.Column("profile_id", sa.Text, nullable=False),
        sa.Column("tag", sa.Text, nullable=False),
        sa.Column("created_at", TZ, nullable=False),
        sa.PrimaryKeyConstraint("tenant_id", "profile_id", "tag"),
    )
    op.create_index("profile_tags_tag", "profile_tags", ["tenant_id", "tag"])
    op.create_table(
        "profile_traits",
        sa.Column("tenant_id", sa.Text, nullable=False),
        sa.Column("profile_id", sa.Text, nullable=False),
        sa.Column("name", sa.Text, nullable=False),
        sa.Column("source", sa.Text, nullable=False),
        sa.Column("value", sa.Text, nullable=False),
        sa.Column("updated_at", TZ, nullable=False),
        sa.PrimaryKeyConstraint("tenant_id", "profile_id", "name", "source"),
        sa.CheckConstraint("source IN ('declared', 'backend', 'behavioural')", name="profile_traits_source"),
    )


def downgrade() -> None:
    op.drop_table("profile_traits")
    op.drop_table("profile_tags")
    op.drop_column("profiles", "phone")
    op.drop_column("profiles", "last_name")
