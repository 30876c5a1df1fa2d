"""Enrichment definitions on real PostgreSQL: loading them for ingest, the per-tenant cache, the store."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta

import pytest
import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncEngine

from relevans.kit.clock import ManualClock
from relevans.kit.errors import AlreadyExists, InvalidArgument, NotFound
from services.profile.domain.counters import MAX_COUNTERS_PER_TENANT, CounterDefinition
from services.profile.domain.enrichment import (
    ComputedTrait,
    Enrichment,
    EventMatch,
    ScoreRule,
    Scoring,
    TraitMatch,
    scoring_to_json,
)
from services.profile.store.enrichment import Dated, EnrichmentStore, TenantCache, load_enrichment
from services.profile.store.tables import (
    computed_traits,
    counter_definitions,
    profile_traits,
    profiles,
    scoring_rules,
)

A, B = "tenant-a", "tenant-b"
T0 = datetime(2026, 1, 5, 9, 0, tzinfo=UTC)


async def insert_counter(db: AsyncEngine, tenant: str, d: CounterDefinition) -> None:
    async with db.begin() as conn:
        await conn.execute(
            counter_definitions.insert().values(
                tenant_id=tenant,
                name=d.name,
                event_type=d.event_type,
                windows=list(d.windows),
                property=d.property,
                property_value=d.property_value,
                thresholds=list(d.thresholds),
                created_at=T0,
            )
        )


async def test_load_enrichment_reads_one_tenants_definitions(db: AsyncEngine) -> None:
    views = CounterDefinition("toy_views", "page_view", (1, 7), "category", "toys", (3, 11))
    seats = CounterDefinition("big_orders", "order", (30,), "seats", 3.0)
    buys = CounterDefinition("buys", "order")
    for d in (views, seats, buys):
        await insert_counter(db, A, d)
    await insert_counter(db, B, CounterDefinition("other", "order"))
    scoring = Scoring(
        (
            ScoreRule(5.0, event=EventMatch("order", "seats", 3.0)),
            ScoreRule(-2.5, event=EventMatch("page_view")),
            ScoreRule(10.0, trait=TraitMatch("vip", True)),
        ),
        14,
        (50.0, 100.5),
    )
    async with db.begin() as conn:
        await conn.execute(
            computed_traits.insert(),
            [
                {"tenant_id": A, "name": "fav_show", "event_type": "ticket_view", "property": "show",
                 "created_at": T0},
                {"tenant_id": A, "name": "city", "event_type": "order", "property": "city", "created_at": T0},
            ],
        )  # fmt: skip
        await conn.execute(
            scoring_rules.insert().values(
                tenant_id=A,
                rules=scoring_to_json(scoring),
                half_life_days=14,
                thresholds=[100.5, 50.0],
                updated_at=T0,
            )
        )

    async with db.connect() as conn:
        a = await load_enrichment(conn, A)
        b = await load_enrichment(conn, B)
        empty = await load_enrichment(conn, "nobody")

    assert a == Enrichment(
        counters=(seats, buys, views),
        computed_traits=(
            ComputedTrait("city", "order", "city"),
            ComputedTrait("fav_show", "ticket_view", "show"),
        ),
        scoring=scoring,
    )
    assert isinstance(a.counters[0].property_value, float)  # numbers stay as given
    assert b == Enrichment(counters=(CounterDefinition("other", "order"),))
    assert empty == Enrichment() and empty.scoring == Scoring()


async def test_cache_keeps_definitions_for_its_ttl_and_forgets_them_on_invalidate(db: AsyncEngine) -> None:
    clock = ManualClock(T0)
    cache = TenantCache(clock, load_enrichment, ttl=timedelta(seconds=1))
    async with db.connect() as conn:
        assert await cache.get(conn, A) == Enrichment()
    await insert_counter(db, A, CounterDefinition("buys", "order"))

    async with db.connect() as conn:
        assert await cache.get(conn, A) == Enrichment()  # still cached
        await clock.advance(1)
        assert [d.name for d in (await cache.get(conn, A)).counters] == ["buys"]

    await insert_counter(db, A, CounterDefinition("views", "page_view"))
    cache.invalidate(A)
    async with db.connect() as conn:
        assert [d.name for d in (await cache.get(conn, A)).counters] == ["buys", "views"]
        assert await cache.get(conn, B) == Enrichment()  # tenants are cached apart


async def test_cache_does_not_keep_a_load_that_an_invalidate_overtook(db: AsyncEngine) -> None:
    cache = TenantCache(ManualClock(T0), load_enrichment)
    async with db.connect() as conn:
        load = asyncio.create_task(cache.get(conn, A))
        await asyncio.sleep(0)  # the load has started and waits for PostgreSQL
        cache.invalidate(A)  # a write committed meanwhile
        assert await load == Enrichment()
    await insert_counter(db, A, CounterDefinition("buys", "order"))
    async with db.connect() as conn:
        assert [d.name for d in (await cache.get(conn, A)).counters] == ["buys"]


# ---------------------------------------------------------------------------------------------- store


@pytest.fixture
def store(db: AsyncEngine) -> EnrichmentStore:
    return EnrichmentStore(db)


async def test_counters_are_created_listed_and_deleted_per_tenant(store: EnrichmentStore) -> None:
    views = CounterDefinition("toy_views", "page_view", (1, 7), "category", "toys", (3, 11))
    saved = await store.create_counter(A, views, T0)
    assert saved == Dated(views, T0)
    await store.create_counter(A, CounterDefinition("buys", "order", (30,), "seats", 3.0), T0)
    await store.create_counter(B, CounterDefinition("buys", "order"), T0)  # names are per tenant

    listed = await store.list_counters(A)
    assert [(d.value.name, d.at) for d in listed] == [("buys", T0), ("toy_views", T0)]
    assert listed[0].value.property_value == 3.0 and listed[1].value == views

    with pytest.raises(AlreadyExists):
        await store.create_counter(A, CounterDefinition("buys", "page_view"), T0)
    await store.delete_counter(A, "buys")
    assert [d.value.name for d in await store.list_counters(A)] == ["toy_views"]
    assert [d.value.name for d in await store.list_counters(B)] == ["buys"]
    with pytest.raises(NotFound):
        await store.delete_counter(A, "buys")


async def test_deleting_a_counter_drops_its_counts_from_the_tenants_profiles(
    db: AsyncEngine, store: EnrichmentStore
) -> None:
    counts = {"buys": {"2026-01-05": 2}, "views": {"2026-01-04": 1}}
    async with db.begin() as conn:
        await conn.execute(
            profiles.insert(),
            [
                {"tenant_id": t, "profile_id": p, "created_at": T0, "updated_at": T0, "counters": c}
                for t, p, c in [(A, "p1", counts), (A, "p2", {"views": {"2026-01-05": 4}}), (B, "p1", counts)]
            ],
        )
    await store.create_counter(A, CounterDefinition("buys", "order"), T0)
    await store.delete_counter(A, "buys")
    async with db.connect() as conn:
        rows = await conn.execute(sa.select(profiles.c.tenant_id, profiles.c.profile_id, profiles.c.counters))
        left = {(r.tenant_id, r.profile_id): r.counters for r in rows}
    assert left == {
        (A, "p1"): {"views": {"2026-01-04": 1}},
        (A, "p2"): {"views": {"2026-01-05": 4}},
        (B, "p1"): counts,  # another tenant's counter of that name
    }


async def test_a_tenant_has_at_most_the_allowed_number_of_counters(
    db: AsyncEngine, store: EnrichmentStore
) -> None:
    async with db.begin() as conn:
        await conn.execute(
            counter_definitions.insert(),
            [
                {"tenant_id": A, "name": f"c{i}", "event_type": "e", "windows": [7], "thresholds": [],
                 "created_at": T0}
                for i in range(MAX_COUNTERS_PER_TENANT - 1)
            ],
        )  # fmt: skip
    # Several at once for the last place: exactly one gets it.
    outcomes = await asyncio.gather(
        *(store.create_counter(A, CounterDefinition(f"last_{i}", "e"), T0) for i in range(4)),
        return_exceptions=True,
    )
    failed = [o for o in outcomes if isinstance(o, Exception)]
    assert len(failed) == 3 and all(isinstance(f, InvalidArgument) for f in failed)
    assert {v.field for f in failed for v in f.violations} == {"counter.name"}  # type: ignore[attr-defined]
    assert len(await store.list_counters(A)) == MAX_COUNTERS_PER_TENANT
    await store.create_counter(B, CounterDefinition("c0", "e"), T0)


async def test_computed_traits_and_deleting_one_keeps_the_values_it_set(
    db: AsyncEngine, store: EnrichmentStore
) -> None:
    show = ComputedTrait("favourite_show", "ticket_view", "show")
    assert await store.create_computed_trait(A, show, T0) == Dated(show, T0)
    await store.create_computed_trait(A, ComputedTrait("city", "order", "city"), T0)
    with pytest.raises(AlreadyExists):
        await store.create_computed_trait(A, ComputedTrait("city", "page_view", "city"), T0)
    assert [d.value for d in await store.list_computed_traits(A)] == [
        ComputedTrait("city", "order", "city"),
        show,
    ]
    assert await store.list_computed_traits(B) == []

    async with db.begin() as conn:
        await conn.execute(
            profiles.insert().values(tenant_id=A, profile_id="p1", created_at=T0, updated_at=T0)
        )
        await conn.execute(
            profile_traits.insert().values(
                tenant_id=A, profile_id="p1", name="favourite_show", source="behavioural", value="Hamlet",
                updated_at=T0,
            )
        )  # fmt: skip
    with pytest.raises(NotFound):
        await store.delete_computed_trait(B, "favourite_show")
    await store.delete_computed_trait(A, "favourite_show")
    assert [d.value.name for d in await store.list_computed_traits(A)] == ["city"]
    async with db.connect() as conn:
        assert await conn.scalar(sa.select(profile_traits.c.value)) == "Hamlet"


async def test_scoring_rules_are_replaced_whole(store: EnrichmentStore) -> None:
    assert await store.get_scoring(A) == Dated(Scoring(), None)
    first = Scoring(
        (
            ScoreRule(5.0, event=EventMatch("order", "seats", 3.0)),
            ScoreRule(10.0, trait=TraitMatch("vip", True)),
        ),
        30,
        (50.0, 100.0),
    )
    assert await store.set_scoring(A, first, T0) == Dated(first, T0)
    assert await store.get_scoring(A) == Dated(first, T0)
    later = T0 + timedelta(hours=1)
    second = Scoring((ScoreRule(-1.5, event=EventMatch("unsubscribe")),))
    await store.set_scoring(A, second, later)
    assert await store.get_scoring(A) == Dated(second, later)
    assert await store.get_scoring(B) == Dated(Scoring(), None)
