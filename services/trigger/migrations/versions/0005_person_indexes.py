"""A person's timers and firings found by an index, and dead timer entries vacuumed sooner.

A merge moves a person's timers and firings to the surviving profile and an erasure deletes them;
without an index on (tenant, profile) each such statement read the tenant's whole timers and
firings. Building them holds writes to these two tables back for a few seconds per million rows.

Every fired or cancelled timer leaves a dead entry in the pending-timers index (`timers_due`)
that the due-timer claim, run every 0.2 s, reads past until the table is vacuumed; by default
that waits for a fifth of the table to be dead, so `timers` is vacuumed at 1 % instead.
Figures: bench/README.md.

Revision ID: 0005
Revises: 0004
"""

from __future__ import annotations

from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.execute("CREATE INDEX timers_profile ON timers (tenant_id, profile_id)")
    op.execute("CREATE INDEX firings_profile ON firings (tenant_id, profile_id)")
    op.execute("ALTER TABLE timers SET (autovacuum_vacuum_scale_factor = 0.01)")


def downgrade() -> None:
    op.execute("ALTER TABLE timers RESET (autovacuum_vacuum_scale_factor)")
    op.execute("DROP INDEX firings_profile")
    op.execute("DROP INDEX timers_profile")
