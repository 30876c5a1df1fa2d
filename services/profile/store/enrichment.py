"""A tenant's enrichment definitions in PostgreSQL: counters, computed traits, scoring rules.

`load_enrichment` reads all three in one round trip; ingest reads them through a `TenantCache`.
`EnrichmentStore` is what EnrichmentService writes and lists with.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, Generic, TypeVar

import sqlalchemy as sa
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from relevans.kit.clock import Clock
from relevans.kit.db import json_value, run_transaction
from relevans.kit.errors import AlreadyExists, FailedPrecondition, FieldViolation, InvalidArgument, NotFound
from services.profile.domain.counters import MAX_COUNTERS_PER_TENANT, CounterDefinition
from services.profile.domain.definitions import MAX_COMPUTED_TRAITS_PER_TENANT
from services.profile.domain.enrichment import (
    ComputedTrait,
    Enrichment,
    Scoring,
    scoring_from_json,
    scoring_to_json,
)
from services.profile.domain.segment_rules import check_answerable, parse
from services.profile.store.tables import computed_traits, counter_definitions, scoring_rules, segments

T = TypeVar("T")
R = TypeVar("R")

# One round trip: each kind of definition aggregated to a JSON value (NULL when the tenant has none).
_LOAD = sa.text("""
SELECT
  (SELECT json_agg(json_build_object('name', c.name, 'event_type', c.event_type, 'windows', c.windows,
                                     'property', c.property, 'property_value', c.property_value,
                                     'thresholds', c.thresholds) ORDER BY c.name)
   FROM counter_definitions c WHERE c.tenant_id = :tenant) AS counters,
  (SELECT json_agg(json_build_object('name', t.name, 'event_type', t.event_type, 'property', t.property)
                   ORDER BY t.name)
   FROM computed_traits t WHERE t.tenant_id = :tenant) AS computed_traits,
  (SELECT json_build_object('rules', s.rules, 'half_life_days', s.half_life_days,
                            'thresholds', s.thresholds)
   FROM scoring_rules s WHERE s.tenant_id = :tenant) AS scoring
""")


def counter_from_row(row: Mapping[Any, Any]) -> CounterDefinition:
    return CounterDefinition(
        name=row["name"],
        event_type=row["event_type"],
        windows=tuple(row["windows"]),
        property=row["property"],
        property_value=row["property_value"],
        thresholds=tuple(row["thresholds"]),
    )


def scoring_from_row(row: Mapping[Any, Any] | None) -> Scoring:
    if row is None:
        return Scoring()
    return scoring_from_json(
        json_value(row["rules"]), int(row["half_life_days"]), [float(t) for t in row["thresholds"]]
    )


async def load_enrichment(conn: AsyncConnection, tenant: str) -> Enrichment:
    """The tenant's definitions: counters and computed traits by name, scoring (empty when none)."""
    row = (await conn.execute(_LOAD, {"tenant": tenant})).one()
    return Enrichment(
        counters=tuple(counter_from_row(c) for c in json_value(row.counters) or ()),
        computed_traits=tuple(
            ComputedTrait(t["name"], t["event_type"], t["property"])
            for t in json_value(row.computed_traits) or ()
        ),
        scoring=scoring_from_row(json_value(row.scoring)),
    )


DEFAULT_TTL = timedelta(seconds=1)


class TenantCache(Generic[T]):
    """What ingest reads of a tenant on every batch (its enrichment definitions, its segments), kept
    for `ttl` of the clock's time so ingest does not read it for every batch. A definition or segment
    saved through another process therefore applies to events received up to `ttl` after it was
    saved; one saved through this process applies at once, as its writer calls `invalidate` after
    committing."""

    def __init__(
        self, clock: Clock, load: Callable[[AsyncConnection, str], Awaitable[T]], ttl: timedelta = DEFAULT_TTL
    ) -> None:
        self.clock = clock
        self.load = load
        self.ttl = ttl
        self._entries: dict[str, tuple[datetime, T]] = {}
        # Bumped by `invalidate`: a load that started before it must not be cached after it.
        self._generations: dict[str, int] = {}

    async def get(self, conn: AsyncConnection, tenant: str) -> T:
        now = self.clock.now()
        entry = self._entries.get(tenant)
        if entry is not None and now < entry[0]:
            return entry[1]
        generation = self._generations.get(tenant, 0)
        value = await self.load(conn, tenant)
        if self._generations.get(tenant, 0) == generation:
            self._entries[tenant] = (now + self.ttl, value)
        return value

    def invalidate(self, tenant: str) -> None:
        """Forget what is cached of the tenant; call it after committing a change to it."""
        self._entries.pop(tenant, None)
        self._generations[tenant] = self._generations.get(tenant, 0) + 1


