"""A profile's traits by source (declared, backend, behavioural) and the effective ones, and the
TraitsChanged messages of their changes."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from datetime import datetime

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from relevans.kit.db import json_value
from relevans.kit.outbox import OutboxMessage, enqueue
from services.profile.domain import Profile
from services.profile.domain.traits import PRECEDENCE, TraitChange, TraitScalar, trait_change
from services.profile.store.reads import ProfileReads
from services.profile.store.rows import TraitsMessages, lock_existing, transaction
from services.profile.store.tables import outbox, profile_traits, profiles

# TraitsChanged, published whenever a write changes a profile's effective traits (the `traits` of
# GetProfile), in the write's transaction: SetTraits, Identify's declared traits, an import, a
# merge (each a `source` below). Not when ingest computes behavioural traits from events: those
# travel inside each EnrichedEvent's profile (rv.events.<partition>).
TRAITS_SUBJECT = "rv.profile.traits"
SET_TRAITS_SOURCE, IDENTIFY_SOURCE, IMPORT_SOURCE, MERGE_SOURCE = "set_traits", "identify", "import", "merge"

# (The row `old` is the profile as the statement found it: its effective traits before.)
_REFRESH_TRAITS = sa.text("""
UPDATE profiles p
SET traits = coalesce((
    SELECT jsonb_object_agg(e.name, e.value)
    FROM (SELECT DISTINCT ON (t.name) t.name, t.value
          FROM profile_traits t
          WHERE t.tenant_id = p.tenant_id AND t.profile_id = p.profile_id
          ORDER BY t.name, array_position(CAST(:precedence AS text[]), t.source)) e
), '{}'::jsonb)
FROM profiles old
WHERE p.tenant_id = :tenant AND p.profile_id = ANY(CAST(:ids AS text[]))
  AND old.tenant_id = p.tenant_id AND old.profile_id = p.profile_id
RETURNING p.profile_id, old.traits AS before, p.traits
""")


async def refresh_traits(conn: AsyncConnection, tenant: str, profile_ids: Sequence[str]) -> list[TraitChange]:
    """Recompute the effective traits (`profiles.traits`) of profiles whose profile_traits rows
    changed; call it in the same transaction after every write to profile_traits (the profiles
    locked). Returns the changes of the effective traits, in profile id order."""
    if not profile_ids:
        return []
    rows = await conn.execute(
        _REFRESH_TRAITS,
        {"tenant": tenant, "ids": sorted(set(profile_ids)), "precedence": list(PRECEDENCE)},
    )
    found = (trait_change(r.profile_id, json_value(r.before) or {}, json_value(r.traits) or {}) for r in rows)
    return sorted(filter(None, found), key=lambda c: c.profile_id)


def traits_messages(
    build: TraitsMessages, tenant: str, changes: Sequence[TraitChange], now: datetime, source: str
) -> list[OutboxMessage]:
    """The TraitsChanged outbox messages of some changes."""
    return [OutboxMessage(TRAITS_SUBJECT, payload) for payload in build(tenant, changes, now, source)]


# One source's values of traits, for any number of (profile, name) pairs; returns nothing.
SET_TRAITS = sa.text("""
INSERT INTO profile_traits AS t (tenant_id, profile_id, name, source, value, updated_at)
SELECT :tenant, u.profile_id, u.name, :source, CAST(u.value AS jsonb), :now
FROM unnest(CAST(:ids AS text[]), CAST(:names AS text[]), CAST(:vals AS text[])) AS u(profile_id, name, value)
ORDER BY u.profile_id, u.name
ON CONFLICT (tenant_id, profile_id, name, source) DO UPDATE
SET value = excluded.value, updated_at = excluded.updated_at
WHERE t.value IS DISTINCT FROM excluded.value
""")


async def write_traits(
    conn: AsyncConnection,
    tenant: str,
    profile_id: str,
    source: str,
    traits: Mapping[str, TraitScalar | None],
    now: datetime,
) -> list[TraitChange]:
    """Set (or, for None, remove) one source's values of a profile's traits; refresh the
    effective ones and return their change (none when they stay as they were)."""
    setting = {k: v for k, v in traits.items() if v is not None}
    removing = [k for k, v in traits.items() if v is None]
    if setting:
        await conn.execute(
            SET_TRAITS,
            {
                "tenant": tenant,
                "source": source,
                "now": now,
                "ids": [profile_id] * len(setting),
                "names": list(setting),
                "vals": [json.dumps(v) for v in setting.values()],
            },
        )
    if removing:
        await conn.execute(
            profile_traits.delete().where(
                profile_traits.c.tenant_id == tenant,
                profile_traits.c.profile_id == profile_id,
                profile_traits.c.source == source,
                profile_traits.c.name.in_(removing),
            )
        )
    return await refresh_traits(conn, tenant, [profile_id])


class TraitStore:
    """Declared and backend traits set through the API, with their TraitsChanged message."""

    def __init__(self, engine: AsyncEngine, traits_message: TraitsMessages, reads: ProfileReads) -> None:
        self.engine = engine
        self.traits_message = traits_message
        self.reads = reads

    async def set_traits(
        self,
        tenant: str,
        profile_id: str,
        source: str,
        traits: Mapping[str, TraitScalar | None],
        now: datetime,
    ) -> Profile:
        """Set declared or backend traits of an existing profile (NotFound otherwise)."""

        async def work(conn: AsyncConnection) -> Profile:
            target = await lock_existing(conn, tenant, profile_id)
            changes = await write_traits(conn, tenant, target, source, traits, now)
            await enqueue(
                conn,
                outbox,
                traits_messages(self.traits_message, tenant, changes, now, SET_TRAITS_SOURCE),
                now,
            )
            await conn.execute(
                profiles.update()
                .where(profiles.c.tenant_id == tenant, profiles.c.profile_id == target)
                .values(updated_at=now)
            )
            [profile] = await self.reads.load(conn, tenant, [target], now, trait_sources=True)
            return profile

        return await transaction(self.engine, work)
