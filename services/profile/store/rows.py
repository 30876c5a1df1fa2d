"""What the parts of the profile store share: resolving identifiers to profiles, locking a profile,
a profile row's enrichment columns, and running a transaction again when it lost a race.

Ingest, identify, import and reads all use these; they live here, below all of them, so none of
those modules imports another for them.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, TypeVar

import orjson
import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from relevans.conditions import ProfileView
from relevans.kit.db import json_value, run_transaction
from relevans.kit.errors import NotFound
from services.profile.domain import Consent, Key, ProfileState
from services.profile.domain.enrichment import (
    EnrichedState,
    Enrichment,
    counter_values,
    counters_from_json,
    last_seen_from_json,
    score_now,
    state_view,
)
from services.profile.domain.identity import Enriched
from services.profile.domain.traits import TraitChange
from services.profile.store.signals import SegmentRule

T = TypeVar("T")

MAX_ATTEMPTS = 8

# (tenant, profile id, consent) -> ConsentChanged payload
ConsentMessage = Callable[[str, str, Consent], bytes]
# (tenant, changes, change time, source) -> a TraitsChanged payload per change, in order
TraitsMessages = Callable[[str, Sequence[TraitChange], datetime, str], list[bytes]]
# (tenant, surviving profile id, merged profile id, merge time, reason) -> ProfileMerged payload
MergedMessage = Callable[[str, str, str, datetime, str], bytes]
# (connection, tenant) -> the tenant's enrichment definitions (see store/enrichment.py).
Definitions = Callable[[AsyncConnection, str], Awaitable[Enrichment]]
# A tenant's saved segments, compiled (cached like the definitions).
SegmentRuleSource = Callable[[AsyncConnection, str], Awaitable[list[SegmentRule]]]


class Conflict(Exception):
    """A concurrent transaction changed what this one read; run it again."""


async def transaction(engine: AsyncEngine, work: Callable[[AsyncConnection], Awaitable[T]]) -> T:
    """Run `work` in one transaction, again from the start if it lost a race."""
    return await run_transaction(engine, work, attempts=MAX_ATTEMPTS, again=(Conflict,))


CONSENTS_JSON = """(SELECT json_agg(json_build_array(c.purpose, c.channel, c.status, c.source, c.evidence,
                                      c.recorded_at) ORDER BY c.purpose, c.channel)
       FROM consents c WHERE c.tenant_id = p.tenant_id AND c.profile_id = p.profile_id)"""

TAGS_ARRAY = """ARRAY(SELECT t.tag FROM profile_tags t
       WHERE t.tenant_id = p.tenant_id AND t.profile_id = p.profile_id ORDER BY t.tag)"""

# The profiles some identifiers are bound to, by id only: ingest reads (and locks) the profiles
# afterwards (`IngestStore._profiles`), and what it read of them before the lock could be stale
# anyway. (The lateral subquery with LIMIT 1 stays a nested loop of primary key lookups whatever
# the planner estimates, however many identities the tenant has.)
BOUND_IDS = """
SELECT k.kind, k.value, i.profile_id
FROM unnest(CAST(:kinds AS text[]), CAST(:vals AS text[])) AS k(kind, value)
CROSS JOIN LATERAL (
    SELECT i.profile_id FROM identities i
    WHERE i.tenant_id = :tenant AND i.kind = k.kind AND i.value = k.value
    LIMIT 1
) AS i
"""
_RESOLVE = sa.text(BOUND_IDS)
# The profiles bound to some identifiers, each locked, in profile id order (the lock is taken on
# the outer scan of profiles, after the sort, so concurrent callers lock in one order).
_RESOLVE_LOCKED = sa.text(f"""
WITH r AS MATERIALIZED ({BOUND_IDS})
SELECT r.kind, r.value, p.profile_id, p.customer_id, p.email, p.first_name, p.merged_into, p.created_at
FROM r JOIN profiles p ON p.tenant_id = :tenant AND p.profile_id = r.profile_id
ORDER BY p.profile_id
FOR NO KEY UPDATE OF p
""")

_LOCK_PROFILE = sa.text("""
SELECT profile_id, merged_into, customer_id, created_at FROM profiles
WHERE tenant_id = :tenant AND profile_id = :profile_id
FOR NO KEY UPDATE
""")


def parse_consents(raw: Any) -> tuple[Consent, ...]:
    if not raw:
        return ()
    items = json_value(raw)
    return tuple(
        Consent(purpose, channel, status, source, evidence, datetime.fromisoformat(at))
        for purpose, channel, status, source, evidence, at in items
    )


def enriched_of(row: Any, definitions: Enrichment, now: datetime) -> Enriched:
    """The enriched part of a profile row (traits, counters, last_seen_types, score, score_at, tags)."""
    buckets = counters_from_json(row.counters)
    return Enriched(
        traits=row.traits or {},
        tags=tuple(row.tags or ()),
        counters=tuple(counter_values(definitions.counters, buckets, now)),
        score=score_now(row.score, row.score_at, row.traits or {}, definitions.scoring, now),
        last_seen={t: datetime.fromisoformat(v) for t, v in (row.last_seen_types or {}).items()},
    )


@dataclass(slots=True)
class EnrichedRow:
    """A profile's enrichment columns as ingest read them, and the trait names a declared or backend
    value holds (a behavioural value of those does not become effective)."""

    traits: dict[str, object]
    enriched: EnrichedState
    tags: tuple[str, ...]
    held_traits: frozenset[str]
    # The version read: where the row is (block, line) and the transaction that wrote it, for the update.
    ctid: tuple[int, int] | None = None
    xmin: int | None = None

    @classmethod
    def of(cls, r: Any) -> EnrichedRow:
        return cls.of_columns(
            r.traits, r.counters, r.last_seen_types, r.score, r.score_at, r.tags, r.held_traits
        )

    @classmethod
    def of_columns(
        cls,
        traits: dict[str, object] | None,
        counters: dict[str, dict[str, int]] | None,
        last_seen_types: dict[str, str] | None,
        score: float,
        score_at: datetime | None,
        tags: Sequence[str] | None,
        held_traits: Sequence[str] | None,
    ) -> EnrichedRow:
        return cls(
            traits if traits else {},  # decoded for this row alone: no copy needed
            EnrichedState(
                counters_from_json(counters) if counters else {},
                last_seen_from_json(last_seen_types),
                score,
                score_at,
            ),
            tuple(tags) if tags else (),
            frozenset(held_traits) if held_traits else frozenset(),
        )

    @classmethod
    def empty(cls) -> EnrichedRow:
        return cls({}, EnrichedState(), (), frozenset())

    def view(self, consents: Sequence[Consent], definitions: Enrichment, now: datetime) -> ProfileView:
        return state_view(
            self.enriched,
            traits=self.traits,
            tags=self.tags,
            consents={(c.purpose, c.channel): c.status for c in consents},
            enrichment=definitions,
            now=now,
        )


def _bound_state(profile_id: str, profile: Sequence[Any]) -> ProfileState:
    """A resolved profile's state: its id alone, or what `_RESOLVE_LOCKED` read of it."""
    if not profile:
        return ProfileState(profile_id)
    customer_id, email, first_name, merged_into, created_at = profile
    if merged_into is not None:
        raise Conflict
    return ProfileState(profile_id, customer_id, email, first_name, created_at=created_at)


