"""The trigger service's tables (SQLAlchemy Core); the migrations in `migrations/versions` create them."""

from __future__ import annotations

import sqlalchemy as sa
from sqlalchemy.dialects.postgresql import JSONB

from relevans.kit.outbox import outbox_table
from relevans.kit.people import erased_profiles_table, merged_profiles_table

TZ = sa.DateTime(timezone=True)

metadata = sa.MetaData()

triggers = sa.Table(
    "triggers",
    metadata,
    sa.Column("tenant_id", sa.Text, primary_key=True),
    sa.Column("trigger_id", sa.Text, primary_key=True),
    sa.Column("display_name", sa.Text, nullable=False),
    # The condition's kind (a name in `domain.kinds.KINDS`) and its definition, as the kind stores it.
    sa.Column("condition_kind", sa.Text, nullable=False),
    sa.Column("condition", JSONB, nullable=False),
    sa.Column("channel", sa.Text, nullable=False),
    sa.Column("purpose", sa.Text, nullable=False),
    sa.Column("template_id", sa.Text, nullable=False),
    sa.Column("created_at", TZ, nullable=False),
    # The trigger's part in the tenant's policy, as `domain.policies` stores it; {} is the defaults.
    sa.Column("policy", JSONB, nullable=False, server_default=sa.text("'{}'")),
)

# One sending policy per tenant (`domain.policies.TenantPolicy`); no row means the defaults.
policies = sa.Table(
    "policies",
    metadata,
    sa.Column("tenant_id", sa.Text, primary_key=True),
    sa.Column("policy", JSONB, nullable=False),
    sa.Column("updated_at", TZ, nullable=False),
)

timers = sa.Table(
    "timers",
    metadata,
    sa.Column("tenant_id", sa.Text, primary_key=True),
    sa.Column("trigger_id", sa.Text, primary_key=True),
    sa.Column("profile_id", sa.Text, primary_key=True),
    # The start event's id: one timer per (trigger, profile, occurrence).
    sa.Column("occurrence", sa.Text, primary_key=True),
    sa.Column("started_at", TZ, nullable=False),
    sa.Column("due_at", TZ, nullable=False),
    # When the message was first due: a deferral moves `due_at`, the expiry counts from here.
    sa.Column("first_due_at", TZ, nullable=False),
    sa.Column("status", sa.Text, nullable=False),
    sa.Column("variables", JSONB, nullable=False),
    sa.Column("created_at", TZ, nullable=False),
    sa.Column("fired_at", TZ),
    sa.Column("cancelled_at", TZ),
    sa.Column("reason", sa.Text),
    sa.CheckConstraint(
        "status IN ('pending', 'fired', 'cancelled', 'superseded', 'dropped')", name="timers_status"
    ),
    sa.Index("timers_due", "due_at", postgresql_where=sa.text("status = 'pending'")),
    sa.Index(
        "timers_pending_profile",
        "tenant_id",
        "profile_id",
        "trigger_id",
        postgresql_where=sa.text("status = 'pending'"),
    ),
    # A person's timers of every status, which a merge moves and an erasure deletes (migration 0005).
    sa.Index("timers_profile", "tenant_id", "profile_id"),
)

# `status = 'pending'` written as a literal, not sent as a parameter: the partial indexes of pending
# timers serve a statement only when its plan knows the status without its parameters, and a
# statement run often gets a generic plan, which would read the whole table instead of `timers_due`
# (figures: bench/README.md).
PENDING = timers.c.status == sa.literal_column("'pending'")

# Each kind's state per (tenant, trigger, profile), as the kind stores it (`state_to_json`).
trigger_states = sa.Table(
    "trigger_states",
    metadata,
    sa.Column("tenant_id", sa.Text, primary_key=True),
    sa.Column("trigger_id", sa.Text, primary_key=True),
    sa.Column("profile_id", sa.Text, primary_key=True),
    sa.Column("state", JSONB, nullable=False),
    sa.Column("updated_at", TZ, nullable=False),
    sa.Index("trigger_states_profile", "tenant_id", "profile_id"),
    # Room on each page for updates in place (migration 0008).
    postgresql_with={"fillfactor": 70},
)

