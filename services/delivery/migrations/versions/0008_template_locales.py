"""Templates per locale, the variant and test flag of each message, tenant delivery settings.

A template id holds a variant per locale: `templates` is keyed (tenant, template id, locale); the
rows already there become the variants of their locale. `messages` records the variant used and
whether SendTest sent it. `delivery_settings` holds each tenant's default locale.

Revision ID: 0008
Revises: 0007
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None

TZ = sa.DateTime(timezone=True)


def upgrade() -> None:
    op.drop_constraint("templates_pkey", "templates", type_="primary")
    op.create_primary_key("templates_pkey", "templates", ["tenant_id", "template_id", "locale"])
    op.add_column("messages", sa.Column("locale", sa.Text, nullable=False, server_default=""))
    op.add_column("messages", sa.Column("test", sa.Boolean, nullable=False, server_default=sa.false()))
    op.create_table(
        "delivery_settings",
        sa.Column("tenant_id", sa.Text, nullable=False),
        sa.Column("default_locale", sa.Text, nullable=False),
        sa.Column("updated_at", TZ, nullable=False),
        sa.PrimaryKeyConstraint("tenant_id"),
    )


def downgrade() -> None:
    op.drop_table("delivery_settings")
    op.drop_column("messages", "test")
    op.drop_column("messages", "locale")
    # One variant per template id remains: the newest.
    op.execute(
        """
        DELETE FROM templates AS t
        WHERE EXISTS (
            SELECT 1 FROM templates AS o
            WHERE o.tenant_id = t.tenant_id AND o.template_id = t.template_id
              AND (o.updated_at, o.locale) > (t.updated_at, t.locale)
        )
        """
    )
    op.drop_constraint("templates_pkey", "templates", type_="primary")
    op.create_primary_key("templates_pkey", "templates", ["tenant_id", "template_id"])
