"""The outbox relay keeps its position in one row (`outbox_relay`) instead of marking each
published row: each outbox row carries the id of the transaction that wrote it (see
relevans/kit/outbox.py). Rows already published stay published, the others are published next.

Revision ID: 0006
Revises: 0005
"""

from __future__ import annotations

from alembic import op

from relevans.kit.outbox import FROM_POSITION, TO_POSITION

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    for statement in TO_POSITION:
        op.execute(statement)


def downgrade() -> None:
    for statement in FROM_POSITION:
        op.execute(statement)
