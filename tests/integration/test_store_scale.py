"""Statements whose work must follow the rows they touch, not the size of their tables: each test
fills a table as months of operation would (for many people), then checks what the statement a
call runs reads."""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import UTC, datetime

import asyncpg
import pytest_asyncio
import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncEngine

from relevans.kit.db import create_engine
from relevans.kit.merges import ProfileMerge
from relevans.kit.settings import Settings
from services.delivery.store import DeliveryStore
from services.trigger.store import TriggerStore, firings, timers
from tests.helpers import blocks_read, explain, rows_read, statements_run

TENANT = "acme"
NOW = datetime(2026, 12, 1, tzinfo=UTC)


async def _driver(conn: sa.ext.asyncio.AsyncConnection) -> asyncpg.Connection:
    driver: asyncpg.Connection = (await conn.get_raw_connection()).driver_connection
    return driver


@pytest_asyncio.fixture
async def delivery_engine(settings: Settings) -> AsyncIterator[AsyncEngine]:
    engine = create_engine(settings.database_url("delivery"))
    yield engine
    await engine.dispose()


@pytest_asyncio.fixture
async def trigger_engine(settings: Settings) -> AsyncIterator[AsyncEngine]:
    engine = create_engine(settings.database_url("trigger"))
    yield engine
    await engine.dispose()


async def test_a_persons_messages_are_listed_from_their_own_not_the_tenants_every_message(
    delivery_engine: AsyncEngine,
) -> None:
    message = """INSERT INTO messages (tenant_id, message_id, idempotency_key, profile_id, trigger_id,
                     channel, purpose, template_id, variables, status, reason, recipient, subject,
                     attempts, created_at, updated_at)
                 SELECT :tenant, 'm-' || :who || '-' || n, 'k-' || :who || '-' || n, :who || mod(n, :people),
                        'cart', 'email', 'marketing', 'tpl', '{}', 'sent', '', 'a@example.com', 's', 1,
                        :now, :now
                 FROM generate_series(1, :n) AS n"""
    async with delivery_engine.begin() as conn:
        await conn.execute(
            sa.text(message), {"tenant": TENANT, "who": "other", "people": 500, "n": 5000, "now": NOW}
        )
        await conn.execute(
            sa.text(message), {"tenant": TENANT, "who": "p-1", "people": 1, "n": 2, "now": NOW}
        )
        await conn.execute(
            sa.text(message), {"tenant": TENANT, "who": "p-old", "people": 1, "n": 1, "now": NOW}
        )
        await conn.execute(
            sa.text("INSERT INTO merged_profiles VALUES (:tenant, 'p-old0', 'p-10', :now)"),
            {"tenant": TENANT, "now": NOW},
        )
        await conn.execute(sa.text("ANALYZE messages, merged_profiles"))

    store = DeliveryStore(delivery_engine)
    async with statements_run(delivery_engine) as seen:
        listed = await store.list_messages(TENANT, profile_id="p-10", before_seq=None, limit=50)
    assert sorted(m.message_id for m in listed) == ["m-p-1-1", "m-p-1-2", "m-p-old-1"]

    [(listing, parameters)] = [(s, p) for s, p in seen if "ORDER BY messages.seq DESC" in s]
    async with delivery_engine.connect() as conn:
        plan = await explain(await _driver(conn), listing, parameters)
    assert rows_read(plan) <= 10  # the three messages and the alias, not the tenant's 5,003


async def test_a_merge_moves_a_persons_timers_and_firings_without_reading_everyone_elses(
    trigger_engine: AsyncEngine,
) -> None:
    """Merges come with every anonymous visitor who signs in; each moves that person's timers and
    firings, found among the tenant's (hundreds of triggers, many people, months of history)."""
    timer = """INSERT INTO timers (tenant_id, trigger_id, profile_id, occurrence, started_at, due_at, status,
                   variables, created_at)
               SELECT :tenant, 'trigger-' || mod(n, 400), :who || mod(n, :people), 'o-' || n, :now, :now,
                      :status, '{}', :now
               FROM generate_series(1, :n) AS n"""
    firing = """INSERT INTO firings (tenant_id, trigger_id, profile_id, occurrence, idempotency_key, fired_at)
                SELECT :tenant, 'trigger-' || mod(n, 400), :who || mod(n, :people), 'o-' || n,
                       'k-' || :who || n, :now
                FROM generate_series(1, :n) AS n"""
    common = {"tenant": TENANT, "now": NOW}
    async with trigger_engine.begin() as conn:
        await conn.execute(
            sa.text(timer), common | {"who": "other", "people": 2000, "n": 8000, "status": "fired"}
        )
        await conn.execute(sa.text(timer), common | {"who": "gone", "people": 1, "n": 2, "status": "pending"})
        await conn.execute(sa.text(firing), common | {"who": "other", "people": 2000, "n": 8000})
        await conn.execute(sa.text(firing), common | {"who": "gone", "people": 1, "n": 1})
        await conn.execute(sa.text("ANALYZE timers, firings"))

    store = TriggerStore(trigger_engine)
    async with statements_run(trigger_engine) as seen, trigger_engine.begin() as conn:
        await store.merge_people(conn, [ProfileMerge(TENANT, "survivor", "gone0", NOW)], NOW)
    async with trigger_engine.connect() as conn:
        moved = await conn.execute(
            sa.select(sa.func.count()).select_from(timers).where(timers.c.profile_id == "survivor")
        )
        assert moved.scalar_one() == 2
        fired = await conn.execute(
            sa.select(sa.func.count()).select_from(firings).where(firings.c.profile_id == "survivor")
        )
        assert fired.scalar_one() == 1

    moving = [
        (s, p)
        for s, p in seen
        if s.startswith(("UPDATE timers", "DELETE FROM timers", "UPDATE firings", "DELETE FROM firings"))
    ]
    assert len(moving) == 4
    async with trigger_engine.connect() as conn:
        driver = await _driver(conn)
        for statement, parameters in moving:
            plan = await explain(driver, statement, parameters)
            # a few index pages, not the tenant's 16,000 rows (nor one index search per trigger)
            assert blocks_read(plan) <= 30, statement
