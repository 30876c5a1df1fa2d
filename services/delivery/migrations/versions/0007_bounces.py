"""Durable retries and hard bounces: a message's next attempt is a row (`next_attempt_at`), the
`bounced` status, and suppressions per channel (an address that bounced on email is suppressed
for email only; an erased person's identifiers, channel "", for every channel).

Revision ID: 0007
Revises: 0006
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None

TZ = sa.DateTime(timezone=True)
STATUSES_BEFORE = ("pending", "sending", "sent", "suppressed", "failed")
STATUSES_AFTER = (*STATUSES_BEFORE, "bounced")


def _status_check(statuses: tuple[str, ...]) -> None:
    op.drop_constraint("messages_status", "messages", type_="check")
    op.create_check_constraint(
        "messages_status", "messages", "status IN (" + ", ".join(f"'{s}'" for s in statuses) + ")"
    )


def upgrade() -> None:
    _status_check(STATUSES_AFTER)
    op.add_column("messages", sa.Column("next_attempt_at", TZ, nullable=True))
    # Only scheduled retries carry a time, so the index stays as small as the retry backlog and a
    # first attempt's status changes stay HOT updates.
    op.create_index(
        "messages_next_attempt",
        "messages",
        ["next_attempt_at"],
        postgresql_where=sa.text("next_attempt_at IS NOT NULL"),
    )
    op.add_column("suppressions", sa.Column("channel", sa.Text, nullable=False, server_default=sa.text("''")))
    op.drop_constraint("suppressions_pkey", "suppressions", type_="primary")
    op.create_primary_key("suppressions_pkey", "suppressions", ["tenant_id", "value_hash", "channel"])


def downgrade() -> None:
    op.execute("DELETE FROM suppressions WHERE channel <> ''")
    op.drop_constraint("suppressions_pkey", "suppressions", type_="primary")
    op.drop_column("suppressions", "channel")
    op.create_primary_key("suppressions_pkey", "suppressions", ["tenant_id", "value_hash"])
    op.drop_index("messages_next_attempt", table_name="messages")
    op.drop_column("messages", "next_attempt_at")
    op.execute("UPDATE messages SET status = 'failed' WHERE status = 'bounced'")
    _status_check(STATUSES_BEFORE)
