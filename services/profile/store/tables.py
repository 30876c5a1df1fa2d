"""The profile service's tables (SQLAlchemy Core); migrations/ creates them."""

from __future__ import annotations

import sqlalchemy as sa
from sqlalchemy.dialects.postgresql import ARRAY, JSONB

from relevans.kit.outbox import outbox_table

TZ = sa.DateTime(timezone=True)

metadata = sa.MetaData()

profiles = sa.Table(
    "profiles",
    metadata,
    sa.Column("tenant_id", sa.Text, primary_key=True),
    sa.Column("profile_id", sa.Text, primary_key=True),
    sa.Column("customer_id", sa.Text),
    sa.Column("email", sa.Text),
    sa.Column("first_name", sa.Text),
    sa.Column("last_name", sa.Text),
    # E.164.
    sa.Column("phone", sa.Text),
    # Set when this (shadow) profile was merged into another one.
    sa.Column("merged_into", sa.Text),
    sa.Column("created_at", TZ, nullable=False),
    sa.Column("updated_at", TZ, nullable=False),
    sa.Column("last_seen_at", TZ),
    # Effective traits by source precedence (declared > backend > behavioural), kept in step
    # with profile_traits by `refresh_traits`.
    sa.Column("traits", JSONB, nullable=False, server_default=sa.text("'{}'::jsonb")),
    # {counter name: {"YYYY-MM-DD": count}}, UTC days, pruned to the counter's longest window.
    sa.Column("counters", JSONB, nullable=False, server_default=sa.text("'{}'::jsonb")),
    # {event type: ISO-8601 time of the latest such event}.
    sa.Column("last_seen_types", JSONB, nullable=False, server_default=sa.text("'{}'::jsonb")),
    # Event points as of score_at; they decay by the tenant's half-life (trait points are added on read).
    sa.Column("score", sa.Float, nullable=False, server_default=sa.text("0")),
    sa.Column("score_at", TZ),
    # A merged profile's shadows (migration 0010); the profiles never merged are not indexed.
    sa.Index(
        "profiles_merged_into",
        "tenant_id",
        "merged_into",
        postgresql_where=sa.text("merged_into IS NOT NULL"),
    ),
    # Room for HOT updates: each event rewrites its profile's row (migration 0005).
    postgresql_with={"fillfactor": 70},
)

identities = sa.Table(
    "identities",
    metadata,
    sa.Column("tenant_id", sa.Text, primary_key=True),
    sa.Column("kind", sa.Text, primary_key=True),
    sa.Column("value", sa.Text, primary_key=True),
    sa.Column("profile_id", sa.Text, nullable=False),
    sa.Column("created_at", TZ, nullable=False),
    sa.CheckConstraint("kind IN ('anonymous', 'customer_id', 'email')", name="identities_kind"),
    sa.Index("identities_profile", "tenant_id", "profile_id"),
)

events = sa.Table(
    "events",
    metadata,
    sa.Column("tenant_id", sa.Text, primary_key=True),
    # Unique by construction; not indexed (see migration 0007).
    sa.Column("event_id", sa.Text, nullable=False),
    # The client's idempotency key (or a generated one).
    sa.Column("message_id", sa.Text, primary_key=True),
    sa.Column("profile_id", sa.Text, nullable=False),
    sa.Column("type", sa.Text, nullable=False),
    sa.Column("occurred_at", TZ, nullable=False),
    sa.Column("received_at", TZ, nullable=False),
    sa.Column("anonymous_id", sa.Text),
    sa.Column("customer_id", sa.Text),
    sa.Column("email", sa.Text),
    sa.Column("properties", JSONB, nullable=False),
    sa.Index("events_profile", "tenant_id", "profile_id", "occurred_at"),
)

merges = sa.Table(
    "merges",
    metadata,
    sa.Column("tenant_id", sa.Text, primary_key=True),
    sa.Column("merge_id", sa.BigInteger, sa.Identity(), primary_key=True),
    sa.Column("from_profile_id", sa.Text, nullable=False),
    sa.Column("to_profile_id", sa.Text, nullable=False),
    sa.Column("anonymous_id", sa.Text),
    sa.Column("source", sa.Text, nullable=False),
    sa.Column("merged_at", TZ, nullable=False),
    sa.Index("merges_to", "tenant_id", "to_profile_id"),
    sa.Index("merges_from", "tenant_id", "from_profile_id"),
)

consent_ledger = sa.Table(
    "consent_ledger",
    metadata,
    sa.Column("tenant_id", sa.Text, primary_key=True),
    sa.Column("entry_id", sa.BigInteger, sa.Identity(), primary_key=True),
    sa.Column("profile_id", sa.Text, nullable=False),
    sa.Column("purpose", sa.Text, nullable=False),
    sa.Column("channel", sa.Text, nullable=False),
    sa.Column("status", sa.Text, nullable=False),
    sa.Column("source", sa.Text, nullable=False),
    sa.Column("evidence", sa.Text, nullable=False),
    sa.Column("recorded_at", TZ, nullable=False),
    sa.Index("consent_ledger_profile", "tenant_id", "profile_id"),
)

