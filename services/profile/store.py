"""Tables and queries of the profile service (SQLAlchemy Core on asyncpg).

Ingest is batched: a `BatchTrack` of 500 events takes a handful of round trips
whatever its size — one query resolves every identifier of the batch, one
statement binds the new ones, one locks the existing profiles the batch writes
to, and one statement creates new profiles, stores the events (skipping known
message ids), enqueues their outbox messages and moves `last_seen_at`.

Concurrency: new identifiers are bound with `ON CONFLICT DO NOTHING`; one that
a concurrent call bound first is resolved to that call's profile and the batch
is planned again. Writers lock the existing profiles they write to
(`FOR NO KEY UPDATE`, in profile id order) before writing, so a merge and an
ingest of the same profile serialise; a transaction that lost a race it cannot
repair (a profile merged away meanwhile, a deadlock) is retried whole.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import json
import random
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, TypeVar

import sqlalchemy as sa
from sqlalchemy.dialects.postgresql import ARRAY, JSONB
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from relevans.kit.errors import NotFound
from relevans.kit.outbox import OutboxMessage, enqueue, outbox_table
from services.profile.domain import (
    ANONYMOUS,
    PROFILE_ID,
    Consent,
    Event,
    IdentifyCommand,
    Key,
    Lookup,
    Profile,
    ProfileState,
    TrackPlan,
    apply_bindings,
    current_view,
    event_keys,
    first_occurrences,
    plan_identify,
    plan_track,
)
from services.profile.domain.imports import BACKEND, ImportPlan, ImportRow, consent_changes, plan_import
from services.profile.domain.merge import REASON_ANONYMOUS, REASON_KNOWN, consents_taken_over

T = TypeVar("T")
TZ = sa.DateTime(timezone=True)

metadata = sa.MetaData()

profiles = sa.Table(
    "profiles",
    metadata,
    sa.Column("tenant_id", sa.Text, primary_key=True),
    sa.Column("profile_id", sa.Text, primary_key=True),
    sa.Column("customer_id", sa.Text),
    sa.Column("email", sa.Text),
    sa.Column("first_name", sa.Text),
    sa.Column("last_name", sa.Text),
    # E.164.
    sa.Column("phone", sa.Text),
    # Set when this (shadow) profile was merged into another one.
    sa.Column("merged_into", sa.Text),
    sa.Column("created_at", TZ, nullable=False),
    sa.Column("updated_at", TZ, nullable=False),
    sa.Column("last_seen_at", TZ),
)

identities = sa.Table(
    "identities",
    metadata,
    sa.Column("tenant_id", sa.Text, primary_key=True),
    sa.Column("kind", sa.Text, primary_key=True),
    sa.Column("value", sa.Text, primary_key=True),
    sa.Column("profile_id", sa.Text, nullable=False),
    sa.Column("created_at", TZ, nullable=False),
    sa.CheckConstraint("kind IN ('anonymous', 'customer_id', 'email')", name="identities_kind"),
    sa.Index("identities_profile", "tenant_id", "profile_id"),
)

events = sa.Table(
    "events",
    metadata,
    sa.Column("tenant_id", sa.Text, primary_key=True),
    sa.Column("event_id", sa.Text, primary_key=True),
    sa.Column("message_id", sa.Text, nullable=False),
    sa.Column("profile_id", sa.Text, nullable=False),
    sa.Column("type", sa.Text, nullable=False),
    sa.Column("occurred_at", TZ, nullable=False),
    sa.Column("received_at", TZ, nullable=False),
    sa.Column("anonymous_id", sa.Text),
    sa.Column("customer_id", sa.Text),
    sa.Column("email", sa.Text),
    sa.Column("properties", JSONB, nullable=False),
    sa.UniqueConstraint("tenant_id", "message_id", name="events_message_id"),
    sa.Index("events_profile", "tenant_id", "profile_id", "occurred_at"),
)

merges = sa.Table(
    "merges",
    metadata,
    sa.Column("tenant_id", sa.Text, primary_key=True),
    sa.Column("merge_id", sa.BigInteger, sa.Identity(), primary_key=True),
    sa.Column("from_profile_id", sa.Text, nullable=False),
    sa.Column("to_profile_id", sa.Text, nullable=False),
    sa.Column("anonymous_id", sa.Text),
    sa.Column("source", sa.Text, nullable=False),
    sa.Column("merged_at", TZ, nullable=False),
    sa.Index("merges_to", "tenant_id", "to_profile_id"),
)

consent_ledger = sa.Table(
    "consent_ledger",
    metadata,
    sa.Column("tenant_id", sa.Text, primary_key=True),
    sa.Column("entry_id", sa.BigInteger, sa.Identity(), primary_key=True),
    sa.Column("profile_id", sa.Text, nullable=False),
    sa.Column("purpose", sa.Text, nullable=False),
    sa.Column("channel", sa.Text, nullable=False),
    sa.Column("status", sa.Text, nullable=False),
    sa.Column("source", sa.Text, nullable=False),
    sa.Column("evidence", sa.Text, nullable=False),
    sa.Column("recorded_at", TZ, nullable=False),
    sa.Index("consent_ledger_profile", "tenant_id", "profile_id"),
)

consents = sa.Table(
    "consents",
    metadata,
    sa.Column("tenant_id", sa.Text, primary_key=True),
    sa.Column("profile_id", sa.Text, primary_key=True),
    sa.Column("purpose", sa.Text, primary_key=True),
    sa.Column("channel", sa.Text, primary_key=True),
    sa.Column("status", sa.Text, nullable=False),
    sa.Column("source", sa.Text, nullable=False),
    sa.Column("evidence", sa.Text, nullable=False),
    sa.Column("recorded_at", TZ, nullable=False),
)

profile_tags = sa.Table(
    "profile_tags",
    metadata,
    sa.Column("tenant_id", sa.Text, primary_key=True),
    sa.Column("profile_id", sa.Text, primary_key=True),
    sa.Column("tag", sa.Text, primary_key=True),
    sa.Column("created_at", TZ, nullable=False),
    sa.Index("profile_tags_tag", "tenant_id", "tag"),
)

profile_traits = sa.Table(
    "profile_traits",
    metadata,
    sa.Column("tenant_id", sa.Text, primary_key=True),
    sa.Column("profile_id", sa.Text, primary_key=True),
    sa.Column("name", sa.Text, primary_key=True),
    # declared, backend or behavioural; the same trait may be held from several sources.
    sa.Column("source", sa.Text, primary_key=True),
    sa.Column("value", sa.Text, nullable=False),
    sa.Column("updated_at", TZ, nullable=False),
    sa.CheckConstraint("source IN ('declared', 'backend', 'behavioural')", name="profile_traits_source"),
)

# GDPR: the sha256 hex of each identifier of an erased person (kind: email, customer_id, phone,
# anonymous); consent given for one of them is not recorded again.
suppressions = sa.Table(
    "suppressions",
    metadata,
    sa.Column("tenant_id", sa.Text, primary_key=True),
    sa.Column("kind", sa.Text, primary_key=True),
    sa.Column("value_hash", sa.Text, primary_key=True),
    sa.Column("created_at", TZ, nullable=False),
)

erasures = sa.Table(
    "erasures",
    metadata,
    sa.Column("tenant_id", sa.Text, primary_key=True),
    sa.Column("erasure_id", sa.Text, primary_key=True),
    sa.Column("request_id", sa.Text, nullable=False),
    sa.Column("profile_id", sa.Text, nullable=False),
    sa.Column("state", sa.Text, nullable=False),
    sa.Column("services_done", ARRAY(sa.Text), nullable=False),
    sa.Column("requested_at", TZ, nullable=False),
    sa.Column("completed_at", TZ),
    sa.UniqueConstraint("tenant_id", "request_id", name="erasures_request_id"),
    sa.CheckConstraint("state IN ('pending', 'done')", name="erasures_state"),
)

outbox = outbox_table(metadata)


def identifier_hash(value: str) -> str:
    """The sha256 hex of a normalised identifier (emails are stored lower-cased)."""
    return hashlib.sha256(value.encode()).hexdigest()


async def suppressed_hashes(conn: AsyncConnection, tenant: str, values: Iterable[str]) -> set[str]:
    """The hashes of `values` that belong to erased people."""
    hashes = {identifier_hash(v) for v in values if v}
    if not hashes:
        return set()
    rows = await conn.execute(
        sa.select(suppressions.c.value_hash).where(
            suppressions.c.tenant_id == tenant, suppressions.c.value_hash.in_(sorted(hashes))
        )
    )
    return set(rows.scalars())


CONSENT_SUBJECT = "rv.profile.consent"
MERGED_SUBJECT = "rv.profile.merged"
MAX_ATTEMPTS = 8
MAX_REPLANS = 10
_RETRYABLE_SQLSTATES = {"40001", "40P01"}  # serialization failure, deadlock detected

_CONSENTS_JSON = """(SELECT json_agg(json_build_array(c.purpose, c.channel, c.status, c.source, c.evidence,
                                      c.recorded_at) ORDER BY c.purpose, c.channel)
       FROM consents c WHERE c.tenant_id = p.tenant_id AND c.profile_id = p.profile_id)"""

# (The lateral subquery with LIMIT 1 stays a nested loop of primary key lookups whatever the
# planner estimates, however many identities and profiles the tenant has.)
_RESOLVE_SQL = """
SELECT k.kind, k.value, p.profile_id, p.customer_id, p.email, p.first_name, p.merged_into, p.created_at
FROM unnest(CAST(:kinds AS text[]), CAST(:vals AS text[])) AS k(kind, value)
CROSS JOIN LATERAL (
    SELECT p.* FROM identities i
    JOIN profiles p ON p.tenant_id = i.tenant_id AND p.profile_id = i.profile_id
    WHERE i.tenant_id = :tenant AND i.kind = k.kind AND i.value = k.value
    LIMIT 1
) AS p
"""
# The profiles bound to some identifiers.
_RESOLVE = sa.text(_RESOLVE_SQL)
# The same with each profile locked, in profile id order (the lock is taken on the outer scan of
# profiles, after the sort, so concurrent callers lock in one order).
_RESOLVE_LOCKED = sa.text("""
WITH r AS MATERIALIZED (
    SELECT k.kind, k.value, i.profile_id
    FROM unnest(CAST(:kinds AS text[]), CAST(:vals AS text[])) AS k(kind, value)
    CROSS JOIN LATERAL (
        SELECT i.profile_id FROM identities i
        WHERE i.tenant_id = :tenant AND i.kind = k.kind AND i.value = k.value
        LIMIT 1
    ) AS i
)
SELECT r.kind, r.value, p.profile_id, p.customer_id, p.email, p.first_name, p.merged_into, p.created_at
FROM r JOIN profiles p ON p.tenant_id = :tenant AND p.profile_id = r.profile_id
ORDER BY p.profile_id
FOR NO KEY UPDATE OF p
""")

# Lock the existing profiles a batch writes to, in profile id order, and read them afresh.
_LOCK_PROFILES = sa.text(f"""
SELECT p.profile_id, p.customer_id, p.email, p.first_name, p.merged_into, {_CONSENTS_JSON} AS consents
FROM profiles p
WHERE p.tenant_id = :tenant AND p.profile_id = ANY(CAST(:ids AS text[]))
ORDER BY p.profile_id
FOR NO KEY UPDATE
""")

# Bind new identifiers; those another transaction bound first are not returned.
_BIND = sa.text("""
INSERT INTO identities (tenant_id, kind, value, profile_id, created_at)
SELECT :tenant, i.kind, i.value, i.profile_id, :now
FROM unnest(CAST(:kinds AS text[]), CAST(:vals AS text[]), CAST(:profile_ids AS text[]))
     AS i(kind, value, profile_id)
