"""Delivery migration 0008 (template locales): templates keyed per locale, the message's variant and test
flag, tenant settings; and back."""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta

import pytest_asyncio
import sqlalchemy as sa
from alembic import command
from sqlalchemy.engine import Connection
from sqlalchemy.ext.asyncio import AsyncEngine

from relevans.kit.db import alembic_config, create_engine
from relevans.kit.settings import Settings

TENANT = "shop"
AT = datetime(2026, 3, 1, 12, tzinfo=UTC)
TEMPLATE_ROW = """INSERT INTO templates (tenant_id, template_id, channel, locale, subject, body_text,
                                        created_at, updated_at)
                  VALUES ('shop', 'cart-reminder', 'email', :locale, :subject, 'Hi', :at, :at)"""
MESSAGE_ROW = """INSERT INTO messages (tenant_id, message_id, idempotency_key, profile_id, trigger_id,
                                      channel, purpose, template_id, variables, status, reason,
                                      recipient, subject, attempts, created_at, updated_at)
                 VALUES ('shop', 'm-1', 'k-1', 'p-1', 't', 'email', 'marketing', 'cart-reminder', '{}',
                         'sent', '', 'ada@example.com', 'Hi', 0, :at, :at)"""


def _alembic(conn: Connection, direction: str, revision: str) -> None:
    cfg = alembic_config("delivery")
    cfg.attributes["connection"] = conn
    getattr(command, direction)(cfg, revision)


@pytest_asyncio.fixture
async def engine(settings: Settings) -> AsyncIterator[AsyncEngine]:
    engine = create_engine(settings.database_url("delivery"))
    yield engine
    await engine.dispose()


async def test_a_template_becomes_its_locales_variant_and_back(engine: AsyncEngine) -> None:
    async with engine.begin() as conn:
        await conn.run_sync(_alembic, "downgrade", "0007")
        await conn.execute(sa.text(TEMPLATE_ROW), {"locale": "en", "subject": "Hello", "at": AT})
        await conn.execute(sa.text(MESSAGE_ROW), {"at": AT})
        await conn.run_sync(_alembic, "upgrade", "head")

        message = (await conn.execute(sa.text("SELECT locale, test FROM messages"))).one()
        assert (message.locale, message.test) == ("", False)
        # a second variant of the same template id now fits beside the first
        later = AT + timedelta(minutes=1)
        await conn.execute(sa.text(TEMPLATE_ROW), {"locale": "de", "subject": "Hallo", "at": later})
        await conn.execute(sa.text("INSERT INTO delivery_settings VALUES ('shop', 'de', :at)"), {"at": AT})

        await conn.run_sync(_alembic, "downgrade", "0007")
        kept = (await conn.execute(sa.text("SELECT locale, subject FROM templates"))).all()
        assert [tuple(r) for r in kept] == [("de", "Hallo")]  # one variant per id: the newest
        tables = await conn.execute(
            sa.text("SELECT count(*) FROM information_schema.tables WHERE table_name = 'delivery_settings'")
        )
        assert tables.scalar_one() == 0

        await conn.run_sync(_alembic, "upgrade", "head")
        await conn.execute(sa.text(TEMPLATE_ROW), {"locale": "en", "subject": "Hello", "at": later})
        count = await conn.execute(
            sa.text("SELECT count(*) FROM templates WHERE tenant_id = :t"), {"t": TENANT}
        )
        assert count.scalar_one() == 2