consents = sa.Table(
    "consents",
    metadata,
    sa.Column("tenant_id", sa.Text, primary_key=True),
    sa.Column("profile_id", sa.Text, primary_key=True),
    sa.Column("purpose", sa.Text, primary_key=True),
    sa.Column("channel", sa.Text, primary_key=True),
    sa.Column("status", sa.Text, nullable=False),
    sa.Column("source", sa.Text, nullable=False),
    sa.Column("evidence", sa.Text, nullable=False),
    sa.Column("recorded_at", TZ, nullable=False),
)

profile_tags = sa.Table(
    "profile_tags",
    metadata,
    sa.Column("tenant_id", sa.Text, primary_key=True),
    sa.Column("profile_id", sa.Text, primary_key=True),
    sa.Column("tag", sa.Text, primary_key=True),
    sa.Column("created_at", TZ, nullable=False),
    sa.Index("profile_tags_tag", "tenant_id", "tag"),
)

profile_traits = sa.Table(
    "profile_traits",
    metadata,
    sa.Column("tenant_id", sa.Text, primary_key=True),
    sa.Column("profile_id", sa.Text, primary_key=True),
    sa.Column("name", sa.Text, primary_key=True),
    # declared, backend or behavioural; the same trait may be held from several sources.
    sa.Column("source", sa.Text, primary_key=True),
    # A JSON string, number or bool.
    sa.Column("value", JSONB, nullable=False),
    sa.Column("updated_at", TZ, nullable=False),
    sa.CheckConstraint("source IN ('declared', 'backend', 'behavioural')", name="profile_traits_source"),
)

# GDPR: the sha256 hex of each identifier of an erased person (kind: email, customer_id, phone,
# anonymous); consent given for one of them is not recorded again.
suppressions = sa.Table(
    "suppressions",
    metadata,
    sa.Column("tenant_id", sa.Text, primary_key=True),
    sa.Column("kind", sa.Text, primary_key=True),
    sa.Column("value_hash", sa.Text, primary_key=True),
    sa.Column("created_at", TZ, nullable=False),
)

erasures = sa.Table(
    "erasures",
    metadata,
    sa.Column("tenant_id", sa.Text, primary_key=True),
    sa.Column("erasure_id", sa.Text, primary_key=True),
    sa.Column("request_id", sa.Text, nullable=False),
    sa.Column("profile_id", sa.Text, nullable=False),
    sa.Column("state", sa.Text, nullable=False),
    sa.Column("services_done", ARRAY(sa.Text), nullable=False),
    sa.Column("requested_at", TZ, nullable=False),
    sa.Column("completed_at", TZ),
    sa.UniqueConstraint("tenant_id", "request_id", name="erasures_request_id"),
    sa.CheckConstraint("state IN ('pending', 'done')", name="erasures_state"),
)

counter_definitions = sa.Table(
    "counter_definitions",
    metadata,
    sa.Column("tenant_id", sa.Text, primary_key=True),
    sa.Column("name", sa.Text, primary_key=True),
    sa.Column("event_type", sa.Text, nullable=False),
    sa.Column("windows", ARRAY(sa.Integer), nullable=False),
    sa.Column("property", sa.Text),
    sa.Column("property_value", JSONB),
    sa.Column("thresholds", ARRAY(sa.BigInteger), nullable=False),
    sa.Column("created_at", TZ, nullable=False),
)

computed_traits = sa.Table(
    "computed_traits",
    metadata,
    sa.Column("tenant_id", sa.Text, primary_key=True),
    sa.Column("name", sa.Text, primary_key=True),
    sa.Column("event_type", sa.Text, nullable=False),
    sa.Column("property", sa.Text, nullable=False),
    sa.Column("created_at", TZ, nullable=False),
)

scoring_rules = sa.Table(
    "scoring_rules",
    metadata,
    sa.Column("tenant_id", sa.Text, primary_key=True),
    sa.Column("rules", JSONB, nullable=False),
    sa.Column("half_life_days", sa.Integer, nullable=False),
    sa.Column("thresholds", ARRAY(sa.Float), nullable=False),
    sa.Column("updated_at", TZ, nullable=False),
)

segments = sa.Table(
    "segments",
    metadata,
    sa.Column("tenant_id", sa.Text, primary_key=True),
    sa.Column("segment_id", sa.Text, primary_key=True),
    sa.Column("name", sa.Text, nullable=False),
    sa.Column("description", sa.Text, nullable=False),
    sa.Column("condition", JSONB, nullable=False),
    sa.Column("created_at", TZ, nullable=False),
    sa.UniqueConstraint("tenant_id", "name", name="segments_name"),
)

# Who matched each segment when an event last changed them (for entry and exit messages).
segment_members = sa.Table(
    "segment_members",
    metadata,
    sa.Column("tenant_id", sa.Text, primary_key=True),
    sa.Column("segment_id", sa.Text, primary_key=True),
    sa.Column("profile_id", sa.Text, primary_key=True),
    sa.Column("entered_at", TZ, nullable=False),
    sa.Index("segment_members_profile", "tenant_id", "profile_id"),
)

outbox = outbox_table(metadata)
