"""Room on each profiles page for the next version of its rows.

Every ingested event rewrites its profile's row (last seen, counters, score). With full pages
the new version lands on another page and every index gets a new entry; with free room left on
the page PostgreSQL keeps it there (a HOT update) and touches no index. Applies to pages written
from now on.

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
    op.execute("ALTER TABLE profiles SET (fillfactor = 70)")


def downgrade() -> None:
    op.execute("ALTER TABLE profiles RESET (fillfactor)")
