"""Trigger migration 0006: a condition kind and its JSON per trigger, backfilled from the absence columns."""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta

import pytest
import pytest_asyncio
import sqlalchemy as sa
from alembic import command
from sqlalchemy.engine import Connection
from sqlalchemy.ext.asyncio import AsyncEngine

from relevans.kit.db import alembic_config, create_engine
from relevans.kit.settings import Settings
from services.trigger.domain.kinds.absence import Absence
from services.trigger.store import TriggerStore

TENANT = "shop"
CREATED = datetime(2026, 3, 1, 12, tzinfo=UTC)
OLD_ROW = """INSERT INTO triggers (tenant_id, trigger_id, display_name, start_event_type, cancel_event_type,
                                   delay, channel, purpose, template_id, created_at)
             VALUES (:tenant, :trigger_id, 'Abandoned cart', 'add_to_cart', 'purchase', :delay, 'email',
                     'marketing', 'cart-reminder', :created)"""
DELAYS = {
    "four-hours": timedelta(hours=4),
    "odd": timedelta(days=1, seconds=1, microseconds=500_001),
    "shortest": timedelta(seconds=1),
    "longest": timedelta(days=90),
}


def _alembic(conn: Connection, direction: str, revision: str) -> None:
    cfg = alembic_config("trigger")
    cfg.attributes["connection"] = conn
    getattr(command, direction)(cfg, revision)


@pytest_asyncio.fixture
async def engine(settings: Settings) -> AsyncIterator[AsyncEngine]:
    engine = create_engine(settings.database_url("trigger"))
    yield engine
    await engine.dispose()


async def _triggers_before_0006(engine: AsyncEngine) -> None:
    async with engine.begin() as conn:
        await conn.run_sync(_alembic, "downgrade", "0005")
        for trigger_id, delay in DELAYS.items():
            await conn.execute(
                sa.text(OLD_ROW),
                {"tenant": TENANT, "trigger_id": trigger_id, "delay": delay, "created": CREATED},
            )


async def test_upgrade_backfills_each_absence_trigger_and_the_store_reads_it_unchanged(
    engine: AsyncEngine,
) -> None:
    await _triggers_before_0006(engine)
    async with engine.begin() as conn:
        await conn.run_sync(_alembic, "upgrade", "head")
    async with engine.connect() as conn:
        rows = (
            await conn.execute(
                sa.text("SELECT trigger_id, condition_kind, condition FROM triggers ORDER BY 1")
            )
        ).all()
        columns = {c["name"] for c in await conn.run_sync(lambda c: sa.inspect(c).get_columns("triggers"))}
    assert {r.trigger_id: (r.condition_kind, r.condition) for r in rows} == {
        "four-hours": (
            "absence",
            {"start_event_type": "add_to_cart", "cancel_event_type": "purchase", "delay": "14400s"},
        ),
        "longest": (
            "absence",
            {"start_event_type": "add_to_cart", "cancel_event_type": "purchase", "delay": "7776000s"},
        ),
        "odd": (
            "absence",
            {"start_event_type": "add_to_cart", "cancel_event_type": "purchase", "delay": "86401.500001s"},
        ),
        "shortest": (
            "absence",
            {"start_event_type": "add_to_cart", "cancel_event_type": "purchase", "delay": "1s"},
        ),
    }
    assert not columns & {"start_event_type", "cancel_event_type", "delay"}

    store = TriggerStore(engine)
    for trigger_id, delay in DELAYS.items():
        found = await store.get_trigger(TENANT, trigger_id)
        assert found.condition == Absence("add_to_cart", "purchase", delay)
        assert (found.channel, found.purpose, found.template_id, found.created_at) == (
            "email",
            "marketing",
            "cart-reminder",
            CREATED,
        )


async def test_downgrade_restores_the_absence_columns(engine: AsyncEngine) -> None:
    await _triggers_before_0006(engine)
    async with engine.begin() as conn:
        await conn.run_sync(_alembic, "upgrade", "head")
        await conn.run_sync(_alembic, "downgrade", "0005")
        rows = (
            await conn.execute(
                sa.text("SELECT trigger_id, start_event_type, cancel_event_type, delay FROM triggers")
            )
        ).all()
    assert {r.trigger_id: (r.start_event_type, r.cancel_event_type, r.delay) for r in rows} == {
        t: ("add_to_cart", "purchase", d) for t, d in DELAYS.items()
    }


async def test_downgrade_refuses_triggers_the_absence_columns_cannot_hold(engine: AsyncEngine) -> None:
    async with engine.begin() as conn:
        await conn.execute(
            sa.text(
                """INSERT INTO triggers (tenant_id, trigger_id, display_name, condition_kind, condition,
                                         channel, purpose, template_id, created_at)
                   VALUES ('shop', 'big-buyer', '', 'event', '{}', 'email', 'marketing', 't', now())"""
            )
        )
    with pytest.raises(sa.exc.DBAPIError, match="kinds other than absence"):
        async with engine.begin() as conn:
            await conn.run_sync(_alembic, "downgrade", "0005")
