"""Trigger definitions, durable timers, per-profile trigger state, firings, outbox.

Revision ID: 0001
Revises:
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects.postgresql import JSONB

from relevans.kit.outbox import create_first_outbox

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None

TZ = sa.DateTime(timezone=True)


def upgrade() -> None:
    op.create_table(
        "triggers",
        sa.Column("tenant_id", sa.Text, nullable=False),
        sa.Column("trigger_id", sa.Text, nullable=False),
        sa.Column("display_name", sa.Text, nullable=False),
        sa.Column("start_event_type", sa.Text, nullable=False),
        sa.Column("cancel_event_type", sa.Text, nullable=False),
        sa.Column("delay", sa.Interval, nullable=False),
        sa.Column("channel", sa.Text, nullable=False),
        sa.Column("purpose", sa.Text, nullable=False),
        sa.Column("template_id", sa.Text, nullable=False),
        sa.Column("created_at", TZ, nullable=False),
        sa.PrimaryKeyConstraint("tenant_id", "trigger_id"),
    )
    op.create_table(
        "timers",
        sa.Column("tenant_id", sa.Text, nullable=False),
        sa.Column("trigger_id", sa.Text, nullable=False),
        sa.Column("profile_id", sa.Text, nullable=False),
        sa.Column("occurrence", sa.Text, nullable=False),
        sa.Column("started_at", TZ, nullable=False),
        sa.Column("due_at", TZ, nullable=False),
        sa.Column("status", sa.Text, nullable=False),
        sa.Column("variables", JSONB, nullable=False),
        sa.Column("created_at", TZ, nullable=False),
        sa.Column("fired_at", TZ),
        sa.Column("cancelled_at", TZ),
        sa.Column("reason", sa.Text),
        sa.PrimaryKeyConstraint("tenant_id", "trigger_id", "profile_id", "occurrence"),
        sa.CheckConstraint("status IN ('pending', 'fired', 'cancelled', 'superseded')", name="timers_status"),
    )
    op.create_index("timers_due", "timers", ["due_at"], postgresql_where=sa.text("status = 'pending'"))
    op.create_index(
        "timers_pending_profile",
        "timers",
        ["tenant_id", "profile_id", "trigger_id"],
        postgresql_where=sa.text("status = 'pending'"),
    )
    op.create_table(
        "trigger_states",
        sa.Column("tenant_id", sa.Text, nullable=False),
        sa.Column("trigger_id", sa.Text, nullable=False),
        sa.Column("profile_id", sa.Text, nullable=False),
        sa.Column("last_start_at", TZ),
        sa.Column("last_start_occurrence", sa.Text),
        sa.Column("last_cancel_at", TZ),
        sa.Column("updated_at", TZ, nullable=False),
        sa.PrimaryKeyConstraint("tenant_id", "trigger_id", "profile_id"),
    )
    op.create_index("trigger_states_profile", "trigger_states", ["tenant_id", "profile_id"])
    op.create_table(
        "firings",
        sa.Column("tenant_id", sa.Text, nullable=False),
        sa.Column("trigger_id", sa.Text, nullable=False),
        sa.Column("profile_id", sa.Text, nullable=False),
        sa.Column("occurrence", sa.Text, nullable=False),
        sa.Column("idempotency_key", sa.Text, nullable=False),
        sa.Column("fired_at", TZ, nullable=False),
        sa.PrimaryKeyConstraint("tenant_id", "trigger_id", "profile_id", "occurrence"),
    )
    create_first_outbox(op)


def downgrade() -> None:
    for table in ("outbox", "firings", "trigger_states", "timers", "triggers"):
        op.drop_table(table)
