"""Every condition kind's state, sending policies and the decision trace.

- `trigger_states.state` holds each kind's per-person state as the kind stores it (JSON); the
  absence kind's columns are folded into it (its cancels become the one of the empty match key)
  and dropped.
- `triggers.policy`: the trigger's part in the tenant's policy (priority, re-entry, capped
  action, expiry, quiet hours), JSON as `domain.policies` writes it; `{}` is the defaults.
- `policies`: one sending policy per tenant (caps, quiet hours, time zone, expiry, late window).
- `timers.first_due_at`: when the message was first due (a deferral moves `due_at`; expiry counts
  from here); `dropped` joins the statuses (expired, capped and dropped, held back, suppressed).
- `firings.channel`/`purpose`: what frequency caps count.
- `people`: what the trigger service knows of a person between events (traits, consents),
  followed from rv.profile.traits and rv.profile.consent.
- `decisions`: the decision trace, newest first per person; `collapse_key` keeps a trigger's
  condition-false evaluations for a person as one entry; `dedupe_key` makes a delivery outcome
  read twice from the bus one entry.

Revision ID: 0007
Revises: 0006
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects.postgresql import JSONB

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None

TZ = sa.DateTime(timezone=True)


def upgrade() -> None:
    op.add_column("trigger_states", sa.Column("state", JSONB))
    op.execute(
        """
        UPDATE trigger_states SET state = jsonb_build_object(
            'last_start_at', to_jsonb(last_start_at),
            'last_start_occurrence', to_jsonb(last_start_occurrence),
            'last_start_key', '[]'::jsonb,
            'cancels', CASE WHEN last_cancel_at IS NULL THEN '[]'::jsonb
                ELSE jsonb_build_array(jsonb_build_object('key', '[]'::jsonb, 'at', to_jsonb(last_cancel_at)))
            END
        )
        """
    )
    op.alter_column("trigger_states", "state", nullable=False)
    for column in ("last_start_at", "last_start_occurrence", "last_cancel_at"):
        op.drop_column("trigger_states", column)

    op.add_column("triggers", sa.Column("policy", JSONB, nullable=False, server_default=sa.text("'{}'")))
    op.create_table(
        "policies",
        sa.Column("tenant_id", sa.Text, primary_key=True),
        sa.Column("policy", JSONB, nullable=False),
        sa.Column("updated_at", TZ, nullable=False),
    )

    op.add_column("timers", sa.Column("first_due_at", TZ))
    op.execute("UPDATE timers SET first_due_at = due_at")
    op.alter_column("timers", "first_due_at", nullable=False)
    op.drop_constraint("timers_status", "timers")
    op.create_check_constraint(
        "timers_status", "timers", "status IN ('pending', 'fired', 'cancelled', 'superseded', 'dropped')"
    )

    op.add_column("firings", sa.Column("channel", sa.Text))
    op.add_column("firings", sa.Column("purpose", sa.Text))
    op.execute(
        "UPDATE firings f SET channel = t.channel, purpose = t.purpose FROM triggers t "
        "WHERE t.tenant_id = f.tenant_id AND t.trigger_id = f.trigger_id"
    )
    # Firings of triggers deleted since: what every trigger sent until now.
    op.execute("UPDATE firings SET channel = 'email', purpose = 'marketing' WHERE channel IS NULL")
    op.alter_column("firings", "channel", nullable=False)
    op.alter_column("firings", "purpose", nullable=False)

    op.create_table(
        "people",
        sa.Column("tenant_id", sa.Text, primary_key=True),
        sa.Column("profile_id", sa.Text, primary_key=True),
        sa.Column("traits", JSONB, nullable=False, server_default=sa.text("'{}'")),
        sa.Column("consents", JSONB, nullable=False, server_default=sa.text("'{}'")),
        sa.Column("updated_at", TZ, nullable=False),
    )

    op.create_table(
        "decisions",
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
        sa.Column("collapse_key", sa.Text),
        sa.Column("dedupe_key", sa.Text),
    )
    op.execute(
        "CREATE INDEX decisions_person "
        "ON decisions (tenant_id, profile_id, decided_at DESC, decision_id DESC)"
    )
    op.execute("CREATE INDEX decisions_age ON decisions (decided_at)")
    op.execute(
        "CREATE UNIQUE INDEX decisions_collapse ON decisions (tenant_id, collapse_key) "
        "WHERE collapse_key IS NOT NULL"
    )
    op.execute(
        "CREATE UNIQUE INDEX decisions_dedupe ON decisions (tenant_id, dedupe_key) "
        "WHERE dedupe_key IS NOT NULL"
    )


def downgrade() -> None:
    op.execute(
        """
        DO $$
        BEGIN
            IF EXISTS (SELECT 1 FROM triggers WHERE condition_kind <> 'absence') THEN
                RAISE EXCEPTION 'triggers of kinds other than absence exist; delete them before downgrading';
            END IF;
        END $$
        """
    )
    op.drop_table("decisions")
    op.drop_table("people")
    op.drop_column("firings", "purpose")
    op.drop_column("firings", "channel")
    op.execute("DELETE FROM timers WHERE status = 'dropped'")
    op.drop_constraint("timers_status", "timers")
    op.create_check_constraint(
        "timers_status", "timers", "status IN ('pending', 'fired', 'cancelled', 'superseded')"
    )
    op.drop_column("timers", "first_due_at")
    op.drop_table("policies")
    op.drop_column("triggers", "policy")
    op.add_column("trigger_states", sa.Column("last_start_at", TZ))
    op.add_column("trigger_states", sa.Column("last_start_occurrence", sa.Text))
    op.add_column("trigger_states", sa.Column("last_cancel_at", TZ))
    op.execute(
        """
        UPDATE trigger_states SET
            last_start_at = CAST(state ->> 'last_start_at' AS timestamptz),
            last_start_occurrence = state ->> 'last_start_occurrence',
            last_cancel_at = (
                SELECT max(CAST(c ->> 'at' AS timestamptz)) FROM jsonb_array_elements(state -> 'cancels') AS c
            )
        """
    )
    op.drop_column("trigger_states", "state")
