"""Messages record the segments an SMS was sent in (`sms_segments`, 0 for other channels).

Revision ID: 0005
Revises: 0004
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("messages", sa.Column("sms_segments", sa.Integer, nullable=False, server_default="0"))


def downgrade() -> None:
    op.drop_column("messages", "sms_segments")
