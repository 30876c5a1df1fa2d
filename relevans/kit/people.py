"""The people tables every service that follows profiles keeps (trigger and delivery today).

- `erased_profiles`: erased people by their random profile id (nothing personal), so work for one
  that arrives after the erasure (the event, request and erasure streams are consumed
  independently) is dropped.
- `merged_profiles`: a merged-away id and the profile it stands for now. Chains are flattened (an
  id merged into one that is merged later points to the last survivor), so one lookup resolves
  any id.

The `create_*` functions are what the services' migrations ran to make these tables. They are
history: never change them; a later change of a table is a new migration in each service.
"""

from __future__ import annotations

from typing import Any

import sqlalchemy as sa

_TZ = sa.DateTime(timezone=True)


def erased_profiles_table(metadata: sa.MetaData) -> sa.Table:
    return sa.Table(
        "erased_profiles",
        metadata,
        sa.Column("tenant_id", sa.Text, primary_key=True),
        sa.Column("profile_id", sa.Text, primary_key=True),
        sa.Column("erased_at", _TZ, nullable=False),
    )


def merged_profiles_table(metadata: sa.MetaData) -> sa.Table:
    return sa.Table(
        "merged_profiles",
        metadata,
        sa.Column("tenant_id", sa.Text, primary_key=True),
        sa.Column("profile_id", sa.Text, primary_key=True),
        sa.Column("surviving_profile_id", sa.Text, nullable=False),
        sa.Column("merged_at", _TZ, nullable=False),
        sa.Index("merged_profiles_survivor", "tenant_id", "surviving_profile_id"),
    )


def create_erased_profiles(op: Any) -> None:
    """Migration step (alembic `op`): the `erased_profiles` table."""
    op.create_table(
        "erased_profiles",
        sa.Column("tenant_id", sa.Text, nullable=False),
        sa.Column("profile_id", sa.Text, nullable=False),
        sa.Column("erased_at", _TZ, nullable=False),
        sa.PrimaryKeyConstraint("tenant_id", "profile_id"),
    )


def create_merged_profiles(op: Any) -> None:
    """Migration step (alembic `op`): the `merged_profiles` table and its index of survivors."""
    op.create_table(
        "merged_profiles",
        sa.Column("tenant_id", sa.Text, nullable=False),
        sa.Column("profile_id", sa.Text, nullable=False),
        sa.Column("surviving_profile_id", sa.Text, nullable=False),
        sa.Column("merged_at", _TZ, nullable=False),
        sa.PrimaryKeyConstraint("tenant_id", "profile_id"),
    )
    op.create_index("merged_profiles_survivor", "merged_profiles", ["tenant_id", "surviving_profile_id"])
