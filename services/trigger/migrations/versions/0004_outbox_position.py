"""The outbox relay keeps its position in one row (`outbox_relay`) instead of marking each
published row: each outbox row carries the id of the transaction that wrote it (see
relevans/kit/outbox.py). Rows already published stay published, the others are published next.

Revision ID: 0004
Revises: 0003
"""

from __future__ import annotations

from alembic import op

from relevans.kit.outbox import FROM_POSITION, TO_POSITION

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    for statement in TO_POSITION:
        op.execute(statement)


def downgrade() -> None:
    for statement in FROM_POSITION:
        op.execute(statement)