ORDER BY i.kind, i.value
ON CONFLICT DO NOTHING
RETURNING kind, value
""")

# One statement for the rest of a batch: upsert its profiles (insert the new ones; move
# last_seen_at of existing ones and fill in customer_id/email they lack), store the events
# (skipping known message ids) and enqueue one outbox message per stored event, in batch order.
# Returns the message ids stored. (An event that turns out to be a duplicate moves last_seen_at
# only to where its original already moved it.)
_STORE = sa.text("""
WITH v AS (
    SELECT * FROM unnest(
        CAST(:event_ids AS text[]), CAST(:message_ids AS text[]),
        CAST(:profile_ids AS text[]), CAST(:types AS text[]), CAST(:occurred AS timestamptz[]),
        CAST(:anonymous_ids AS text[]), CAST(:customer_ids AS text[]), CAST(:emails AS text[]),
        CAST(:properties AS text[]), CAST(:subjects AS text[]), CAST(:payloads AS bytea[]))
    WITH ORDINALITY AS v(event_id, message_id, profile_id, type, occurred_at, anonymous_id, customer_id,
                         email, properties, subject, payload, ord)
), touched AS (
    INSERT INTO profiles AS p
        (tenant_id, profile_id, customer_id, email, created_at, updated_at, last_seen_at)
    SELECT :tenant, u.profile_id, u.customer_id, u.email, :now, :now, u.last_seen_at
    FROM unnest(CAST(:up_ids AS text[]), CAST(:up_customer_ids AS text[]), CAST(:up_emails AS text[]),
                CAST(:up_last_seen AS timestamptz[])) AS u(profile_id, customer_id, email, last_seen_at)
    ORDER BY u.profile_id
    ON CONFLICT (tenant_id, profile_id) DO UPDATE
    SET last_seen_at = greatest(p.last_seen_at, excluded.last_seen_at),
        customer_id = coalesce(p.customer_id, excluded.customer_id),
        email = coalesce(p.email, excluded.email),
        updated_at = CASE WHEN (p.customer_id IS NULL AND excluded.customer_id IS NOT NULL)
                            OR (p.email IS NULL AND excluded.email IS NOT NULL)
                          THEN excluded.updated_at ELSE p.updated_at END
    WHERE p.last_seen_at IS NULL OR p.last_seen_at < excluded.last_seen_at
       OR (p.customer_id IS NULL AND excluded.customer_id IS NOT NULL)
       OR (p.email IS NULL AND excluded.email IS NOT NULL)
), stored AS (
    INSERT INTO events (tenant_id, event_id, message_id, profile_id, type, occurred_at, received_at,
                        anonymous_id, customer_id, email, properties)
    SELECT :tenant, v.event_id, v.message_id, v.profile_id, v.type, v.occurred_at, :now,
           v.anonymous_id, v.customer_id, v.email, CAST(v.properties AS jsonb)
    FROM v ORDER BY v.message_id
    ON CONFLICT (tenant_id, message_id) DO NOTHING
    RETURNING message_id
), published AS (
    INSERT INTO outbox (subject, payload, created_at)
    SELECT v.subject, v.payload, :now FROM v JOIN stored USING (message_id) ORDER BY v.ord
)
SELECT message_id FROM stored
""")

# Plan the statements of a large batch for its actual sizes: a generic plan of a prepared
# statement assumes an array parameter holds a few elements.
_CUSTOM_PLANS = sa.text("SET LOCAL plan_cache_mode = force_custom_plan")
CUSTOM_PLAN_MIN_EVENTS = 16

_STORED_EVENTS = sa.text("""
SELECT message_id, event_id, profile_id FROM events
WHERE tenant_id = :tenant AND message_id = ANY(CAST(:message_ids AS text[]))
""")

_ATTACH = sa.text("""
INSERT INTO identities (tenant_id, kind, value, profile_id, created_at)
SELECT :tenant, i.kind, i.value, :profile_id, :now
FROM unnest(CAST(:kinds AS text[]), CAST(:vals AS text[])) AS i(kind, value)
ORDER BY i.kind, i.value
ON CONFLICT DO NOTHING
RETURNING kind, value
""")

_LOAD = sa.text(f"""
SELECT q.profile_id AS requested, p.profile_id, p.customer_id, p.email, p.first_name,
       p.created_at, p.updated_at, p.last_seen_at,
       {_CONSENTS_JSON} AS consents,
       ARRAY(SELECT i.value FROM identities i
             WHERE i.tenant_id = p.tenant_id AND i.profile_id = p.profile_id AND i.kind = 'anonymous'
             ORDER BY i.created_at, i.value) AS anonymous_ids
