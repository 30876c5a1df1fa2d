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

from relevans.kit.clock import ManualClock
from relevans.kit.db import create_engine
from relevans.kit.merges import ProfileMerge
from relevans.kit.settings import Settings
from services.delivery.store import Claim, DeliveryStore, MessageRow
from services.profile.store import ProfileStore
from services.profile.store.enrichment import TenantCache, load_enrichment
from services.profile.store.gdpr import GdprStore
from services.profile.store.signals import SegmentRules
from services.profile.wire import consent_changed, profile_merged, traits_changed
from services.trigger.store import TriggerStore
from services.trigger.tables import firings, timers
from tests.helpers.plans import blocks_read, explain, rows_read, statements_run

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
async def profile_engine(settings: Settings) -> AsyncIterator[AsyncEngine]:
    engine = create_engine(settings.database_url("profile"))
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
    timer = """INSERT INTO timers (tenant_id, trigger_id, profile_id, occurrence, started_at, due_at,
                   first_due_at, status, variables, created_at)
               SELECT :tenant, 'trigger-' || mod(n, 400), :who || mod(n, :people), 'o-' || n, :now, :now,
                      :now, :status, '{}', :now
               FROM generate_series(1, :n) AS n"""
    firing = """INSERT INTO firings (tenant_id, trigger_id, profile_id, occurrence, idempotency_key, fired_at,
                   channel, purpose)
                SELECT :tenant, 'trigger-' || mod(n, 400), :who || mod(n, :people), 'o-' || n,
                       'k-' || :who || n, :now, 'email', 'marketing'
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


async def test_merges_exports_and_erasures_find_a_persons_shadows_without_reading_every_profile(
    profile_engine: AsyncEngine, clock: ManualClock
) -> None:
    """Every anonymous visitor who signs in leaves a merged shadow profile and a merge record; a
    merge, an export and an erasure each look up one person's among the tenant's."""
    profile = """INSERT INTO profiles (tenant_id, profile_id, merged_into, created_at, updated_at)
                 SELECT :tenant, :who || n, CASE WHEN :shadows THEN 'known' || mod(n, 1000) END, :now, :now
                 FROM generate_series(1, :n) AS n"""
    merge = """INSERT INTO merges (tenant_id, from_profile_id, to_profile_id, source, merged_at)
               SELECT :tenant, 'anon' || n, 'known' || mod(n, 1000), 'identify', :now
               FROM generate_series(1, :n) AS n"""
    common = {"tenant": TENANT, "now": NOW}
    async with profile_engine.begin() as conn:
        await conn.execute(sa.text(profile), common | {"who": "known", "n": 6000, "shadows": False})
        await conn.execute(sa.text(profile), common | {"who": "anon", "n": 6000, "shadows": True})
        await conn.execute(sa.text(merge), common | {"n": 6000})
        # the person: "gone1" has a shadow of its own and is merged into "known1", the one with
        # a customer id
        await conn.execute(sa.text(profile), common | {"who": "gone", "n": 1, "shadows": False})
        await conn.execute(sa.text("UPDATE profiles SET merged_into = 'gone1' WHERE profile_id = 'anon1'"))
        await conn.execute(sa.text("UPDATE profiles SET customer_id = 'c-1' WHERE profile_id = 'known1'"))
        await conn.execute(sa.text("ANALYZE profiles, merges"))

    store = ProfileStore(
        profile_engine,
        consent_message=consent_changed,
        merged_message=profile_merged,
        traits_message=traits_changed,
        definitions=TenantCache(clock, load_enrichment).get,
        segment_rules=TenantCache(clock, SegmentRules().load).get,
    )
    gdpr = GdprStore(profile_engine)
    async with statements_run(profile_engine) as seen:
        survivor, merged = await store.merge_profiles(TENANT, "known1", "gone1", NOW)
        exported = await gdpr.export(TENANT, "known1")
        await gdpr.erase(TENANT, "known1", "erase-1", NOW, make_id=lambda: "erasure-1")
    assert (survivor.profile_id, merged) == ("known1", "gone1")
    shadows = [f"anon{n}" for n in range(1, 6000, 1000)]
    assert sorted(m.from_profile_id for m in exported.merges) == [*shadows, "gone1"]

    finding = [
        (s, p)
        for s, p in seen
        if ("merged_into" in s and s.startswith(("UPDATE profiles", "SELECT profiles.profile_id")))
        or (s.startswith(("SELECT merges", "DELETE FROM merges")))
    ]
    assert len(finding) == 5  # the merge's update, the export's shadows and merges, the erasure's
    async with profile_engine.connect() as conn:
        driver = await _driver(conn)
        for statement, parameters in finding:
            plan = await explain(driver, statement, parameters)
            # the person's few rows, not the tenant's 12,000 profiles or 6,000 merges
            assert rows_read(plan) <= 20, statement


async def test_the_send_path_plans_each_batch_for_the_table_as_it_is_now(
    settings: Settings, delivery_engine: AsyncEngine
) -> None:
    # A connection keeps a prepared statement's plan once PostgreSQL finds the generic plan no
    # worse than the first five it made for their parameters; made while `messages` was empty, that
    # plan read the whole table for every batch once it had grown. The send path plans every run.
    message = """INSERT INTO messages (tenant_id, message_id, idempotency_key, profile_id, trigger_id,
                     channel, purpose, template_id, variables, status, reason, recipient, subject,
                     attempts, created_at, updated_at)
                 SELECT :tenant, 'm-' || n, 'k-' || n, 'p-' || n, 'cart', 'email', 'marketing', 'tpl',
                        '{}', 'pending', '', '', '', 0, :now, :now
                 FROM generate_series(1, :n) AS n"""
    async with delivery_engine.begin() as conn:
        await conn.execute(sa.text(message), {"tenant": TENANT, "n": 20, "now": NOW})

    async def plans(engine: AsyncEngine) -> tuple[int, int]:
        """(generic, custom) plans of the send journal's statement on the engine's one connection."""
        store = DeliveryStore(delivery_engine, engine)
        for n in range(1, 11):
            row = MessageRow(TENANT, f"m-{n}", f"k-{n}", f"p-{n}", "cart", "pending", 0)
            await store.record_sends([Claim(row, f"p{n}@example.com", "s")], [], [], NOW)
        async with engine.connect() as conn:
            found = await (await _driver(conn)).fetchrow(
                "SELECT generic_plans, custom_plans FROM pg_prepared_statements"
                r" WHERE statement ~ '^\s*WITH u AS' AND statement LIKE '%), claimed AS (%'"
            )
        assert found is not None
        return found["generic_plans"], found["custom_plans"]

    general = create_engine(settings.database_url("delivery"), pool_size=1)
    # the send path's connections (`Runtime.lookup_engine(plan_each_run=True)` in delivery's app)
    sending = create_engine(settings.database_url("delivery"), lookups_only=True, plan_each_run=True)
    try:
        generic, _ = await plans(general)
        assert generic > 0  # what the send path would get on an ordinary connection
        assert await plans(sending) == (0, 10)
    finally:
        await general.dispose()
        await sending.dispose()
