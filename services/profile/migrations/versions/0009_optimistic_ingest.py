"""Ingest without locks: a batch whose profiles all exist reads them unlocked and writes in one
statement that fails when one of them changed since (SQLSTATE 40001), so the batch runs again
under locks. The profile rows carry the version read (`xmin`, with `ctid`), and
`ingest_profile_changed()` raises the failure from inside the statement.

Revision ID: 0009
Revises: 0008
"""

from __future__ import annotations

from alembic import op

revision = "0009"
down_revision = "0008"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.execute("ALTER TYPE ingest_profile ADD ATTRIBUTE row_xmin xid")
    op.execute(
        """CREATE FUNCTION ingest_profile_changed() RETURNS bigint LANGUAGE plpgsql VOLATILE AS $$
        BEGIN
            RAISE EXCEPTION 'a profile changed since the batch read it'
                USING ERRCODE = 'serialization_failure';
        END $$"""
    )


def downgrade() -> None:
    op.execute("DROP FUNCTION ingest_profile_changed()")
    op.execute("ALTER TYPE ingest_profile DROP ATTRIBUTE row_xmin")
