"""A trigger keeps its condition as a kind and a definition, not one column per absence field.

`condition_kind` names the kind (`absence` for every trigger so far) and `condition`
holds its definition as the kind stores it: for absence, the two event types and the
delay as exact decimal seconds with an `s` ("14400s", "1.5s"). New kinds then need no
migration of `triggers`. The downgrade restores the absence columns and refuses when a
trigger of another kind exists, which the old columns cannot hold.

Revision ID: 0006
Revises: 0005
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects.postgresql import JSONB

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("triggers", sa.Column("condition_kind", sa.Text))
    op.add_column("triggers", sa.Column("condition", JSONB))
    op.execute(
        """
        UPDATE triggers SET
            condition_kind = 'absence',
            condition = jsonb_build_object(
                'start_event_type', start_event_type,
                'cancel_event_type', cancel_event_type,
                'delay', trim_scale(extract(epoch FROM delay))::text || 's'
            )
        """
    )
    op.alter_column("triggers", "condition_kind", nullable=False)
    op.alter_column("triggers", "condition", nullable=False)
    for column in ("start_event_type", "cancel_event_type", "delay"):
        op.drop_column("triggers", column)


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
    op.add_column("triggers", sa.Column("start_event_type", sa.Text))
    op.add_column("triggers", sa.Column("cancel_event_type", sa.Text))
    op.add_column("triggers", sa.Column("delay", sa.Interval))
    op.execute(
        """
        UPDATE triggers SET
            start_event_type = condition ->> 'start_event_type',
            cancel_event_type = condition ->> 'cancel_event_type',
            delay = CAST(rtrim(condition ->> 'delay', 's') || ' seconds' AS interval)
        """
    )
    for column in ("start_event_type", "cancel_event_type", "delay"):
        op.alter_column("triggers", column, nullable=False)
    op.drop_column("triggers", "condition")
    op.drop_column("triggers", "condition_kind")
