"""Cheaper writes on the event path: trigger states updated in place, the trace's age index small.

- `trigger_states` leaves a third of each page free (fillfactor 70): a state's update then fits
  the page its row is on and is a heap-only (HOT) update, which writes no index entries; at 100,
  most pages were full and every update wrote both indexes again.
- `decisions_age`, which only the retention's pruning reads, becomes a BRIN index: rows arrive
  roughly in decision order, so a few block ranges find the old ones, and keeping it up costs
  next to nothing per row instead of a B-tree insertion for every decision.

Figures: bench/README.md, "Trigger".

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
    op.execute("ALTER TABLE trigger_states SET (fillfactor = 70)")
    op.execute("DROP INDEX decisions_age")
    op.execute("CREATE INDEX decisions_age ON decisions USING brin (decided_at)")


def downgrade() -> None:
    op.execute("DROP INDEX decisions_age")
    op.execute("CREATE INDEX decisions_age ON decisions (decided_at)")
    op.execute("ALTER TABLE trigger_states RESET (fillfactor)")
