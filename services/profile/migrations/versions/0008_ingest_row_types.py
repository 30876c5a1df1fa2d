"""Row types the ingest statement takes its events and profiles in: one array of rows per set
instead of an array per column. The driver checks each array element for being a nested array
(a Python-level check, ~0.2 µs); per row that is once, per column value it was once a value.
JSON goes as text and is cast in the statement.

Revision ID: 0008
Revises: 0007
"""

from __future__ import annotations

from alembic import op

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.execute(
        """CREATE TYPE ingest_event AS (
            event_id text, message_id text, profile_id text, type text, occurred_at timestamptz,
            anonymous_id text, customer_id text, email text, properties text, subject text,
            payload bytea)"""
    )
    op.execute(
        """CREATE TYPE ingest_profile AS (
            ctid tid, profile_id text, customer_id text, email text, last_seen_at timestamptz,
            traits text, counters text, last_seen_types text, score float8, score_at timestamptz)"""
    )


def downgrade() -> None:
    op.execute("DROP TYPE ingest_profile")
    op.execute("DROP TYPE ingest_event")
