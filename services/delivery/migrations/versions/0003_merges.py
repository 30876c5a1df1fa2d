"""Profile merges: a merged-away profile id stands for its survivor.

Revision ID: 0003
Revises: 0002
"""

from __future__ import annotations

from alembic import op

from relevans.kit.people import create_merged_profiles

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    create_merged_profiles(op)


def downgrade() -> None:
    op.drop_table("merged_profiles")
