"""Ingest (Track): storing batches of events and what they change of their profiles.

Ingest is batched: a `BatchTrack` of 500 events takes a handful of round trips
whatever its size — one query resolves every identifier of the batch and finds
the message ids stored before (those events are left out), one reads the
existing profiles the batch writes to, and one statement binds the new
identifiers, creates new profiles, updates the existing ones, stores the events
and enqueues their outbox messages.

Concurrency: a batch is first written without locks: the storing statement
updates a profile only where the version read still is, and fails with nothing
written when an identifier was bound or a profile changed meanwhile. The batch
then runs in a transaction that binds new identifiers with `ON CONFLICT DO
NOTHING` (one a concurrent call bound first is resolved to that call's profile
and the batch planned again) and locks the existing profiles it writes to
(`FOR NO KEY UPDATE`, in profile id order) before writing, so a merge and an
ingest of the same profile serialise; a transaction that lost a race it cannot
repair (a profile merged away meanwhile, an event a concurrent call stored
first, a deadlock) is retried whole.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Mapping, Sequence
from datetime import datetime
from typing import Any

import asyncpg
import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from relevans.kit.db import DriverStatement, driver_connection
from relevans.kit.outbox import enqueue
from services.profile.domain import (
    Event,
    Key,
    ProfileState,
    TrackPlan,
    apply_bindings,
    event_keys,
    first_occurrences,
    plan_track,
)
from services.profile.domain.enrichment import Enrichment
from services.profile.domain.traits import BEHAVIOURAL
from services.profile.store.ingest_batch import Batch, EventMessages, TrackResult, Write, prepare_write
from services.profile.store.rows import (
    BOUND_IDS,
    CONSENTS_JSON,
    TAGS_ARRAY,
    Conflict,
    Definitions,
    EnrichedRow,
    SegmentRuleSource,
    parse_consents,
    resolve,
    transaction,
)
from services.profile.store.signals import apply_membership, membership_message
from services.profile.store.tables import outbox
from services.profile.store.traits import SET_TRAITS

MAX_REPLANS = 10

# What ingest needs to know first, in one round trip: the profiles the batch's identifiers are bound
# to (rows as `BOUND_IDS`'s), and which of its message ids were stored before (rows of kind
# `event`: message id, profile id, event id).
_RESOLVE_EVENTS = sa.text(f"""
SELECT b.kind, b.value, b.profile_id, NULL AS event_id FROM ({BOUND_IDS}) AS b
UNION ALL
SELECT 'event', m.message_id, e.profile_id, e.event_id
FROM unnest(CAST(:message_ids AS text[])) AS m(message_id)
CROSS JOIN LATERAL (
    SELECT e.profile_id, e.event_id FROM events e
    WHERE e.tenant_id = :tenant AND e.message_id = m.message_id
    LIMIT 1
) AS e
""")
KNOWN_EVENT = "event"
# The existing profiles a batch writes to, in the order of `ids` (profile id order), read afresh with
# the version read (`ctid`, `xmin`), locked or not. (Each by its own primary key lookup, as
# `BOUND_IDS` does: a subquery with LIMIT is never turned into a join, which the plan of a small
# table could make a scan of the tenant.)
_PROFILES_OF = f"""
SELECT p.ctid, p.xmin, p.profile_id, p.customer_id, p.email, p.first_name, p.merged_into,
       {CONSENTS_JSON} AS consents,
       p.traits, CASE WHEN :with_counters THEN p.counters END AS counters, p.last_seen_types,
       p.score, p.score_at, {TAGS_ARRAY} AS tags,
       CASE WHEN :with_held THEN ARRAY(SELECT DISTINCT t.name FROM profile_traits t
                                       WHERE t.tenant_id = p.tenant_id AND t.profile_id = p.profile_id
                                         AND t.source <> 'behavioural') END AS held_traits
