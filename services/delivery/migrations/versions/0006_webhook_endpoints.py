"""Webhook endpoints (where webhook messages are posted, with their signing secret), and the
endpoint of each webhook template.

Revision ID: 0006
Revises: 0005
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None

TZ = sa.DateTime(timezone=True)


def upgrade() -> None:
    op.create_table(
        "webhook_endpoints",
        sa.Column("tenant_id", sa.Text, nullable=False),
        sa.Column("endpoint_id", sa.Text, nullable=False),
        sa.Column("url", sa.Text, nullable=False),
        sa.Column("secret", sa.Text, nullable=False),
        sa.Column("timeout_ms", sa.Integer, nullable=False),
        sa.Column("created_at", TZ, nullable=False),
        sa.Column("updated_at", TZ, nullable=False),
        sa.PrimaryKeyConstraint("tenant_id", "endpoint_id"),
    )
    op.add_column("templates", sa.Column("webhook_endpoint_id", sa.Text, nullable=False, server_default=""))


def downgrade() -> None:
    op.drop_column("templates", "webhook_endpoint_id")
    op.drop_table("webhook_endpoints")
