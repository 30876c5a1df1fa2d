"""Messages updated in place: `messages` leaves a quarter of each page free (fillfactor 75).

A message is written three times on its way out (inserted pending, claimed `sending`, its
outcome); none of those updates changes an indexed column except a retry's `next_attempt_at`, so
with room on the page each is a heap-only (HOT) update and writes none of the table's five
indexes again; at 100, pages filled as messages were inserted and every claim and outcome wrote
them all. Figures: bench/README.md, "Delivery, second pass".

Revision ID: 0011
Revises: 0010
"""

from __future__ import annotations

from alembic import op

revision = "0011"
down_revision = "0010"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.execute("ALTER TABLE messages SET (fillfactor = 75)")


def downgrade() -> None:
    op.execute("ALTER TABLE messages RESET (fillfactor)")