FROM profiles q
JOIN profiles p ON p.tenant_id = q.tenant_id AND p.profile_id = coalesce(q.merged_into, q.profile_id)
WHERE q.tenant_id = :tenant AND q.profile_id = ANY(CAST(:ids AS text[])) AND p.merged_into IS NULL
""")

# A merge moves the merged-away profile's tags and traits; the survivor keeps its own trait values.
_MERGE_TAGS = sa.text("""
WITH moved AS (
    DELETE FROM profile_tags WHERE tenant_id = :tenant AND profile_id = :from_id
    RETURNING tag, created_at
)
INSERT INTO profile_tags (tenant_id, profile_id, tag, created_at)
SELECT :tenant, :to_id, tag, created_at FROM moved ORDER BY tag
ON CONFLICT DO NOTHING
""")
_MERGE_TRAITS = sa.text("""
WITH moved AS (
    DELETE FROM profile_traits WHERE tenant_id = :tenant AND profile_id = :from_id
    RETURNING name, source, value, updated_at
)
INSERT INTO profile_traits (tenant_id, profile_id, name, source, value, updated_at)
SELECT :tenant, :to_id, name, source, value, updated_at FROM moved ORDER BY name, source
ON CONFLICT DO NOTHING
""")

_LOCK_PROFILE = sa.text("""
SELECT profile_id, merged_into FROM profiles
WHERE tenant_id = :tenant AND profile_id = :profile_id
FOR NO KEY UPDATE
""")

_MERGE_PROFILES = sa.text("""
UPDATE profiles t
SET last_seen_at = CASE WHEN s.last_seen_at IS NULL THEN t.last_seen_at
                        ELSE greatest(t.last_seen_at, s.last_seen_at) END,
    first_name = coalesce(t.first_name, s.first_name), updated_at = :now
