"""Enrichment and segments: typed traits with the effective view on the profile, counters,
last seen per event type, lead score, the tenant's definitions, segments and their members.

Revision ID: 0004
Revises: 0003
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects.postgresql import ARRAY, JSONB

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None

TZ = sa.DateTime(timezone=True)
EMPTY = sa.text("'{}'::jsonb")


def upgrade() -> None:
    op.execute("ALTER TABLE profile_traits ALTER COLUMN value TYPE jsonb USING to_jsonb(value)")
    # Effective traits (by source precedence), {counter: {"YYYY-MM-DD": n}} (UTC days),
    # {event_type: ISO time}, and event points as of score_at (decaying by the tenant's half-life).
    op.add_column("profiles", sa.Column("traits", JSONB, nullable=False, server_default=EMPTY))
    op.add_column("profiles", sa.Column("counters", JSONB, nullable=False, server_default=EMPTY))
    op.add_column("profiles", sa.Column("last_seen_types", JSONB, nullable=False, server_default=EMPTY))
    op.add_column("profiles", sa.Column("score", sa.Float, nullable=False, server_default=sa.text("0")))
    op.add_column("profiles", sa.Column("score_at", TZ))
    op.execute(
        """
        UPDATE profiles p SET traits = e.traits
        FROM (SELECT tenant_id, profile_id, jsonb_object_agg(name, value) AS traits
              FROM (SELECT DISTINCT ON (tenant_id, profile_id, name) tenant_id, profile_id, name, value
                    FROM profile_traits
                    ORDER BY tenant_id, profile_id, name,
                             array_position(ARRAY['declared', 'backend', 'behavioural'], source)) t
              GROUP BY tenant_id, profile_id) e
        WHERE p.tenant_id = e.tenant_id AND p.profile_id = e.profile_id
        """
    )
    op.create_table(
        "counter_definitions",
        sa.Column("tenant_id", sa.Text, nullable=False),
        sa.Column("name", sa.Text, nullable=False),
        sa.Column("event_type", sa.Text, nullable=False),
        sa.Column("windows", ARRAY(sa.Integer), nullable=False),
        sa.Column("property", sa.Text),
        sa.Column("property_value", JSONB),
        sa.Column("thresholds", ARRAY(sa.BigInteger), nullable=False),
        sa.Column("created_at", TZ, nullable=False),
        sa.PrimaryKeyConstraint("tenant_id", "name"),
    )
    op.create_table(
        "computed_traits",
        sa.Column("tenant_id", sa.Text, nullable=False),
        sa.Column("name", sa.Text, nullable=False),
        sa.Column("event_type", sa.Text, nullable=False),
        sa.Column("property", sa.Text, nullable=False),
        sa.Column("created_at", TZ, nullable=False),
        sa.PrimaryKeyConstraint("tenant_id", "name"),
    )
    op.create_table(
        "scoring_rules",
        sa.Column("tenant_id", sa.Text, nullable=False),
        sa.Column("rules", JSONB, nullable=False),
        sa.Column("half_life_days", sa.Integer, nullable=False),
        sa.Column("thresholds", ARRAY(sa.Float), nullable=False),
        sa.Column("updated_at", TZ, nullable=False),
        sa.PrimaryKeyConstraint("tenant_id"),
    )
    op.create_table(
        "segments",
        sa.Column("tenant_id", sa.Text, nullable=False),
        sa.Column("segment_id", sa.Text, nullable=False),
        sa.Column("name", sa.Text, nullable=False),
        sa.Column("description", sa.Text, nullable=False),
        sa.Column("condition", JSONB, nullable=False),
        sa.Column("created_at", TZ, nullable=False),
        sa.PrimaryKeyConstraint("tenant_id", "segment_id"),
        sa.UniqueConstraint("tenant_id", "name", name="segments_name"),
    )
    op.create_table(
        "segment_members",
        sa.Column("tenant_id", sa.Text, nullable=False),
        sa.Column("segment_id", sa.Text, nullable=False),
        sa.Column("profile_id", sa.Text, nullable=False),
        sa.Column("entered_at", TZ, nullable=False),
        sa.PrimaryKeyConstraint("tenant_id", "segment_id", "profile_id"),
    )
    op.create_index("segment_members_profile", "segment_members", ["tenant_id", "profile_id"])


def downgrade() -> None:
    op.drop_table("segment_members")
    op.drop_table("segments")
    op.drop_table("scoring_rules")
    op.drop_table("computed_traits")
    op.drop_table("counter_definitions")
    for column in ("score_at", "score", "last_seen_types", "counters", "traits"):
        op.drop_column("profiles", column)
    op.execute("ALTER TABLE profile_traits ALTER COLUMN value TYPE text USING value #>> '{}'")