FROM unnest(CAST(:ids AS text[])) AS x(profile_id)
CROSS JOIN LATERAL (
    SELECT p.ctid, p.xmin, p.* FROM profiles p
    WHERE p.tenant_id = :tenant AND p.profile_id = x.profile_id
    LIMIT 1
    {{lock}}
) AS p
"""
_LOCK_PROFILES = DriverStatement(_PROFILES_OF.format(lock="FOR NO KEY UPDATE"))
_READ_PROFILES = DriverStatement(_PROFILES_OF.format(lock=""))
# `_RESOLVE_EVENTS` outside a transaction (ingest without locks, see `IngestStore._track_unlocked`).
_RESOLVE_EVENTS_UNLOCKED = DriverStatement(str(_RESOLVE_EVENTS.text))

# Bind new identifiers; those another transaction bound first are not returned.
_BIND_IDENTITIES = """
INSERT INTO identities (tenant_id, kind, value, profile_id, created_at)
SELECT :tenant, i.kind, i.value, i.profile_id, :now
FROM unnest(CAST(:kinds AS text[]), CAST(:vals AS text[]), CAST(:profile_ids AS text[]))
     AS i(kind, value, profile_id)
ORDER BY i.kind, i.value
ON CONFLICT DO NOTHING
"""
_BIND = DriverStatement(_BIND_IDENTITIES + "RETURNING kind, value")

# One statement for the rest of a batch: bind its new identifiers, insert its new profiles, update
# the existing ones (move last_seen_at, fill in customer_id/email they lack, write the enrichment
# state the batch computed; a NULL leaves a column as it is, so unchanged JSON is not sent), store
# the events and enqueue one outbox message per event, in batch order. All of it or nothing: the
# statement fails with SQLSTATE 40001 (`ingest_profile_changed`, migration 0009) when an identifier
# was bound meanwhile or a profile is no longer the version read (its `ctid` and `xmin`), and with
# a unique violation when one of the events was stored meanwhile (`_RESOLVE_EVENTS` found which
# message ids were stored before). Under `_profiles`' locks neither happens but for the events; without
# them (`IngestStore._track_unlocked`) the batch then runs again under locks. The events and
# profiles come as arrays of rows (types `ingest_event` and `ingest_profile`, migrations 0008-0009;
# JSON as text). Planned once per connection (a generic plan): the existing profiles are updated
# where they were read (their ctid), not through a join a generic plan could make a scan of every
# profile of the tenant.
_STORE = DriverStatement(f"""
WITH v AS (
    SELECT * FROM unnest(CAST(:events AS ingest_event[])) WITH ORDINALITY AS v
), bound AS ({_BIND_IDENTITIES} RETURNING 1
), created AS (
    INSERT INTO profiles
        (tenant_id, profile_id, customer_id, email, created_at, updated_at, last_seen_at,
         traits, counters, last_seen_types, score, score_at)
    SELECT :tenant, n.profile_id, n.customer_id, n.email, :now, :now, n.last_seen_at,
           CAST(n.traits AS jsonb), CAST(n.counters AS jsonb), CAST(n.last_seen_types AS jsonb), n.score,
           n.score_at
    FROM unnest(CAST(:created AS ingest_profile[])) AS n
    ORDER BY n.profile_id
), updated AS (
    UPDATE profiles p
    SET last_seen_at = greatest(p.last_seen_at, u.last_seen_at),
        customer_id = coalesce(p.customer_id, u.customer_id),
        email = coalesce(p.email, u.email),
        updated_at = CASE WHEN (p.customer_id IS NULL AND u.customer_id IS NOT NULL)
                            OR (p.email IS NULL AND u.email IS NOT NULL)
                          THEN :now ELSE p.updated_at END,
        last_seen_types = CAST(u.last_seen_types AS jsonb),
        traits = coalesce(CAST(u.traits AS jsonb), p.traits),
        counters = coalesce(CAST(u.counters AS jsonb), p.counters),
        score = coalesce(u.score, p.score),
        score_at = CASE WHEN u.score IS NULL THEN p.score_at ELSE u.score_at END
    FROM unnest(CAST(:updated AS ingest_profile[])) AS u
    WHERE p.ctid = u.ctid AND p.xmin = u.row_xmin AND p.profile_id = u.profile_id
    RETURNING 1
), stored AS (
    INSERT INTO events (tenant_id, event_id, message_id, profile_id, type, occurred_at, received_at,
                        anonymous_id, customer_id, email, properties)
    SELECT :tenant, v.event_id, v.message_id, v.profile_id, v.type, v.occurred_at, :now,
           v.anonymous_id, v.customer_id, v.email, CAST(v.properties AS jsonb)
    FROM v ORDER BY v.message_id
), published AS (
    INSERT INTO outbox (subject, payload, created_at)
    SELECT v.subject, v.payload, :now FROM v ORDER BY v.ordinality
)
SELECT CASE WHEN (SELECT count(*) FROM bound) = cardinality(CAST(:kinds AS text[]))
             AND (SELECT count(*) FROM updated) = cardinality(CAST(:updated AS ingest_profile[]))
            THEN 0 ELSE ingest_profile_changed() END