firings = sa.Table(
    "firings",
    metadata,
    sa.Column("tenant_id", sa.Text, primary_key=True),
    sa.Column("trigger_id", sa.Text, primary_key=True),
    sa.Column("profile_id", sa.Text, primary_key=True),
    sa.Column("occurrence", sa.Text, primary_key=True),
    sa.Column("idempotency_key", sa.Text, nullable=False),
    sa.Column("fired_at", TZ, nullable=False),
    # What the frequency caps count.
    sa.Column("channel", sa.Text, nullable=False),
    sa.Column("purpose", sa.Text, nullable=False),
    # A person's firings, which a merge moves and an erasure deletes (migration 0005).
    sa.Index("firings_profile", "tenant_id", "profile_id"),
)

# GDPR: erased people (a random profile id, nothing personal); an event of theirs that arrives
# after the erasure (the event stream and the erasure stream are consumed independently) is ignored.
erased_profiles = erased_profiles_table(metadata)

merged_profiles = merged_profiles_table(metadata)

# What the service knows of a person between events: effective traits (rv.profile.traits) and
# consents "purpose.channel" -> status (rv.profile.consent), for time zones, dates and consent.
people = sa.Table(
    "people",
    metadata,
    sa.Column("tenant_id", sa.Text, primary_key=True),
    sa.Column("profile_id", sa.Text, primary_key=True),
    sa.Column("traits", JSONB, nullable=False, server_default=sa.text("'{}'")),
    sa.Column("consents", JSONB, nullable=False, server_default=sa.text("'{}'")),
    sa.Column("updated_at", TZ, nullable=False),
)

# The decision trace (`ExplainDecisions`), kept for `trigger_decision_retention_days`.
decisions = sa.Table(
    "decisions",
    metadata,
    sa.Column("decision_id", sa.BigInteger, sa.Identity(), primary_key=True),
    sa.Column("tenant_id", sa.Text, nullable=False),
    sa.Column("profile_id", sa.Text, nullable=False),
    sa.Column("trigger_id", sa.Text, nullable=False),
    sa.Column("outcome", sa.Text, nullable=False),
    sa.Column("reason_code", sa.Text, nullable=False),
    sa.Column("reason", sa.Text, nullable=False),
    sa.Column("decided_at", TZ, nullable=False),
    sa.Column("event_id", sa.Text, nullable=False, server_default=""),
    sa.Column("occurrence", sa.Text, nullable=False, server_default=""),
    sa.Column("until", TZ),
    sa.Column("idempotency_key", sa.Text, nullable=False, server_default=""),
    sa.Column("count", sa.BigInteger, nullable=False, server_default="1"),
    # A trigger's condition-false evaluations for a person share one entry (the latest, counted).
    sa.Column("collapse_key", sa.Text),
    # A delivery outcome read twice from the bus is one entry.
    sa.Column("dedupe_key", sa.Text),
    sa.Index(
        "decisions_person",
        "tenant_id",
        "profile_id",
        sa.text("decided_at DESC"),
        sa.text("decision_id DESC"),
    ),
    # BRIN (migration 0008): only the retention's pruning reads it.
    sa.Index("decisions_age", "decided_at", postgresql_using="brin"),
    sa.Index(
        "decisions_collapse",
        "tenant_id",
        "collapse_key",
        unique=True,
        postgresql_where=sa.text("collapse_key IS NOT NULL"),
    ),
    sa.Index(
        "decisions_dedupe",
        "tenant_id",
        "dedupe_key",
        unique=True,
        postgresql_where=sa.text("dedupe_key IS NOT NULL"),
    ),
)

outbox = outbox_table(metadata)

# The key of timers and firings: one per (tenant, trigger, profile, occurrence).
TIMER_KEY = ["tenant_id", "trigger_id", "profile_id", "occurrence"]
