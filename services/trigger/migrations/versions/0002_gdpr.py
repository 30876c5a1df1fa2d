"""GDPR: erased people, whose late events start nothing.

Revision ID: 0002
Revises: 0001
"""

from __future__ import annotations

from alembic import op

from relevans.kit.people import create_erased_profiles

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    create_erased_profiles(op)


def downgrade() -> None:
    op.drop_table("erased_profiles")
