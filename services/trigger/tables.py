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
    sa.Column("status", sa.Text, nullable=False),
    sa.Column("variables", JSONB, nullable=False),
    sa.Column("created_at", TZ, nullable=False),
    sa.Column("fired_at", TZ),
    sa.Column("cancelled_at", TZ),
    sa.Column("reason", sa.Text),
    sa.CheckConstraint("status IN ('pending', 'fired', 'cancelled', 'superseded')", name="timers_status"),
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

# The absence kind's state per (tenant, trigger, profile) (`kinds.absence.TriggerState`), the only
# kind with per-person state; a kind with another shape of state brings its own columns.
trigger_states = sa.Table(
    "trigger_states",
    metadata,
    sa.Column("tenant_id", sa.Text, primary_key=True),
    sa.Column("trigger_id", sa.Text, primary_key=True),
    sa.Column("profile_id", sa.Text, primary_key=True),
    sa.Column("last_start_at", TZ),
    sa.Column("last_start_occurrence", sa.Text),
    sa.Column("last_cancel_at", TZ),
    sa.Column("updated_at", TZ, nullable=False),
    sa.Index("trigger_states_profile", "tenant_id", "profile_id"),
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
    # A person's firings, which a merge moves and an erasure deletes (migration 0005).
    sa.Index("firings_profile", "tenant_id", "profile_id"),
)

# GDPR: erased people (a random profile id, nothing personal); an event of theirs that arrives
# after the erasure (the event stream and the erasure stream are consumed independently) is ignored.
erased_profiles = erased_profiles_table(metadata)

merged_profiles = merged_profiles_table(metadata)

outbox = outbox_table(metadata)

# The key of timers and firings: one per (tenant, trigger, profile, occurrence).
TIMER_KEY = ["tenant_id", "trigger_id", "profile_id", "occurrence"]