FROM profiles s
WHERE t.tenant_id = :tenant AND t.profile_id = :to_id AND s.tenant_id = :tenant AND s.profile_id = :from_id
""")

# Import: upsert the batch's profiles; a field the batch leaves empty (None) stays as it is, and
# a profile the batch changes nothing of is not touched (re-importing a file writes nothing).
_IMPORT_PROFILES = sa.text("""
INSERT INTO profiles AS p
    (tenant_id, profile_id, customer_id, email, first_name, last_name, phone, created_at, updated_at)
SELECT :tenant, u.profile_id, u.customer_id, u.email, u.first_name, u.last_name, u.phone, :now, :now
FROM unnest(CAST(:ids AS text[]), CAST(:customer_ids AS text[]), CAST(:emails AS text[]),
            CAST(:first_names AS text[]), CAST(:last_names AS text[]), CAST(:phones AS text[]))
     AS u(profile_id, customer_id, email, first_name, last_name, phone)
ORDER BY u.profile_id
ON CONFLICT (tenant_id, profile_id) DO UPDATE
SET customer_id = coalesce(p.customer_id, excluded.customer_id),
    email = coalesce(p.email, excluded.email),
    first_name = coalesce(excluded.first_name, p.first_name),
    last_name = coalesce(excluded.last_name, p.last_name),
    phone = coalesce(excluded.phone, p.phone),
    updated_at = excluded.updated_at
WHERE (p.customer_id IS NULL AND excluded.customer_id IS NOT NULL)
   OR (p.email IS NULL AND excluded.email IS NOT NULL)
   OR coalesce(excluded.first_name, p.first_name) IS DISTINCT FROM p.first_name
   OR coalesce(excluded.last_name, p.last_name) IS DISTINCT FROM p.last_name
   OR coalesce(excluded.phone, p.phone) IS DISTINCT FROM p.phone
""")

_IMPORT_TAGS = sa.text("""
INSERT INTO profile_tags (tenant_id, profile_id, tag, created_at)
SELECT :tenant, t.profile_id, t.tag, :now
FROM unnest(CAST(:ids AS text[]), CAST(:tags AS text[])) AS t(profile_id, tag)
ORDER BY t.profile_id, t.tag
ON CONFLICT DO NOTHING
""")

_IMPORT_TRAITS = sa.text("""
INSERT INTO profile_traits AS t (tenant_id, profile_id, name, source, value, updated_at)
SELECT :tenant, u.profile_id, u.name, :source, u.value, :now
FROM unnest(CAST(:ids AS text[]), CAST(:names AS text[]), CAST(:vals AS text[])) AS u(profile_id, name, value)
ORDER BY u.profile_id, u.name
ON CONFLICT (tenant_id, profile_id, name, source) DO UPDATE
SET value = excluded.value, updated_at = excluded.updated_at
WHERE t.value IS DISTINCT FROM excluded.value
""")

# The consent ledger and its current view, for any number of (profile, decision) pairs: one
# statement each, whatever their number (see `_consent_columns`).
_CONSENT_ROWS = """
FROM unnest(CAST(:profile_ids AS text[]), CAST(:purposes AS text[]), CAST(:channels AS text[]),
            CAST(:statuses AS text[]), CAST(:sources AS text[]), CAST(:evidences AS text[]),
            CAST(:recorded AS timestamptz[]))
     WITH ORDINALITY AS u(profile_id, purpose, channel, status, source, evidence, recorded_at, ord)
"""
_APPEND_LEDGER = sa.text(f"""
INSERT INTO consent_ledger (tenant_id, profile_id, purpose, channel, status, source, evidence, recorded_at)
SELECT :tenant, u.profile_id, u.purpose, u.channel, u.status, u.source, u.evidence, u.recorded_at
{_CONSENT_ROWS}
ORDER BY u.ord
""")
_UPSERT_CONSENTS = sa.text(f"""
INSERT INTO consents AS c (tenant_id, profile_id, purpose, channel, status, source, evidence, recorded_at)
SELECT :tenant, u.profile_id, u.purpose, u.channel, u.status, u.source, u.evidence, u.recorded_at
{_CONSENT_ROWS}
ORDER BY u.profile_id, u.purpose, u.channel
ON CONFLICT (tenant_id, profile_id, purpose, channel) DO UPDATE
SET status = excluded.status, source = excluded.source, evidence = excluded.evidence,
    recorded_at = excluded.recorded_at