""")


def _resolve_params(tenant: str, batch: Sequence[Event]) -> dict[str, Any]:
    """`_RESOLVE_EVENTS`'s parameters: the batch's identifiers (each once) and message ids."""
    keys: dict[Key, None] = {}
    for event in batch:
        for key in event_keys(event):
            keys[key] = None
    return {
        "tenant": tenant,
        "kinds": [k for k, _ in keys],
        "vals": [v for _, v in keys],
        "message_ids": [e.message_id for e in batch],
    }


def _bound_and_known(rows: Iterable[Sequence[Any]]) -> tuple[dict[Key, ProfileState], dict[str, TrackResult]]:
    """What `_RESOLVE_EVENTS` found: the profiles the identifiers are bound to (by id only; the
    batch reads them afterwards), and the results of the events stored before, by message id."""
    states: dict[str, ProfileState] = {}
    bound: dict[Key, ProfileState] = {}
    known: dict[str, TrackResult] = {}
    for kind, value, profile_id, event_id in rows:
        if kind == KNOWN_EVENT:
            known[value] = TrackResult(event_id, profile_id, True)
            continue
        state = states.get(profile_id)
        if state is None:
            state = states[profile_id] = ProfileState(profile_id)
        bound[(kind, value)] = state
    return bound, known


def _with_known(
    batch: Sequence[Event], known: Mapping[str, TrackResult], written: Sequence[TrackResult]
) -> list[TrackResult]:
    """One result per event of `batch`: the original's for an event stored before, else the next of
    `written` (the results of the others, in order)."""
    if not known:
        return list(written)
    rest = iter(written)
    return [known[e.message_id] if e.message_id in known else next(rest) for e in batch]


async def _store(
    driver: asyncpg.Connection,
    tenant: str,
    now: datetime,
    write: Write,
    new_identities: Sequence[tuple[str, str, str]],
) -> None:
    """Run `_STORE`, binding `new_identities` ((kind, value, profile id)) in it."""
    try:
        await _STORE.fetch(
            driver,
            {
                "tenant": tenant,
                "now": now,
                "events": write.events,
                "created": write.created,
                "updated": write.updated,
                "kinds": [k for k, _, _ in new_identities],
                "vals": [v for _, v, _ in new_identities],
                "profile_ids": [p for _, _, p in new_identities],
            },
        )
    except asyncpg.UniqueViolationError:
        raise Conflict from None  # a concurrent call stored one of these events first


class IngestStore:
    """Track: store batches of events, each in a handful of statements (see the module docstring)."""

    def __init__(
        self, engine: AsyncEngine, definitions: Definitions, segment_rules: SegmentRuleSource
    ) -> None:
        # `track` runs on these connections (see create_engine's lookups_only).
        self.engine = engine
        self.definitions = definitions
        self.segment_rules = segment_rules

    async def track(
        self,
        tenant: str,
        batch: Sequence[Event],
        now: datetime,
        messages: EventMessages,
        *,
        make_id: Callable[[], str],
    ) -> list[TrackResult]:
        """Store a batch atomically; one result per event, duplicates (by message_id) flagged. Without
        locks when it can (`_track_unlocked`), under them otherwise (`_track`)."""
        first = first_occurrences(batch)
        unique_positions = [i for i, f in enumerate(first) if f == i]
        repeated = len(unique_positions) < len(batch)
        unique = [batch[i] for i in unique_positions] if repeated else batch
        to_store = Batch(tenant, unique, now, unique_positions, messages, make_id)
        stored = await self._track_unlocked(to_store)
        if stored is None:
            stored = await transaction(self.engine, lambda conn: self._track(conn, to_store))
        if not repeated:
            return stored
        by_position = dict(zip(unique_positions, stored, strict=True))
        results = []
        for i, f in enumerate(first):
            r = by_position[f]
            results.append(r if f == i else TrackResult(r.event_id, r.profile_id, True))
        return results

    async def _track_unlocked(self, batch: Batch) -> list[TrackResult] | None:
        """Store a batch in three statements outside a transaction: resolve its identifiers and
        message ids, read its existing profiles, and write it all in one statement that fails,
        writing nothing, when any of that changed meanwhile (`_STORE`). Nothing waits for a lock or
        for a commit but that statement, and a batch takes three round trips to PostgreSQL instead
        of `_track`'s five (six with new identifiers), which is what keeps Track's latency low under
        load (bench/track.py measures it; figures: bench/README.md).

        None, with nothing written, when the batch needs `_track`'s locks: its tenant has segments or
        computed traits (their writes take statements of their own), it crosses a threshold, a
        profile was merged away, or a concurrent write changed what it read."""
        tenant = batch.tenant
        async with self.engine.connect() as conn:
            definitions = await self.definitions(conn, tenant)
            if definitions.computed_traits or await self.segment_rules(conn, tenant):
                return None
            if conn.in_transaction():  # they were read afresh: end that read
                await conn.rollback()
            driver: asyncpg.Connection = (await conn.get_raw_connection()).driver_connection
            try:
                rows = await _RESOLVE_EVENTS_UNLOCKED.fetch(driver, _resolve_params(tenant, batch.events))
                bound, known = _bound_and_known(rows)
                fresh = batch.without(known)
                if not fresh.events:
                    return _with_known(batch.events, known, [])
                plan = plan_track(fresh.events, bound)
                read = await self._profiles(driver, tenant, plan, definitions, lock=False)
                write = prepare_write(fresh, plan, read, definitions, segments=False)
                if write.enrichment.signals or write.enrichment.behavioural:
                    return None
                await _store(driver, tenant, batch.now, write, plan.new_identities)
            except (Conflict, asyncpg.SerializationError, asyncpg.DeadlockDetectedError):
                return None
        return _with_known(batch.events, known, write.results)

    async def _track(self, conn: AsyncConnection, batch: Batch) -> list[TrackResult]:
        rows = await conn.execute(_RESOLVE_EVENTS, _resolve_params(batch.tenant, batch.events))
        bound, known = _bound_and_known(rows)
        # events stored before are left out; their results name the originals
        written = await self._write_events(conn, batch.without(known), bound)
        return _with_known(batch.events, known, written)

    async def _write_events(
        self, conn: AsyncConnection, batch: Batch, bound: dict[Key, ProfileState]
    ) -> list[TrackResult]:
        """Store events none of which was stored before (see `_track`); `bound`: the profiles their
        identifiers are bound to."""
        if not batch.events:
            return []
        tenant, now = batch.tenant, batch.now
        # the statements of every batch run on the driver directly (the first one, `_RESOLVE_EVENTS`,
        # began the transaction); the occasional ones through SQLAlchemy
        driver = await driver_connection(conn)
        plan = await self._bind(conn, driver, tenant, batch.events, bound, now)
        definitions = await self.definitions(conn, tenant)
        locked = await self._profiles(driver, tenant, plan, definitions, lock=True)
        rules = await self.segment_rules(conn, tenant)
        write = prepare_write(batch, plan, locked, definitions, segments=bool(rules))
        enrichment = write.enrichment
        changes = await apply_membership(conn, tenant, rules, enrichment.views, now)
        await _store(driver, tenant, now, write, [])
        if enrichment.behavioural:
            behavioural = enrichment.behavioural
            await conn.execute(
                SET_TRAITS,
                {
                    "tenant": tenant,
                    "now": now,
                    "source": BEHAVIOURAL,
                    "ids": [p for p, _, _ in behavioural],
                    "names": [n for _, n, _ in behavioural],
                    "vals": [json.dumps(v) for _, _, v in behavioural],
                },
            )
        signals = enrichment.signals + [membership_message(tenant, c, now) for c in changes]
        await enqueue(conn, outbox, signals, now)
        return write.results

    async def _bind(
        self,
        conn: AsyncConnection,
        driver: asyncpg.Connection,
        tenant: str,
        batch: Sequence[Event],
        bound: dict[Key, ProfileState],
        now: datetime,
    ) -> TrackPlan:
        """Plan the batch and bind its new identifiers. An identifier a concurrent call bound first
        (ON CONFLICT waited for that call to commit) is resolved to the winner's profile and the
        batch is planned again, until every identifier of the batch is bound."""
        for _ in range(MAX_REPLANS):
            plan = plan_track(batch, bound)
            if not plan.new_identities:
                return plan
            rows = await _BIND.fetch(
                driver,
                {
                    "tenant": tenant,
                    "now": now,
                    "kinds": [k for k, _, _ in plan.new_identities],
                    "vals": [v for _, v, _ in plan.new_identities],
                    "profile_ids": [p for _, _, p in plan.new_identities],
                },
            )
            won = {(r["kind"], r["value"]) for r in rows}
            if len(won) == len(plan.new_identities):
                return plan
            bound = apply_bindings(bound, [b for b in plan.new_identities if (b[0], b[1]) in won])
            lost = [(k, v) for k, v, _ in plan.new_identities if (k, v) not in won]
            bound.update(await resolve(conn, tenant, lost))
        raise Conflict

    async def _profiles(
        self, driver: asyncpg.Connection, tenant: str, plan: TrackPlan, definitions: Enrichment, *, lock: bool
    ) -> dict[str, EnrichedRow]:
        """Read the existing profiles the batch writes to, locked (in id order) or not, and refresh
        their state (customer_id, email, first_name, consents) for the events' snapshots; return
        their enrichment state. A profile merged away since it was resolved means the batch starts
        again."""
        states = {pid: plan.profiles[pid] for pid in plan.profile_ids if not plan.profiles[pid].new}
        if not states:
            return {}
        rows = await (_LOCK_PROFILES if lock else _READ_PROFILES).fetch(
            driver,
            {
                "tenant": tenant,
                "ids": sorted(states),
                # counts and held trait names are read only when definitions use them
                "with_counters": bool(definitions.counters),
                "with_held": bool(definitions.computed_traits),
            },
        )
        if len(rows) < len(states):
            raise Conflict
        out = {}
        # unpacked, not read by name: this runs for every profile of every batch
        for (
            ctid,
            xmin,
            pid,
            customer_id,
            email,
            first_name,
            merged_into,
            consents,
            traits,
            counters,
            last_seen_types,
            score,
            score_at,
            tags,
            held_traits,
        ) in rows:
            if merged_into is not None:
                raise Conflict
            state = states[pid]
            state.customer_id = customer_id or state.customer_id
            state.email = email or state.email
            state.first_name = first_name
            state.consents = parse_consents(consents)
            row = out[pid] = EnrichedRow.of_columns(
                traits, counters, last_seen_types, score, score_at, tags, held_traits
            )
            row.ctid = ctid
            row.xmin = xmin
        return out
