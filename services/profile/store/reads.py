"""Reading profiles: by id (a merged-away id yields the profile it went to), by customer id or email."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from datetime import datetime

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from relevans.kit.errors import NotFound
from services.profile.domain import PROFILE_ID, Lookup, Profile
from services.profile.domain.profiles import TraitValue
from services.profile.domain.traits import PRECEDENCE
from services.profile.store.rows import CONSENTS_JSON, TAGS_ARRAY, Definitions, enriched_of, parse_consents
from services.profile.store.tables import identities

_TRAIT_SOURCES = sa.text("""
SELECT profile_id, name, source, value, updated_at FROM profile_traits
WHERE tenant_id = :tenant AND profile_id = ANY(CAST(:ids AS text[]))
ORDER BY profile_id, name, array_position(CAST(:precedence AS text[]), source)
""")

# Profiles by requested id: each id's row, then the profile it stands for now, each by its primary
# key. The lateral subqueries with LIMIT 1 stay nested loops of key lookups whatever the planner
# estimates: joined plainly, a table without statistics yet (just imported) made it scan every
# profile of the tenant once per requested id, seconds for a batch of 200.
_LOAD = sa.text(f"""
SELECT q.profile_id AS requested, p.profile_id, p.customer_id, p.email, p.first_name, p.phone,
       p.created_at, p.updated_at, p.last_seen_at,
       p.traits, p.counters, p.last_seen_types, p.score, p.score_at, {TAGS_ARRAY} AS tags,
       {CONSENTS_JSON} AS consents,
       ARRAY(SELECT i.value FROM identities i
             WHERE i.tenant_id = p.tenant_id AND i.profile_id = p.profile_id AND i.kind = 'anonymous'
             ORDER BY i.created_at, i.value) AS anonymous_ids
FROM unnest(CAST(:ids AS text[])) AS k(profile_id)
CROSS JOIN LATERAL (
    SELECT q.profile_id, q.merged_into FROM profiles q
    WHERE q.tenant_id = :tenant AND q.profile_id = k.profile_id LIMIT 1
) AS q
CROSS JOIN LATERAL (
    SELECT * FROM profiles p
    WHERE p.tenant_id = :tenant AND p.profile_id = coalesce(q.merged_into, q.profile_id)
      AND p.merged_into IS NULL
    LIMIT 1
) AS p
""")


class ProfileReads:
    """Profiles as the API returns them; the other parts of the store `load` what they wrote with it."""

    def __init__(self, engine: AsyncEngine, definitions: Definitions) -> None:
        self.engine = engine
        self.definitions = definitions

    async def load(
        self,
        conn: AsyncConnection,
        tenant: str,
        profile_ids: Iterable[str],
        now: datetime,
        *,
        trait_sources: bool = False,
        merged: dict[str, str] | None = None,
    ) -> list[Profile]:
        """Profiles by id, in the order asked, each once; a merged-away id yields the profile it went
        to (recorded in `merged`, when given). Counters and score are as of `now`; every trait
        source's value only when asked."""
        ids = list(profile_ids)
        if not ids:
            return []
        rows = (await conn.execute(_LOAD, {"tenant": tenant, "ids": ids})).all()
        definitions = await self.definitions(conn, tenant)
        sources: dict[str, list[TraitValue]] = {}
        if trait_sources and rows:
            for t in await conn.execute(
                _TRAIT_SOURCES,
                {"tenant": tenant, "ids": [r.profile_id for r in rows], "precedence": list(PRECEDENCE)},
            ):
                sources.setdefault(t.profile_id, []).append(
                    TraitValue(t.name, t.source, t.value, t.updated_at)
                )
        by_requested = {r.requested: r for r in rows}
        out: dict[str, Profile] = {}
        for pid in ids:
            r = by_requested.get(pid)
            if r is None:
                continue
            if merged is not None and r.profile_id != pid:
                merged[pid] = r.profile_id
            if r.profile_id in out:
                continue
            out[r.profile_id] = Profile(
                profile_id=r.profile_id,
                customer_id=r.customer_id,
                email=r.email,
                first_name=r.first_name,
                anonymous_ids=tuple(r.anonymous_ids or ()),
                consents=parse_consents(r.consents),
                created_at=r.created_at,
                updated_at=r.updated_at,
                last_seen_at=r.last_seen_at,
                enriched=enriched_of(r, definitions, now),
                trait_sources=tuple(sources.get(r.profile_id, ())),
                phone=r.phone,
            )
        return list(out.values())

    async def get_profiles(
        self,
        tenant: str,
        profile_ids: Sequence[str],
        now: datetime,
        *,
        merged: dict[str, str] | None = None,
    ) -> list[Profile]:
        async with self.engine.connect() as conn:
            return await self.load(conn, tenant, profile_ids, now, merged=merged)

    async def find_profile(
        self, tenant: str, lookup: Lookup, now: datetime, *, trait_sources: bool = False
    ) -> Profile:
        """One profile by id, customer id or email; NotFound when the tenant has none."""
        async with self.engine.connect() as conn:
            if lookup.kind == PROFILE_ID:
                pid: str | None = lookup.value
            else:
                pid = await conn.scalar(
                    sa.select(identities.c.profile_id).where(
                        identities.c.tenant_id == tenant,
                        identities.c.kind == lookup.kind,
                        identities.c.value == lookup.value,
                    )
                )
            found = await self.load(conn, tenant, [pid], now, trait_sources=trait_sources) if pid else []
        if not found:
            raise NotFound(f"no profile with {lookup.kind} {lookup.value!r}")
        return found[0]