""")

_CURRENT_STATUSES = sa.text("""
SELECT profile_id, purpose, channel, status FROM consents
WHERE tenant_id = :tenant AND profile_id = ANY(CAST(:ids AS text[]))
""")

_TOUCH_PROFILES = sa.text("""
UPDATE profiles SET updated_at = :now
WHERE tenant_id = :tenant AND profile_id = ANY(CAST(:ids AS text[]))
""")


@dataclass(slots=True)
class ImportResult:
    # Rows written (including those that changed nothing).
    upserted: int
    profiles_created: int
    # Consent decisions recorded (and ConsentChanged messages enqueued).
    consents_recorded: int
    # Rows whose consent was ignored because one of their identifiers was erased (GDPR).
    consent_not_restored: list[int] = dataclasses.field(default_factory=list)


@dataclass(slots=True)
class TrackResult:
    event_id: str
    profile_id: str
    duplicate: bool


# (index of the event in the call, its new event id, the profile after the call) -> outbox message
EventMessage = Callable[[int, str, ProfileState], OutboxMessage]
# (tenant, profile id, consent) -> ConsentChanged payload
ConsentMessage = Callable[[str, str, Consent], bytes]
# (tenant, surviving profile id, merged profile id, merge time, reason) -> ProfileMerged payload
MergedMessage = Callable[[str, str, str, datetime, str], bytes]


class _Conflict(Exception):
    """A concurrent transaction changed what this one read; run it again."""


def _sqlstate(exc: DBAPIError) -> str | None:
    for candidate in (exc.orig, getattr(exc.orig, "__cause__", None)):
        code = getattr(candidate, "sqlstate", None) or getattr(candidate, "pgcode", None)
        if code:
            return str(code)
    return None


def _consent_columns(decisions: Sequence[tuple[str, Consent]]) -> dict[str, list[Any]]:
    """(profile id, decision) pairs as the array parameters of `_CONSENT_ROWS`."""
    return {
        "profile_ids": [pid for pid, _ in decisions],
        "purposes": [c.purpose for _, c in decisions],
        "channels": [c.channel for _, c in decisions],
        "statuses": [c.status for _, c in decisions],
        "sources": [c.source for _, c in decisions],
        "evidences": [c.evidence for _, c in decisions],
        "recorded": [c.recorded_at for _, c in decisions],
    }


def _parse_consents(raw: Any) -> tuple[Consent, ...]:
    if not raw:
        return ()
    items = json.loads(raw) if isinstance(raw, str) else raw
    return tuple(
        Consent(purpose, channel, status, source, evidence, datetime.fromisoformat(at))
        for purpose, channel, status, source, evidence, at in items
    )


class ProfileStore:
    def __init__(
        self, engine: AsyncEngine, consent_message: ConsentMessage, merged_message: MergedMessage
    ) -> None:
        self.engine = engine
        self.consent_message = consent_message
        self.merged_message = merged_message

    async def _transaction(self, work: Callable[[AsyncConnection], Awaitable[T]]) -> T:
        """Run `work` in one transaction, again from the start if it lost a race."""
        for attempt in range(1, MAX_ATTEMPTS + 1):
            try:
                async with self.engine.begin() as conn:
                    return await work(conn)
            except _Conflict:
                if attempt == MAX_ATTEMPTS:
                    raise RuntimeError("gave up after repeated concurrent changes") from None
            except DBAPIError as exc:
                if _sqlstate(exc) not in _RETRYABLE_SQLSTATES or attempt == MAX_ATTEMPTS:
                    raise
            await asyncio.sleep(random.uniform(0, 0.002 * attempt))
        raise AssertionError("unreachable")

    # ---- ingest -------------------------------------------------------------------------------

    async def track(
        self,
        tenant: str,
        batch: Sequence[Event],
        now: datetime,
        message: EventMessage,
        *,
        make_id: Callable[[], str],
    ) -> list[TrackResult]:
        """Store a batch atomically; one result per event, duplicates (by message_id) flagged."""
        first = first_occurrences(batch)
        unique_positions = [i for i, f in enumerate(first) if f == i]
        unique = [batch[i] for i in unique_positions]

        def unique_message(j: int, event_id: str, state: ProfileState) -> OutboxMessage:
            return message(unique_positions[j], event_id, state)

        stored = await self._transaction(
            lambda conn: self._track(conn, tenant, unique, now, unique_message, make_id)
        )
        by_position = dict(zip(unique_positions, stored, strict=True))
        results = []
        for i, f in enumerate(first):
            r = by_position[f]
            results.append(r if f == i else TrackResult(r.event_id, r.profile_id, True))
        return results

    async def _track(
        self,
        conn: AsyncConnection,
        tenant: str,
        batch: list[Event],
        now: datetime,
        message: EventMessage,
        make_id: Callable[[], str],
    ) -> list[TrackResult]:
        if len(batch) >= CUSTOM_PLAN_MIN_EVENTS:
            await conn.execute(_CUSTOM_PLANS)
        keys: dict[Key, None] = {}
        for event in batch:
            for key in event_keys(event):
                keys[key] = None
        bound = await self._resolve(conn, tenant, list(keys))
        plan = await self._bind(conn, tenant, batch, bound, now)
        await self._lock(conn, tenant, plan)
        event_ids = [make_id() for _ in batch]
        msgs = [message(j, event_ids[j], plan.profiles[pid]) for j, pid in enumerate(plan.profile_ids)]
        last_seen: dict[str, datetime] = {}
        for event, pid in zip(batch, plan.profile_ids, strict=True):
            if pid not in last_seen or event.timestamp > last_seen[pid]:
                last_seen[pid] = event.timestamp
        touched = [plan.profiles[pid] for pid in sorted(last_seen)]
        rows = await conn.execute(
            _STORE,
            {
                "tenant": tenant,
                "now": now,
                "event_ids": event_ids,
                "message_ids": [e.message_id for e in batch],
                "profile_ids": plan.profile_ids,
                "types": [e.type for e in batch],
                "occurred": [e.timestamp for e in batch],
                "anonymous_ids": [e.anonymous_id for e in batch],
                "customer_ids": [e.customer_id for e in batch],
                "emails": [e.email for e in batch],
                "properties": [e.properties_json for e in batch],
                "subjects": [m.subject for m in msgs],
                "payloads": [m.payload for m in msgs],
                # New profiles with their identifiers; existing ones with what this batch fills in.
                "up_ids": [p.profile_id for p in touched],
                "up_customer_ids": [p.customer_id if p.new or p.filled else None for p in touched],
                "up_emails": [p.email if p.new or p.filled else None for p in touched],
                "up_last_seen": [last_seen[p.profile_id] for p in touched],
            },
        )
        stored = {r[0] for r in rows}
        results = [TrackResult(event_ids[j], pid, False) for j, pid in enumerate(plan.profile_ids)]
        if len(stored) < len(batch):
            missing = [e.message_id for e in batch if e.message_id not in stored]
            known = {
                r.message_id: r
                for r in await conn.execute(_STORED_EVENTS, {"tenant": tenant, "message_ids": missing})
            }
            if len(known) < len(missing):
                raise _Conflict  # the conflicting insert was rolled back after all
            for j, event in enumerate(batch):
                if event.message_id not in stored:
                    original = known[event.message_id]
                    results[j] = TrackResult(original.event_id, original.profile_id, True)
        return results

    async def _bind(
        self,
        conn: AsyncConnection,
        tenant: str,
        batch: list[Event],
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
            rows = await conn.execute(
                _BIND,
                {
                    "tenant": tenant,
                    "now": now,
                    "kinds": [k for k, _, _ in plan.new_identities],
                    "vals": [v for _, v, _ in plan.new_identities],
                    "profile_ids": [p for _, _, p in plan.new_identities],
                },
            )
            won = {(r.kind, r.value) for r in rows}
            if len(won) == len(plan.new_identities):
                return plan
            bound = apply_bindings(bound, [b for b in plan.new_identities if (b[0], b[1]) in won])
            lost = [(k, v) for k, v, _ in plan.new_identities if (k, v) not in won]
            bound.update(await self._resolve(conn, tenant, lost))
        raise _Conflict

    async def _resolve(
        self, conn: AsyncConnection, tenant: str, keys: list[Key], *, lock: bool = False
    ) -> dict[Key, ProfileState]:
        """The profiles bound to `keys` (locked if asked); a merged-away one means start again."""
        if not keys:
            return {}
        rows = await conn.execute(
            _RESOLVE_LOCKED if lock else _RESOLVE,
            {"tenant": tenant, "kinds": [k for k, _ in keys], "vals": [v for _, v in keys]},
        )
        states: dict[str, ProfileState] = {}
        bound: dict[Key, ProfileState] = {}
        for kind, value, profile_id, customer_id, email, first_name, merged_into, created_at in rows:
            if merged_into is not None:
                raise _Conflict
            state = states.get(profile_id)
            if state is None:
                state = states[profile_id] = ProfileState(
                    profile_id, customer_id, email, first_name, created_at=created_at
                )
            bound[(kind, value)] = state
        return bound

    async def _lock(self, conn: AsyncConnection, tenant: str, plan: TrackPlan) -> None:
        """Lock the existing profiles the batch writes to, in id order, and refresh their state
        (customer_id, email, first_name, consents) for the events' snapshots. A profile merged
        away since it was resolved means the batch starts again."""
        states = {pid: plan.profiles[pid] for pid in plan.profile_ids if not plan.profiles[pid].new}
        if not states:
            return
        rows = (await conn.execute(_LOCK_PROFILES, {"tenant": tenant, "ids": sorted(states)})).all()
        if len(rows) < len(states):
            raise _Conflict
        for profile_id, customer_id, email, first_name, merged_into, consents_json in rows:
            if merged_into is not None:
                raise _Conflict
            state = states[profile_id]
            state.customer_id = customer_id or state.customer_id
            state.email = email or state.email
            state.first_name = first_name
            state.consents = _parse_consents(consents_json)

    # ---- identify and consent -------------------------------------------------------------------

    async def identify(
        self, tenant: str, command: IdentifyCommand, now: datetime, *, make_profile_id: Callable[[], str]
    ) -> tuple[Profile, bool]:
        """Find or create the known profile, merge the anonymous id's shadow profile into it (and
        the other known profile when customer_id and email were bound to two: see domain/merge.py),
        set the first name and record consents. Returns the profile and whether it was created."""

        async def work(conn: AsyncConnection) -> tuple[Profile, bool]:
            bound = await self._resolve(conn, tenant, command.identifiers(), lock=True)
            plan = plan_identify(command, bound, make_profile_id)
            pid = plan.profile_id
            if plan.created:
                await conn.execute(
                    profiles.insert().values(
                        tenant_id=tenant,
                        profile_id=pid,
                        customer_id=plan.customer_id,
                        email=plan.email,
                        first_name=plan.first_name,
                        created_at=now,
                        updated_at=now,
                    )
                )
            if plan.attach:
                attached = await conn.execute(
                    _ATTACH,
                    {
                        "tenant": tenant,
                        "profile_id": pid,
                        "now": now,
                        "kinds": [k for k, _ in plan.attach],
                        "vals": [v for _, v in plan.attach],
                    },
                )
                if len(attached.all()) < len(plan.attach):
                    raise _Conflict
            outbox_msgs: list[OutboxMessage] = []
            if plan.take_anonymous_from is not None and command.anonymous_id:
                await conn.execute(
                    identities.update()
                    .where(
                        identities.c.tenant_id == tenant,
                        identities.c.kind == ANONYMOUS,
                        identities.c.value == command.anonymous_id,
                    )
                    .values(profile_id=pid)
                )
            if plan.merge_from is not None:
                outbox_msgs += await self._merge(
                    conn, tenant, plan.merge_from, pid, command.anonymous_id, now, REASON_ANONYMOUS
                )
            if plan.merge_known_from is not None:
                outbox_msgs += await self._merge(
                    conn, tenant, plan.merge_known_from, pid, None, now, REASON_KNOWN
                )
            if not plan.created:
                await conn.execute(
                    profiles.update()
                    .where(profiles.c.tenant_id == tenant, profiles.c.profile_id == pid)
                    .values(
                        customer_id=plan.customer_id,
                        email=plan.email,
                        first_name=plan.first_name,
                        updated_at=now,
                    )
                )
            given = command.consents
            if given and await suppressed_hashes(
                conn, tenant, [command.customer_id or "", command.email or ""]
            ):
                given = ()  # an erased person's identifier: consent is not restored (README, GDPR)
            outbox_msgs += await self._record_consents(conn, tenant, pid, given)
            await enqueue(conn, outbox, outbox_msgs, now)
            [profile] = await self._load(conn, tenant, [pid])
            return profile, plan.created

        return await self._transaction(work)

    async def _merge(
        self,
        conn: AsyncConnection,
        tenant: str,
        from_id: str,
        to_id: str,
        anonymous_id: str | None,
        now: datetime,
        reason: str,
    ) -> list[OutboxMessage]:
        """Merge profile `from_id` into `to_id` (both already locked by `_resolve`): move its
        identities, events, consent ledger, tags and traits, take over its consent decisions that
        are more recent than the survivor's, take its first name if the survivor has none, mark it
        merged (with the profiles merged into it before), record the merge and enqueue
        ProfileMerged (and ConsentChanged for each decision taken over)."""
        ids = {"tenant": tenant, "from_id": from_id, "to_id": to_id}
        for table in (identities, events, consent_ledger):
            await conn.execute(
                table.update()
                .where(table.c.tenant_id == tenant, table.c.profile_id == from_id)
                .values(profile_id=to_id)
            )
        held = await self._consents_of(conn, tenant, [from_id, to_id])
        taken = consents_taken_over(held.get(to_id, []), held.get(from_id, []))
        if taken:
            latest = [(to_id, c) for c in taken]
            await conn.execute(_UPSERT_CONSENTS, {"tenant": tenant, **_consent_columns(latest)})
        await conn.execute(
            consents.delete().where(consents.c.tenant_id == tenant, consents.c.profile_id == from_id)
        )
        await conn.execute(_MERGE_TAGS, ids)
        await conn.execute(_MERGE_TRAITS, ids)
        await conn.execute(_MERGE_PROFILES, {**ids, "now": now})
        await conn.execute(
            profiles.update()
            .where(
                profiles.c.tenant_id == tenant,
                sa.or_(profiles.c.profile_id == from_id, profiles.c.merged_into == from_id),
            )
            .values(merged_into=to_id, updated_at=now)
        )
        await conn.execute(
            merges.insert().values(
                tenant_id=tenant,
                from_profile_id=from_id,
                to_profile_id=to_id,
                anonymous_id=anonymous_id,
                source="identify",
                merged_at=now,
            )
        )
        return [
            *(OutboxMessage(CONSENT_SUBJECT, self.consent_message(tenant, to_id, c)) for c in taken),
            OutboxMessage(MERGED_SUBJECT, self.merged_message(tenant, to_id, from_id, now, reason)),
        ]

    async def _consents_of(
        self, conn: AsyncConnection, tenant: str, profile_ids: list[str]
    ) -> dict[str, list[Consent]]:
        rows = await conn.execute(
            sa.select(consents).where(consents.c.tenant_id == tenant, consents.c.profile_id.in_(profile_ids))
        )
        held: dict[str, list[Consent]] = {}
        for r in rows:
            held.setdefault(r.profile_id, []).append(
                Consent(r.purpose, r.channel, r.status, r.source, r.evidence, r.recorded_at)
            )
        return held

    async def _record_consents(
        self, conn: AsyncConnection, tenant: str, profile_id: str, decisions: Sequence[Consent]
    ) -> list[OutboxMessage]:
        """Append to the ledger, update the current view; the ConsentChanged messages to enqueue."""
        return await self._record_consent_decisions(conn, tenant, [(profile_id, c) for c in decisions])

    async def _record_consent_decisions(
        self, conn: AsyncConnection, tenant: str, decisions: Sequence[tuple[str, Consent]]
    ) -> list[OutboxMessage]:
        """`_record_consents` for (profile id, decision) pairs of any number of profiles."""
        if not decisions:
            return []
        await conn.execute(_APPEND_LEDGER, {"tenant": tenant, **_consent_columns(decisions)})
        by_profile: dict[str, list[Consent]] = {}
        for profile_id, c in decisions:
            by_profile.setdefault(profile_id, []).append(c)
        latest = [(pid, c) for pid in sorted(by_profile) for c in current_view(by_profile[pid])]
        await conn.execute(_UPSERT_CONSENTS, {"tenant": tenant, **_consent_columns(latest)})
        return [
            OutboxMessage(CONSENT_SUBJECT, self.consent_message(tenant, profile_id, c))
            for profile_id, c in decisions
        ]

    # ---- import ---------------------------------------------------------------------------------

    async def import_rows(
        self, tenant: str, rows: Sequence[ImportRow], now: datetime, *, make_profile_id: Callable[[], str]
    ) -> ImportResult:
        """Upsert the valid rows of one batch in one transaction (see `plan_import`): profiles by
        customer_id, else email; tags; backend traits; consent decisions that change the current
        view go to the ledger with a ConsentChanged message, unchanged ones are skipped."""
        if not rows:
            return ImportResult(0, 0, 0)

        async def work(conn: AsyncConnection) -> ImportResult:
            keys = list(dict.fromkeys(k for row in rows for k in row.identifiers()))
            if len(rows) >= CUSTOM_PLAN_MIN_EVENTS:
                await conn.execute(_CUSTOM_PLANS)
            bound = await self._resolve(conn, tenant, keys, lock=True)
            erased = await suppressed_hashes(
                conn, tenant, (v or "" for r in rows if r.consent for v in (r.customer_id, r.email, r.phone))
            )
            kept = list(rows)
            not_restored: list[int] = []
            if erased:
                for i, r in enumerate(rows):
                    values = (r.customer_id, r.email, r.phone)
                    if r.consent is not None and any(v and identifier_hash(v) in erased for v in values):
                        kept[i] = dataclasses.replace(r, consent=None)
                        not_restored.append(r.row_number)
            plan = plan_import(kept, {k: s.profile_id for k, s in bound.items()}, make_profile_id)
            await self._write_import(conn, tenant, plan, now)
            changes: list[tuple[str, Consent]] = []
            if plan.consents:
                ids = sorted({pid for pid, _ in plan.consents})
                current = {
                    (r.profile_id, r.purpose, r.channel): r.status
                    for r in await conn.execute(_CURRENT_STATUSES, {"tenant": tenant, "ids": ids})
                }
                changes = consent_changes(current, plan.consents)
            if changes:
                msgs = await self._record_consent_decisions(conn, tenant, changes)
                touched = sorted({pid for pid, _ in changes})
                await conn.execute(_TOUCH_PROFILES, {"tenant": tenant, "ids": touched, "now": now})
                await enqueue(conn, outbox, msgs, now)
            return ImportResult(len(rows), plan.created, len(changes), not_restored)

        return await self._transaction(work)

    async def _write_import(
        self, conn: AsyncConnection, tenant: str, plan: ImportPlan, now: datetime
    ) -> None:
        if plan.bind:
            won = await conn.execute(
                _BIND,
                {
                    "tenant": tenant,
                    "now": now,
                    "kinds": [k for k, _, _ in plan.bind],
                    "vals": [v for _, v, _ in plan.bind],
                    "profile_ids": [p for _, _, p in plan.bind],
                },
            )
            if len(won.all()) < len(plan.bind):
                raise _Conflict  # a concurrent call bound one first: plan again against it
        ps = plan.profiles
        await conn.execute(
            _IMPORT_PROFILES,
            {
                "tenant": tenant,
                "now": now,
                "ids": [p.profile_id for p in ps],
                "customer_ids": [p.customer_id for p in ps],
                "emails": [p.email for p in ps],
                "first_names": [p.first_name for p in ps],
                "last_names": [p.last_name for p in ps],
                "phones": [p.phone for p in ps],
            },
        )
        if plan.tags:
            await conn.execute(
                _IMPORT_TAGS,
                {
                    "tenant": tenant,
                    "now": now,
                    "ids": [p for p, _ in plan.tags],
                    "tags": [t for _, t in plan.tags],
                },
            )
        if plan.traits:
            await conn.execute(
                _IMPORT_TRAITS,
                {
                    "tenant": tenant,
                    "now": now,
                    "source": BACKEND,
                    "ids": [p for p, _ in plan.traits],
                    "names": [n for _, n in plan.traits],
                    "vals": list(plan.traits.values()),
                },
            )

    async def set_consent(self, tenant: str, profile_id: str, consent: Consent, now: datetime) -> Profile:
        """Record one consent decision for an existing profile (NotFound otherwise)."""

        async def work(conn: AsyncConnection) -> Profile:
            target = profile_id
            for _ in range(2):  # a merged-away id stands for the profile it was merged into
                row = (await conn.execute(_LOCK_PROFILE, {"tenant": tenant, "profile_id": target})).first()
                if row is None:
                    raise NotFound(f"profile {profile_id!r} not found")
                if row.merged_into is None:
                    break
                target = row.merged_into
            else:
                raise _Conflict
            msgs = await self._record_consents(conn, tenant, target, [consent])
            await conn.execute(
                profiles.update()
                .where(profiles.c.tenant_id == tenant, profiles.c.profile_id == target)
                .values(updated_at=now)
            )
            await enqueue(conn, outbox, msgs, now)
            [profile] = await self._load(conn, tenant, [target])
            return profile

        return await self._transaction(work)

    # ---- reads ----------------------------------------------------------------------------------

    async def _load(self, conn: AsyncConnection, tenant: str, profile_ids: Iterable[str]) -> list[Profile]:
        """Profiles by id, in the order asked, each once; a merged-away id yields the profile it went to."""
        ids = list(profile_ids)
        if not ids:
            return []
        rows = (await conn.execute(_LOAD, {"tenant": tenant, "ids": ids})).all()
        by_requested = {r.requested: r for r in rows}
        out: dict[str, Profile] = {}
        for pid in ids:
            r = by_requested.get(pid)
            if r is None or r.profile_id in out:
                continue
            out[r.profile_id] = Profile(
                profile_id=r.profile_id,
                customer_id=r.customer_id,
                email=r.email,
                first_name=r.first_name,
                anonymous_ids=tuple(r.anonymous_ids or ()),
                consents=_parse_consents(r.consents),
                created_at=r.created_at,
                updated_at=r.updated_at,
                last_seen_at=r.last_seen_at,
            )
        return list(out.values())

    async def get_profiles(self, tenant: str, profile_ids: Sequence[str]) -> list[Profile]:
        async with self.engine.connect() as conn:
            return await self._load(conn, tenant, profile_ids)

    async def find_profile(self, tenant: str, lookup: Lookup) -> Profile:
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
            found = await self._load(conn, tenant, [pid]) if pid else []
        if not found:
            raise NotFound(f"no profile with {lookup.kind} {lookup.value!r}")
        return found[0]
