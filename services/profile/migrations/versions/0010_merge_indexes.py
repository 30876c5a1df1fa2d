"""A merged profile's shadows and merge records found by an index.

A merge marks the profiles merged into the merged-away one as merged into the survivor, and
ExportProfile and EraseProfile list a person's shadow profiles and merge records; with no index
on `merged_into` nor on `merges.from_profile_id` each such statement read the tenant's every
profile or merge (measured with 600,000 profiles: 116-186 ms per merge, 54-63 ms per export;
0.1 ms with the indexes). Only merged profiles are indexed, as most never are; ingest never
changes `merged_into`, so its updates of a profile's row stay HOT. Building the indexes holds
writes to these two tables back for a few seconds per million rows.

Revision ID: 0010
Revises: 0009
"""

from __future__ import annotations

from alembic import op

revision = "0010"
down_revision = "0009"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.execute(
        "CREATE INDEX profiles_merged_into ON profiles (tenant_id, merged_into) WHERE merged_into IS NOT NULL"
    )
    op.execute("CREATE INDEX merges_from ON merges (tenant_id, from_profile_id)")


def downgrade() -> None:
    op.execute("DROP INDEX merges_from")
    op.execute("DROP INDEX profiles_merged_into")