async def resolve(
    conn: AsyncConnection, tenant: str, keys: list[Key], *, lock: bool = False
) -> dict[Key, ProfileState]:
    """The profiles bound to `keys`. Locked (identify), each is read whole, and a merged-away one
    means start again. Unlocked (ingest), each is known by id only until `IngestStore._profiles`
    reads it: a plan may take an identifier to fill in a customer_id or email the profile already
    has, and the write keeps the profile's own (`coalesce` in ingest's `_STORE`; `_profiles`
    refreshes the state)."""
    if not keys:
        return {}
    rows = await conn.execute(
        _RESOLVE_LOCKED if lock else _RESOLVE,
        {"tenant": tenant, "kinds": [k for k, _ in keys], "vals": [v for _, v in keys]},
    )
    states: dict[str, ProfileState] = {}
    bound: dict[Key, ProfileState] = {}
    for kind, value, profile_id, *profile in rows:
        state = states.get(profile_id)
        if state is None:
            state = states[profile_id] = _bound_state(profile_id, profile)
        bound[(kind, value)] = state
    return bound


async def lock_existing(conn: AsyncConnection, tenant: str, profile_id: str) -> str:
    """Lock a profile by id (a merged-away id stands for the profile it was merged into);
    NotFound when the tenant has no such profile. Returns the locked profile's id."""
    return (await lock_row(conn, tenant, profile_id)).profile_id


async def lock_row(conn: AsyncConnection, tenant: str, profile_id: str) -> Any:
    target = profile_id
    for _ in range(2):
        row = (await conn.execute(_LOCK_PROFILE, {"tenant": tenant, "profile_id": target})).first()
        if row is None:
            raise NotFound(f"profile {profile_id!r} not found")
        if row.merged_into is None:
            return row
        target = row.merged_into
    raise Conflict


def dumps(value: Any) -> str:
    """Compact JSON for jsonb parameters."""
    return orjson.dumps(value).decode()