# ---------------------------------------------------------------------------------------------- store

MAX_ATTEMPTS = 5

# Writers of one tenant's definitions take turns, so a limit checked before an insert still holds.
_LOCK_TENANT = sa.text("SELECT pg_advisory_xact_lock(hashtextextended(:key, 0))")

# Forget a deleted counter's buckets, locking the profiles in profile id order as ingest does.
_DROP_COUNTS = sa.text("""
WITH locked AS (
    SELECT profile_id FROM profiles
    WHERE tenant_id = :tenant AND jsonb_exists(counters, :name)
    ORDER BY profile_id
    FOR NO KEY UPDATE
)
UPDATE profiles p SET counters = p.counters - CAST(:name AS text)
FROM locked l
WHERE p.tenant_id = :tenant AND p.profile_id = l.profile_id
""")


@dataclass(frozen=True, slots=True)
class Dated(Generic[T]):
    """A definition and when it was created (counters, computed traits) or last set (scoring; None
    when never set)."""

    value: T
    at: datetime | None


class EnrichmentStore:
    def __init__(self, engine: AsyncEngine) -> None:
        self.engine = engine

    async def _transaction(self, work: Callable[[AsyncConnection], Awaitable[R]]) -> R:
        """Run `work` in one transaction, again if it lost a deadlock with ingest."""
        return await run_transaction(self.engine, work, attempts=MAX_ATTEMPTS)

    async def _lock_tenant(self, conn: AsyncConnection, kind: str, tenant: str) -> None:
        await conn.execute(_LOCK_TENANT, {"key": f"{kind}:{tenant}"})

    # ---- counters ---------------------------------------------------------------------------------

    async def create_counter(
        self, tenant: str, defn: CounterDefinition, now: datetime
    ) -> Dated[CounterDefinition]:
        """Add a (validated) counter; AlreadyExists for a taken name, InvalidArgument past the limit."""
        table = counter_definitions

        async def work(conn: AsyncConnection) -> Dated[CounterDefinition]:
            await self._lock_tenant(conn, "counters", tenant)
            await self._check_new(conn, table, tenant, defn.name, "counter", MAX_COUNTERS_PER_TENANT)
            await conn.execute(
                table.insert().values(
                    tenant_id=tenant,
                    name=defn.name,
                    event_type=defn.event_type,
                    windows=list(defn.windows),
                    property=defn.property,
                    # SQL NULL, not JSON null, when the counter counts every event of its type.
                    property_value=sa.null() if defn.property_value is None else defn.property_value,
                    thresholds=list(defn.thresholds),
                    created_at=now,
                )
            )
            return Dated(defn, now)

        return await self._transaction(work)

    async def list_counters(self, tenant: str) -> list[Dated[CounterDefinition]]:
        async with self.engine.connect() as conn:
            rows = await conn.execute(
                sa.select(counter_definitions)
                .where(counter_definitions.c.tenant_id == tenant)
                .order_by(counter_definitions.c.name)
            )
            return [Dated(counter_from_row(r._mapping), r.created_at) for r in rows]

    async def delete_counter(self, tenant: str, name: str) -> None:
        """Remove a counter and every profile's counts of it; NotFound when the tenant has none,
        FailedPrecondition while a saved segment needs it (its condition would change meaning)."""

        async def work(conn: AsyncConnection) -> None:
            await self._lock_tenant(conn, "counters", tenant)
            await self._delete(conn, counter_definitions, tenant, name, "counter")
            without = Enrichment(counters=(await load_enrichment(conn, tenant)).counters)
            needing = []
            for row in await conn.execute(
                sa.select(segments.c.name, segments.c.condition)
                .where(segments.c.tenant_id == tenant)
                .order_by(segments.c.name)
            ):
                try:
                    check_answerable(parse(row.condition), without)
                except InvalidArgument:
                    needing.append(row.name)
            if needing:
                raise FailedPrecondition(
                    f"counter {name!r} is used by segment(s) {', '.join(needing)}; delete them first"
                )
            await conn.execute(_DROP_COUNTS, {"tenant": tenant, "name": name})

        await self._transaction(work)

    # ---- computed traits --------------------------------------------------------------------------

    async def create_computed_trait(
        self, tenant: str, trait: ComputedTrait, now: datetime
    ) -> Dated[ComputedTrait]:
        table = computed_traits

        async def work(conn: AsyncConnection) -> Dated[ComputedTrait]:
            await self._lock_tenant(conn, "computed_traits", tenant)
            await self._check_new(
                conn, table, tenant, trait.name, "computed_trait", MAX_COMPUTED_TRAITS_PER_TENANT
            )
            await conn.execute(
                table.insert().values(
                    tenant_id=tenant,
                    name=trait.name,
                    event_type=trait.event_type,
                    property=trait.property,
                    created_at=now,
                )
            )
            return Dated(trait, now)

        return await self._transaction(work)

    async def list_computed_traits(self, tenant: str) -> list[Dated[ComputedTrait]]:
        async with self.engine.connect() as conn:
            rows = await conn.execute(
                sa.select(computed_traits)
                .where(computed_traits.c.tenant_id == tenant)
                .order_by(computed_traits.c.name)
            )
            return [Dated(ComputedTrait(r.name, r.event_type, r.property), r.created_at) for r in rows]

    async def delete_computed_trait(self, tenant: str, name: str) -> None:
        """Stop computing a trait; the values it set stay on the profiles."""
        await self._transaction(
            lambda conn: self._delete(conn, computed_traits, tenant, name, "computed trait")
        )

    # ---- scoring ----------------------------------------------------------------------------------

    async def set_scoring(self, tenant: str, scoring: Scoring, now: datetime) -> Dated[Scoring]:
        """Replace the tenant's (validated) scoring rules."""
        values = {
            "rules": scoring_to_json(scoring),
            "half_life_days": scoring.half_life_days,
            "thresholds": list(scoring.thresholds),
            "updated_at": now,
        }
        stmt = insert(scoring_rules).values(tenant_id=tenant, **values)
        stmt = stmt.on_conflict_do_update(index_elements=[scoring_rules.c.tenant_id], set_=values)
        await self._transaction(lambda conn: conn.execute(stmt))
        return Dated(scoring, now)

    async def get_scoring(self, tenant: str) -> Dated[Scoring]:
        """The tenant's scoring rules; empty, with no time, when never set."""
        async with self.engine.connect() as conn:
            row = (
                await conn.execute(sa.select(scoring_rules).where(scoring_rules.c.tenant_id == tenant))
            ).first()
        if row is None:
            return Dated(Scoring(), None)
        return Dated(scoring_from_row(row._mapping), row.updated_at)

    # ---- shared -----------------------------------------------------------------------------------

    async def _check_new(
        self, conn: AsyncConnection, table: sa.Table, tenant: str, name: str, field: str, limit: int
    ) -> None:
        row = (
            await conn.execute(
                sa.select(
                    sa.func.count(),
                    sa.func.coalesce(sa.func.bool_or(table.c.name == name), False),
                ).where(table.c.tenant_id == tenant)
            )
        ).one()
        total, taken = row
        if taken:
            raise AlreadyExists(f"a {field.replace('_', ' ')} named {name!r} already exists")
        if total >= limit:
            raise InvalidArgument(
                FieldViolation(f"{field}.name", f"the tenant already has {limit}, the most allowed")
            )

    async def _delete(
        self, conn: AsyncConnection, table: sa.Table, tenant: str, name: str, what: str
    ) -> None:
        deleted = await conn.execute(
            table.delete().where(table.c.tenant_id == tenant, table.c.name == name).returning(table.c.name)
        )
        if deleted.first() is None:
            raise NotFound(f"no {what} named {name!r}")
