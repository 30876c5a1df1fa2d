"""Profiles, identities, events, merges, consent ledger and current view, outbox.

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
    """One migration step creating the initial schema, applied as one unit (history: not restructured)."""
    op.create_table(
        "profiles",
        sa.Column("tenant_id", sa.Text, nullable=False),
        sa.Column("profile_id", sa.Text, nullable=False),
        sa.Column("customer_id", sa.Text),
        sa.Column("email", sa.Text),
        sa.Column("first_name", sa.Text),
        sa.Column("merged_into", sa.Text),
        sa.Column("created_at", TZ, nullable=False),
        sa.Column("updated_at", TZ, nullable=False),
        sa.Column("last_seen_at", TZ),
        sa.PrimaryKeyConstraint("tenant_id", "profile_id"),
    )
    op.create_table(
        "identities",
        sa.Column("tenant_id", sa.Text, nullable=False),
        sa.Column("kind", sa.Text, nullable=False),
        sa.Column("value", sa.Text, nullable=False),
        sa.Column("profile_id", sa.Text, nullable=False),
        sa.Column("created_at", TZ, nullable=False),
        sa.PrimaryKeyConstraint("tenant_id", "kind", "value"),
        sa.CheckConstraint("kind IN ('anonymous', 'customer_id', 'email')", name="identities_kind"),
    )
    op.create_index("identities_profile", "identities", ["tenant_id", "profile_id"])
    op.create_table(
        "events",
        sa.Column("tenant_id", sa.Text, nullable=False),
        sa.Column("event_id", sa.Text, nullable=False),
        sa.Column("message_id", sa.Text, nullable=False),
        sa.Column("profile_id", sa.Text, nullable=False),
        sa.Column("type", sa.Text, nullable=False),
        sa.Column("occurred_at", TZ, nullable=False),
        sa.Column("received_at", TZ, nullable=False),
        sa.Column("anonymous_id", sa.Text),
        sa.Column("customer_id", sa.Text),
        sa.Column("email", sa.Text),
        sa.Column("properties", JSONB, nullable=False),
        sa.PrimaryKeyConstraint("tenant_id", "event_id"),
        sa.UniqueConstraint("tenant_id", "message_id", name="events_message_id"),
    )
    op.create_index("events_profile", "events", ["tenant_id", "profile_id", "occurred_at"])
    op.create_table(
        "merges",
        sa.Column("tenant_id", sa.Text, nullable=False),
        sa.Column("merge_id", sa.BigInteger, sa.Identity(), nullable=False),
        sa.Column("from_profile_id", sa.Text, nullable=False),
        sa.Column("to_profile_id", sa.Text, nullable=False),
        sa.Column("anonymous_id", sa.Text),
        sa.Column("source", sa.Text, nullable=False),
        sa.Column("merged_at", TZ, nullable=False),
        sa.PrimaryKeyConstraint("tenant_id", "merge_id"),
    )
    op.create_index("merges_to", "merges", ["tenant_id", "to_profile_id"])
    op.create_table(
        "consent_ledger",
        sa.Column("tenant_id", sa.Text, nullable=False),
        sa.Column("entry_id", sa.BigInteger, sa.Identity(), nullable=False),
        sa.Column("profile_id", sa.Text, nullable=False),
        sa.Column("purpose", sa.Text, nullable=False),
        sa.Column("channel", sa.Text, nullable=False),
        sa.Column("status", sa.Text, nullable=False),
        sa.Column("source", sa.Text, nullable=False),
        sa.Column("evidence", sa.Text, nullable=False),
        sa.Column("recorded_at", TZ, nullable=False),
        sa.PrimaryKeyConstraint("tenant_id", "entry_id"),
    )
    op.create_index("consent_ledger_profile", "consent_ledger", ["tenant_id", "profile_id"])
    op.create_table(
        "consents",
        sa.Column("tenant_id", sa.Text, nullable=False),
        sa.Column("profile_id", sa.Text, nullable=False),
        sa.Column("purpose", sa.Text, nullable=False),
        sa.Column("channel", sa.Text, nullable=False),
        sa.Column("status", sa.Text, nullable=False),
        sa.Column("source", sa.Text, nullable=False),
        sa.Column("evidence", sa.Text, nullable=False),
        sa.Column("recorded_at", TZ, nullable=False),
        sa.PrimaryKeyConstraint("tenant_id", "profile_id", "purpose", "channel"),
    )
    create_first_outbox(op)


def downgrade() -> None:
    for table in ("outbox", "consents", "consent_ledger", "merges", "events", "identities", "profiles"):
        op.drop_table(table)
