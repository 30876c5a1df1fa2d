"""Tables and queries of the profile service (SQLAlchemy Core on asyncpg).

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

import asyncio
import dataclasses
import hashlib
import json
from collections import Counter
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence, Set
from dataclasses import dataclass
from datetime import datetime
from typing import Any, TypeVar

import asyncpg
import orjson
import sqlalchemy as sa
from sqlalchemy.dialects.postgresql import ARRAY, JSONB
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from relevans.kit.db import DriverStatement, driver_connection, json_value, run_transaction
from relevans.kit.errors import NotFound
from relevans.kit.merges import MERGED_SUBJECT
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
from services.profile.domain.conditions import ProfileView
from services.profile.domain.enrichment import (
    EnrichedState,
    Enrichment,
    EventFacts,
    counter_values,
    counters_from_json,
    counters_to_json,
    enrich,
    last_seen_from_json,
    last_seen_to_json,
    latest_seen,
    merge_states,
    score_crossings,
    score_now,
    state_view,
)
from services.profile.domain.identity import Enriched
from services.profile.domain.imports import (
    BACKEND,
    ImportPlan,
    ImportRow,
    StoredProfile,
    consent_changes,
    drop_unchanged,
    plan_import,
)
from services.profile.domain.merge import (
    REASON_ANONYMOUS,
    REASON_KNOWN,
    REASON_REQUEST,
    check_mergeable,
    choose_survivor,
    consents_taken_over,
)
from services.profile.domain.profiles import TraitValue
from services.profile.domain.traits import BEHAVIOURAL, DECLARED, PRECEDENCE, TraitScalar
from services.profile.signals import SegmentRule, apply_membership, crossing_message, membership_message

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
    # Effective traits by source precedence (declared > backend > behavioural), kept in step
    # with profile_traits by `refresh_traits`.
    sa.Column("traits", JSONB, nullable=False, server_default=sa.text("'{}'::jsonb")),
    # {counter name: {"YYYY-MM-DD": count}}, UTC days, pruned to the counter's longest window.
    sa.Column("counters", JSONB, nullable=False, server_default=sa.text("'{}'::jsonb")),
    # {event type: ISO-8601 time of the latest such event}.
    sa.Column("last_seen_types", JSONB, nullable=False, server_default=sa.text("'{}'::jsonb")),
    # Event points as of score_at; they decay by the tenant's half-life (trait points are added on read).
    sa.Column("score", sa.Float, nullable=False, server_default=sa.text("0")),
    sa.Column("score_at", TZ),
    # A merged profile's shadows (migration 0010); the profiles never merged are not indexed.
    sa.Index(
        "profiles_merged_into",
        "tenant_id",
        "merged_into",
        postgresql_where=sa.text("merged_into IS NOT NULL"),
    ),
    # Room for HOT updates: each event rewrites its profile's row (migration 0005).
    postgresql_with={"fillfactor": 70},
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
    # Unique by construction; not indexed (see migration 0007).
    sa.Column("event_id", sa.Text, nullable=False),
    # The client's idempotency key (or a generated one).
    sa.Column("message_id", sa.Text, primary_key=True),
    sa.Column("profile_id", sa.Text, nullable=False),
    sa.Column("type", sa.Text, nullable=False),
    sa.Column("occurred_at", TZ, nullable=False),
    sa.Column("received_at", TZ, nullable=False),
    sa.Column("anonymous_id", sa.Text),
    sa.Column("customer_id", sa.Text),
    sa.Column("email", sa.Text),
    sa.Column("properties", JSONB, nullable=False),
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
    sa.Index("merges_from", "tenant_id", "from_profile_id"),
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
    # A JSON string, number or bool.
    sa.Column("value", JSONB, nullable=False),
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

counter_definitions = sa.Table(
    "counter_definitions",
    metadata,
    sa.Column("tenant_id", sa.Text, primary_key=True),
    sa.Column("name", sa.Text, primary_key=True),
    sa.Column("event_type", sa.Text, nullable=False),
    sa.Column("windows", ARRAY(sa.Integer), nullable=False),
    sa.Column("property", sa.Text),
    sa.Column("property_value", JSONB),
    sa.Column("thresholds", ARRAY(sa.BigInteger), nullable=False),
    sa.Column("created_at", TZ, nullable=False),
)

computed_traits = sa.Table(
    "computed_traits",
    metadata,
    sa.Column("tenant_id", sa.Text, primary_key=True),
    sa.Column("name", sa.Text, primary_key=True),
    sa.Column("event_type", sa.Text, nullable=False),
    sa.Column("property", sa.Text, nullable=False),
    sa.Column("created_at", TZ, nullable=False),
)

scoring_rules = sa.Table(
    "scoring_rules",
    metadata,
    sa.Column("tenant_id", sa.Text, primary_key=True),
    sa.Column("rules", JSONB, nullable=False),
    sa.Column("half_life_days", sa.Integer, nullable=False),
    sa.Column("thresholds", ARRAY(sa.Float), nullable=False),
    sa.Column("updated_at", TZ, nullable=False),
)

segments = sa.Table(
    "segments",
    metadata,
    sa.Column("tenant_id", sa.Text, primary_key=True),
    sa.Column("segment_id", sa.Text, primary_key=True),
    sa.Column("name", sa.Text, nullable=False),
    sa.Column("description", sa.Text, nullable=False),
    sa.Column("condition", JSONB, nullable=False),
    sa.Column("created_at", TZ, nullable=False),
    sa.UniqueConstraint("tenant_id", "name", name="segments_name"),
)

# Who matched each segment when an event last changed them (for entry and exit messages).
segment_members = sa.Table(
    "segment_members",
    metadata,
    sa.Column("tenant_id", sa.Text, primary_key=True),
    sa.Column("segment_id", sa.Text, primary_key=True),
    sa.Column("profile_id", sa.Text, primary_key=True),
    sa.Column("entered_at", TZ, nullable=False),
    sa.Index("segment_members_profile", "tenant_id", "profile_id"),
)

outbox = outbox_table(metadata)


_REFRESH_TRAITS = sa.text("""
UPDATE profiles p
SET traits = coalesce((
    SELECT jsonb_object_agg(e.name, e.value)
    FROM (SELECT DISTINCT ON (t.name) t.name, t.value
          FROM profile_traits t
          WHERE t.tenant_id = p.tenant_id AND t.profile_id = p.profile_id
          ORDER BY t.name, array_position(CAST(:precedence AS text[]), t.source)) e
), '{}'::jsonb)
WHERE p.tenant_id = :tenant AND p.profile_id = ANY(CAST(:ids AS text[]))
RETURNING p.profile_id, p.traits
""")


async def refresh_traits(conn: AsyncConnection, tenant: str, profile_ids: Sequence[str]) -> dict[str, Any]:
    """Recompute the effective traits (`profiles.traits`) of profiles whose profile_traits rows
    changed; call it in the same transaction after every write to profile_traits. Returns the
    new effective traits by profile id."""
    if not profile_ids:
        return {}
    rows = await conn.execute(
        _REFRESH_TRAITS,
        {"tenant": tenant, "ids": sorted(set(profile_ids)), "precedence": list(PRECEDENCE)},
    )
    return {r.profile_id: r.traits for r in rows}


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
MAX_ATTEMPTS = 8
MAX_REPLANS = 10

_CONSENTS_JSON = """(SELECT json_agg(json_build_array(c.purpose, c.channel, c.status, c.source, c.evidence,
                                      c.recorded_at) ORDER BY c.purpose, c.channel)
       FROM consents c WHERE c.tenant_id = p.tenant_id AND c.profile_id = p.profile_id)"""

_TAGS_ARRAY = """ARRAY(SELECT t.tag FROM profile_tags t
       WHERE t.tenant_id = p.tenant_id AND t.profile_id = p.profile_id ORDER BY t.tag)"""

_TRAIT_SOURCES = sa.text("""
SELECT profile_id, name, source, value, updated_at FROM profile_traits
WHERE tenant_id = :tenant AND profile_id = ANY(CAST(:ids AS text[]))
ORDER BY profile_id, name, array_position(CAST(:precedence AS text[]), source)
""")

# The profiles some identifiers are bound to, by id only: ingest reads (and locks) the profiles
# afterwards (`_profiles`), and what it read of them before the lock could be stale anyway. (The lateral
# subquery with LIMIT 1 stays a nested loop of primary key lookups whatever the planner estimates,
# however many identities the tenant has.)
_BOUND_IDS = """
SELECT k.kind, k.value, i.profile_id
FROM unnest(CAST(:kinds AS text[]), CAST(:vals AS text[])) AS k(kind, value)
CROSS JOIN LATERAL (
    SELECT i.profile_id FROM identities i
    WHERE i.tenant_id = :tenant AND i.kind = k.kind AND i.value = k.value
    LIMIT 1
) AS i
"""
_RESOLVE = sa.text(_BOUND_IDS)
# What ingest needs to know first, in one round trip: the profiles the batch's identifiers are bound
# to (rows as `_BOUND_IDS`'s), and which of its message ids were stored before (rows of kind
# `event`: message id, profile id, event id).
_RESOLVE_EVENTS = sa.text(f"""
SELECT b.kind, b.value, b.profile_id, NULL AS event_id FROM ({_BOUND_IDS}) AS b
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
# The profiles bound to some identifiers, each locked, in profile id order (the lock is taken on
# the outer scan of profiles, after the sort, so concurrent callers lock in one order).
_RESOLVE_LOCKED = sa.text(f"""
WITH r AS MATERIALIZED ({_BOUND_IDS})
SELECT r.kind, r.value, p.profile_id, p.customer_id, p.email, p.first_name, p.merged_into, p.created_at
FROM r JOIN profiles p ON p.tenant_id = :tenant AND p.profile_id = r.profile_id
ORDER BY p.profile_id
FOR NO KEY UPDATE OF p
""")

# The existing profiles a batch writes to, in the order of `ids` (profile id order), read afresh with
# the version read (`ctid`, `xmin`), locked or not. (Each by its own primary key lookup, as
# `_BOUND_IDS` does: a subquery with LIMIT is never turned into a join, which the plan of a small
# table could make a scan of the tenant.)
_PROFILES_OF = f"""
SELECT p.ctid, p.xmin, p.profile_id, p.customer_id, p.email, p.first_name, p.merged_into,
       {_CONSENTS_JSON} AS consents,
       p.traits, CASE WHEN :with_counters THEN p.counters END AS counters, p.last_seen_types,
       p.score, p.score_at, {_TAGS_ARRAY} AS tags,
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
# `_RESOLVE_EVENTS` outside a transaction (ingest without locks, see `ProfileStore._track_unlocked`).
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
# them (`ProfileStore._track_unlocked`) the batch then runs again under locks. The events and
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
       p.traits, p.counters, p.last_seen_types, p.score, p.score_at, {_TAGS_ARRAY} AS tags,
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

# One source's values of traits, for any number of (profile, name) pairs; returns nothing.
_SET_TRAITS = sa.text("""
INSERT INTO profile_traits AS t (tenant_id, profile_id, name, source, value, updated_at)
SELECT :tenant, u.profile_id, u.name, :source, CAST(u.value AS jsonb), :now
FROM unnest(CAST(:ids AS text[]), CAST(:names AS text[]), CAST(:vals AS text[])) AS u(profile_id, name, value)
ORDER BY u.profile_id, u.name
ON CONFLICT (tenant_id, profile_id, name, source) DO UPDATE
SET value = excluded.value, updated_at = excluded.updated_at
WHERE t.value IS DISTINCT FROM excluded.value
""")

_ENRICHMENT_OF = sa.text("""
SELECT p.profile_id, p.traits, p.counters, p.last_seen_types, p.score, p.score_at,
       ARRAY[]::text[] AS tags, ARRAY[]::text[] AS held_traits
FROM profiles p
WHERE p.tenant_id = :tenant AND p.profile_id = ANY(CAST(:ids AS text[]))
""")

_LOCK_PROFILE = sa.text("""
SELECT profile_id, merged_into, customer_id, created_at FROM profiles
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

# Import: one statement writes a batch's profiles, tags and backend traits, each set passed as one
# JSON parameter (an array of arrays; asyncpg encodes one string much faster than many array
# elements). A new profile is inserted with its tags, its backend traits and its effective
# traits (a JSON object: the batch's backend traits are the only ones it has), by plain inserts
# (nothing can conflict with a new profile id). An existing profile is updated where the batch
# changes it: a field the batch leaves empty (null) stays as it is, and a profile the batch
# changes nothing of is not touched; tags are added, and a trait is written when its value
# changed. Returns the existing profiles whose traits changed (their effective traits are
# refreshed after).
_IMPORT_WRITE = sa.text("""
WITH u AS (
    SELECT e.x->>0 AS profile_id, e.x->>1 AS customer_id, e.x->>2 AS email, e.x->>3 AS first_name,
           e.x->>4 AS last_name, e.x->>5 AS phone, CAST(e.x->6 AS jsonb) AS traits
    FROM jsonb_array_elements(CAST(:profiles AS jsonb)) AS e(x)
), created AS (
    INSERT INTO profiles
        (tenant_id, profile_id, customer_id, email, first_name, last_name, phone, traits, created_at,
         updated_at)
    SELECT :tenant, u.profile_id, u.customer_id, u.email, u.first_name, u.last_name, u.phone, u.traits,
           :now, :now
    FROM u WHERE jsonb_typeof(u.traits) = 'object'
    ORDER BY u.profile_id
), updated AS (
    UPDATE profiles p
    SET customer_id = coalesce(p.customer_id, u.customer_id),
        email = coalesce(p.email, u.email),
        first_name = coalesce(u.first_name, p.first_name),
        last_name = coalesce(u.last_name, p.last_name),
        phone = coalesce(u.phone, p.phone),
        updated_at = :now
    FROM u
    WHERE jsonb_typeof(u.traits) = 'null' AND p.tenant_id = :tenant AND p.profile_id = u.profile_id
      AND ((p.customer_id IS NULL AND u.customer_id IS NOT NULL)
           OR (p.email IS NULL AND u.email IS NOT NULL)
           OR coalesce(u.first_name, p.first_name) IS DISTINCT FROM p.first_name
           OR coalesce(u.last_name, p.last_name) IS DISTINCT FROM p.last_name
           OR coalesce(u.phone, p.phone) IS DISTINCT FROM p.phone)
), new_tags AS (
    INSERT INTO profile_tags (tenant_id, profile_id, tag, created_at)
    SELECT :tenant, e.x->>0, e.x->>1, :now
    FROM jsonb_array_elements(CAST(:new_tags AS jsonb)) AS e(x)
    ORDER BY 2, 3
), tags AS (
    INSERT INTO profile_tags (tenant_id, profile_id, tag, created_at)
    SELECT :tenant, e.x->>0, e.x->>1, :now
    FROM jsonb_array_elements(CAST(:tags AS jsonb)) AS e(x)
    ORDER BY 2, 3
    ON CONFLICT DO NOTHING
), new_traits AS (
    INSERT INTO profile_traits (tenant_id, profile_id, name, source, value, updated_at)
    SELECT :tenant, e.x->>0, e.x->>1, :source, to_jsonb(e.x->>2), :now
    FROM jsonb_array_elements(CAST(:new_traits AS jsonb)) AS e(x)
    ORDER BY 2, 3
), traits AS (
    INSERT INTO profile_traits AS t (tenant_id, profile_id, name, source, value, updated_at)
    SELECT :tenant, e.x->>0, e.x->>1, :source, to_jsonb(e.x->>2), :now
    FROM jsonb_array_elements(CAST(:traits AS jsonb)) AS e(x)
    ORDER BY 2, 3
    ON CONFLICT (tenant_id, profile_id, name, source) DO UPDATE
    SET value = excluded.value, updated_at = excluded.updated_at
    WHERE t.value IS DISTINCT FROM excluded.value
    RETURNING t.profile_id
)
SELECT DISTINCT profile_id FROM traits
""")

# Bind a batch's new identifiers ([kind, value, profile id] arrays); returns how many were
# bound (fewer when another transaction bound one first).
_IMPORT_BIND = sa.text("""
WITH bound AS (
    INSERT INTO identities (tenant_id, kind, value, profile_id, created_at)
    SELECT :tenant, e.x->>0, e.x->>1, e.x->>2, :now
    FROM jsonb_array_elements(CAST(:bind AS jsonb)) AS e(x)
    ORDER BY 2, 3
    ON CONFLICT DO NOTHING
    RETURNING 1
)
SELECT count(*) FROM bound
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

# The profiles some identifiers ([kind, value] arrays) are bound to, with what an import may
# change of them: one statement, so one snapshot, whose plan stays index lookups whatever the
# table statistics say. `keys` are the (1-based) positions of the identifiers bound to each.
_IMPORT_READ = sa.text("""
WITH b AS (
    SELECT e.ord, i.profile_id
    FROM jsonb_array_elements(CAST(:keys AS jsonb)) WITH ORDINALITY AS e(x, ord)
    CROSS JOIN LATERAL (
        SELECT i.profile_id FROM identities i
        WHERE i.tenant_id = :tenant AND i.kind = e.x->>0 AND i.value = e.x->>1
        LIMIT 1
    ) AS i
), owners AS (
    SELECT b.profile_id, array_agg(b.ord) AS keys FROM b GROUP BY b.profile_id
)
SELECT o.profile_id, o.keys, p.profile_id AS found, p.merged_into, p.customer_id, p.email,
       p.first_name, p.last_name, p.phone,
       ARRAY(SELECT t.tag FROM profile_tags t
             WHERE t.tenant_id = :tenant AND t.profile_id = o.profile_id) AS tags,
       (SELECT json_object_agg(t.name, t.value) FROM profile_traits t
        WHERE t.tenant_id = :tenant AND t.profile_id = o.profile_id AND t.source = :source) AS traits,
       (SELECT json_agg(json_build_array(c.purpose, c.channel, c.status)) FROM consents c
        WHERE c.tenant_id = :tenant AND c.profile_id = o.profile_id) AS consents
FROM owners o
LEFT JOIN profiles p ON p.tenant_id = :tenant AND p.profile_id = o.profile_id
""")
# Lock the existing profiles a batch changes, in id order.
_IMPORT_LOCK = sa.text("""
SELECT profile_id, merged_into FROM profiles
WHERE tenant_id = :tenant AND profile_id = ANY(CAST(:ids AS text[]))
ORDER BY profile_id
FOR NO KEY UPDATE
""")

# Which of some identifier hashes belong to erased people (`suppressed_hashes` for a batch).
_IMPORT_SUPPRESSED = sa.text("""
SELECT value_hash FROM suppressions WHERE tenant_id = :tenant AND value_hash = ANY(CAST(:hashes AS text[]))
""")

# A batch's consent decisions that change something ([profile id, purpose, channel, status,
# source, evidence, recorded at, subject, payload hex, latest, new profile] arrays, in row
# order): appended to the ledger in order, the latest per (profile, purpose, channel) made
# current (a plain insert for a profile created by the batch), the existing profiles'
# updated_at moved, and a ConsentChanged message each enqueued in order.
_IMPORT_CONSENTS = sa.text("""
WITH d AS (
    SELECT e.ord, e.x->>0 AS profile_id, e.x->>1 AS purpose, e.x->>2 AS channel, e.x->>3 AS status,
           e.x->>4 AS source, e.x->>5 AS evidence, CAST(e.x->>6 AS timestamptz) AS recorded_at,
           e.x->>7 AS subject, decode(e.x->>8, 'hex') AS payload, CAST(e.x->>9 AS boolean) AS latest,
           CAST(e.x->>10 AS boolean) AS new
    FROM jsonb_array_elements(CAST(:decisions AS jsonb)) WITH ORDINALITY AS e(x, ord)
), ledger AS (
    INSERT INTO consent_ledger
        (tenant_id, profile_id, purpose, channel, status, source, evidence, recorded_at)
    SELECT :tenant, d.profile_id, d.purpose, d.channel, d.status, d.source, d.evidence, d.recorded_at
    FROM d ORDER BY d.ord
), first AS (
    INSERT INTO consents (tenant_id, profile_id, purpose, channel, status, source, evidence, recorded_at)
    SELECT :tenant, d.profile_id, d.purpose, d.channel, d.status, d.source, d.evidence, d.recorded_at
    FROM d WHERE d.latest AND d.new
    ORDER BY d.profile_id, d.purpose, d.channel
), current AS (
    INSERT INTO consents AS c
        (tenant_id, profile_id, purpose, channel, status, source, evidence, recorded_at)
    SELECT :tenant, d.profile_id, d.purpose, d.channel, d.status, d.source, d.evidence, d.recorded_at
    FROM d WHERE d.latest AND NOT d.new
    ORDER BY d.profile_id, d.purpose, d.channel
    ON CONFLICT (tenant_id, profile_id, purpose, channel) DO UPDATE
    SET status = excluded.status, source = excluded.source, evidence = excluded.evidence,
        recorded_at = excluded.recorded_at
), touched AS (
    UPDATE profiles SET updated_at = :now
    WHERE tenant_id = :tenant AND profile_id = ANY(CAST(:touch AS text[]))
)
INSERT INTO outbox (subject, payload, created_at)
SELECT d.subject, d.payload, :now FROM d ORDER BY d.ord
""")

_CURRENT_STATUSES = sa.text("""
SELECT profile_id, purpose, channel, status FROM consents
WHERE tenant_id = :tenant AND profile_id = ANY(CAST(:ids AS text[]))
""")


@dataclass(slots=True)
class ImportInFlight:
    """What the uncommitted batches of one import hold, shared by them (see `import_rows`)."""

    # the existing profiles they locked (a profile -> how many of them did)
    profiles: Counter[str] = dataclasses.field(default_factory=Counter)
    # the identifiers they bound -> (the batch's number, done when it has ended)
    keys: dict[Key, tuple[int, asyncio.Future[None]]] = dataclasses.field(default_factory=dict)
    # batches started so far (numbers them in order)
    started: int = 0


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


# (the stored events' indexes in the call, their new event ids, their profiles after the call) ->
# each event's outbox subject and payload (built for the whole batch at once: this runs per event)
EventMessages = Callable[
    [Sequence[int], Sequence[str], Sequence[ProfileState]], tuple[list[str], list[bytes]]
]
# (tenant, profile id, consent) -> ConsentChanged payload
ConsentMessage = Callable[[str, str, Consent], bytes]
# (tenant, surviving profile id, merged profile id, merge time, reason) -> ProfileMerged payload
MergedMessage = Callable[[str, str, str, datetime, str], bytes]


class _Conflict(Exception):
    """A concurrent transaction changed what this one read; run it again."""


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
class _EnrichedRow:
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
    def of(cls, r: Any) -> _EnrichedRow:
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
    ) -> _EnrichedRow:
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
    def empty(cls) -> _EnrichedRow:
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


@dataclass(slots=True)
class _BatchEnrichment:
    # Each touched profile's enrichment columns after the batch.
    after: dict[str, _EnrichedRow] = dataclasses.field(default_factory=dict)
    # Threshold crossings to publish.
    signals: list[OutboxMessage] = dataclasses.field(default_factory=list)
    # (profile id, name, value) of behavioural traits to store.
    behavioural: list[tuple[str, str, object]] = dataclasses.field(default_factory=list)
    # Profiles whose segments to evaluate: their view and the event that changed them.
    views: dict[str, tuple[ProfileView, str]] = dataclasses.field(default_factory=dict)


def _enrich_batch(
    tenant: str,
    touched: Sequence[ProfileState],
    locked: Mapping[str, _EnrichedRow],
    facts: Mapping[str, list[EventFacts]],
    definitions: Enrichment,
    segments: bool,
    now: datetime,
) -> _BatchEnrichment:
    """Apply each touched profile's fresh events to its enrichment state, and set the state each
    event's snapshot carries. A behavioural trait becomes effective only where no declared or
    backend value of it is held."""
    out = _BatchEnrichment()
    scoring = definitions.scoring
    only_last_seen = definitions.is_empty()
    for state in touched:
        pid = state.profile_id
        row = locked.get(pid) or _EnrichedRow.empty()
        events_of = facts.get(pid, [])
        if only_last_seen and not row.enriched.counters:
            # what `enrich` and the rest of this loop come to when nothing is defined, without their
            # bookkeeping (the common case, per profile of every batch)
            e = row.enriched
            moved = EnrichedState(e.counters, latest_seen(e.last_seen, events_of), e.score, e.score_at)
            new = out.after[pid] = _EnrichedRow(row.traits, moved, row.tags, row.held_traits)
            score = score_now(e.score, e.score_at, row.traits, scoring, now)
            state.enriched = Enriched(row.traits, row.tags, (), score, moved.last_seen)
            if segments and events_of:
                out.views[pid] = (new.view(state.consents, definitions, now), events_of[-1].event_id)
            continue
        result = enrich(row.enriched, events_of, definitions, now)
        traits = dict(row.traits)
        for name, value in result.traits.items():
            out.behavioural.append((pid, name, value))
            if name not in row.held_traits:
                traits[name] = value
        new = out.after[pid] = _EnrichedRow(traits, result.state, row.tags, row.held_traits)
        score = score_now(result.state.score, result.state.score_at, traits, scoring, now)
        crossings = list(result.crossings)
        if scoring.thresholds and events_of:
            before = score_now(row.enriched.score, row.enriched.score_at, row.traits, scoring, now)
            crossings += score_crossings(before, score, scoring, events_of[-1].event_id)
        out.signals += [crossing_message(tenant, pid, c, now) for c in crossings]
        state.enriched = Enriched(
            traits=traits,
            tags=row.tags,
            counters=tuple(counter_values(definitions.counters, result.state.counters, now)),
            score=score,
            last_seen=result.state.last_seen,
        )
        if segments and events_of:
            out.views[pid] = (new.view(state.consents, definitions, now), events_of[-1].event_id)
    return out


def _event_rows(
    batch: Sequence[Event],
    event_ids: Sequence[str],
    profile_ids: Sequence[str],
    subjects: Sequence[str],
    payloads: Sequence[bytes],
) -> list[tuple[Any, ...]]:
    """The events as `ingest_event` rows for `_STORE`; an event's position is its outbox order."""
    return [
        (
            event_id,
            e.message_id,
            profile_id,
            e.type,
            e.timestamp,
            e.anonymous_id,
            e.customer_id,
            e.email,
            e.properties_json,
            subject,
            payload,
        )
        for e, event_id, profile_id, subject, payload in zip(
            batch, event_ids, profile_ids, subjects, payloads, strict=True
        )
    ]


def _profile_rows(
    touched: Sequence[ProfileState],
    locked: Mapping[str, _EnrichedRow],
    after: Mapping[str, _EnrichedRow],
    last_seen: Mapping[str, datetime],
) -> tuple[list[tuple[Any, ...]], list[tuple[Any, ...]]]:
    """The `ingest_profile` rows of `_STORE`: the profiles this batch creates, and the existing ones
    it updates (what the batch fills in; a value that did not change is NULL, so the column keeps
    its value)."""
    created: list[tuple[Any, ...]] = []
    updated: list[tuple[Any, ...]] = []
    for state in touched:
        pid = state.profile_id
        now_ = after[pid]
        before = locked.get(pid)
        e = now_.enriched
        last_seen_types = dumps(last_seen_to_json(e.last_seen))
        if before is None:
            created.append(
                (
                    None,
                    pid,
                    state.customer_id,
                    state.email,
                    last_seen[pid],
                    dumps(now_.traits),
                    dumps(counters_to_json(e.counters)),
                    last_seen_types,
                    e.score,
                    e.score_at,
                    None,
                )
            )
            continue
        b = before.enriched
        score_changed = (e.score, e.score_at) != (b.score, b.score_at)
        updated.append(
            (
                before.ctid,
                pid,
                state.customer_id if state.filled else None,
                state.email if state.filled else None,
                last_seen[pid],
                dumps(now_.traits) if now_.traits != before.traits else None,
                dumps(counters_to_json(e.counters)) if e.counters != b.counters else None,
                last_seen_types,
                e.score if score_changed else None,
                e.score_at if score_changed else None,
                before.xmin,
            )
        )
    return created, updated


def _bound_state(profile_id: str, profile: Sequence[Any]) -> ProfileState:
    """A resolved profile's state: its id alone, or what `_RESOLVE_LOCKED` read of it."""
    if not profile:
        return ProfileState(profile_id)
    customer_id, email, first_name, merged_into, created_at = profile
    if merged_into is not None:
        raise _Conflict
    return ProfileState(profile_id, customer_id, email, first_name, created_at=created_at)


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


@dataclass(frozen=True, slots=True)
class _Batch:
    """Events to store, with what storing them needs: the tenant, the receive time, each event's
    position in the call (its outbox order) and how its outbox message and id are made."""

    tenant: str
    events: Sequence[Event]
    now: datetime
    positions: Sequence[int]
    messages: EventMessages
    make_id: Callable[[], str]

    def without(self, known: Mapping[str, TrackResult]) -> _Batch:
        """The batch without the events stored before (`known`, by message id)."""
        if not known:
            return self
        fresh = [j for j, e in enumerate(self.events) if e.message_id not in known]
        return dataclasses.replace(
            self, events=[self.events[j] for j in fresh], positions=[self.positions[j] for j in fresh]
        )


@dataclass(slots=True)
class _Write:
    """A batch of new events ready for `_STORE`, and what it changed of its profiles."""

    results: list[TrackResult]
    events: list[tuple[Any, ...]]  # `ingest_event` rows
    created: list[tuple[Any, ...]]  # `ingest_profile` rows
    updated: list[tuple[Any, ...]]
    enrichment: _BatchEnrichment


def _prepare_write(
    batch: _Batch,
    plan: TrackPlan,
    read: Mapping[str, _EnrichedRow],
    definitions: Enrichment,
    *,
    segments: bool,
) -> _Write:
    """Enrich the profiles of `plan` (as `read`) with the batch's events, and build the rows to store
    and the events' outbox messages."""
    events, tenant, now = batch.events, batch.tenant, batch.now
    event_ids = [batch.make_id() for _ in events]
    last_seen: dict[str, datetime] = {}
    facts: dict[str, list[EventFacts]] = {}
    for event_id, event, pid in zip(event_ids, events, plan.profile_ids, strict=True):
        if pid not in last_seen or event.timestamp > last_seen[pid]:
            last_seen[pid] = event.timestamp
        facts.setdefault(pid, []).append(EventFacts(event_id, event.type, event.timestamp, event.properties))
    profiles = plan.profiles
    touched = [profiles[pid] for pid in sorted(last_seen)]
    enrichment = _enrich_batch(tenant, touched, read, facts, definitions, segments, now)
    subjects, payloads = batch.messages(
        batch.positions, event_ids, [profiles[pid] for pid in plan.profile_ids]
    )
    created, updated = _profile_rows(touched, read, enrichment.after, last_seen)
    return _Write(
        [
            TrackResult(event_id, pid, False)
            for event_id, pid in zip(event_ids, plan.profile_ids, strict=True)
        ],
        _event_rows(events, event_ids, plan.profile_ids, subjects, payloads),
        created,
        updated,
        enrichment,
    )


async def _store(
    driver: asyncpg.Connection,
    tenant: str,
    now: datetime,
    write: _Write,
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
        raise _Conflict from None  # a concurrent call stored one of these events first


def dumps(value: Any) -> str:
    """Compact JSON for jsonb parameters."""
    return orjson.dumps(value).decode()


# (connection, tenant) -> the tenant's enrichment definitions (see services/profile/enrichment.py).
Definitions = Callable[[AsyncConnection, str], Awaitable[Enrichment]]
# A tenant's saved segments, compiled (cached like the definitions).
SegmentRuleSource = Callable[[AsyncConnection, str], Awaitable[list[SegmentRule]]]


class ProfileStore:
    def __init__(
        self,
        engine: AsyncEngine,
        consent_message: ConsentMessage,
        merged_message: MergedMessage,
        definitions: Definitions,
        segment_rules: SegmentRuleSource,
        *,
        ingest_engine: AsyncEngine | None = None,
    ) -> None:
        self.engine = engine
        # `track` runs on these connections (see create_engine's lookups_only); the rest on `engine`.
        self.ingest_engine = ingest_engine or engine
        self.consent_message = consent_message
        self.merged_message = merged_message
        self.definitions = definitions
        self.segment_rules = segment_rules

    async def _transaction(
        self, work: Callable[[AsyncConnection], Awaitable[T]], *, engine: AsyncEngine | None = None
    ) -> T:
        """Run `work` in one transaction, again from the start if it lost a race."""
        return await run_transaction(engine or self.engine, work, attempts=MAX_ATTEMPTS, again=(_Conflict,))

    # ---- ingest -------------------------------------------------------------------------------

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
        to_store = _Batch(tenant, unique, now, unique_positions, messages, make_id)
        stored = await self._track_unlocked(to_store)
        if stored is None:
            stored = await self._transaction(
                lambda conn: self._track(conn, to_store), engine=self.ingest_engine
            )
        if not repeated:
            return stored
        by_position = dict(zip(unique_positions, stored, strict=True))
        results = []
        for i, f in enumerate(first):
            r = by_position[f]
            results.append(r if f == i else TrackResult(r.event_id, r.profile_id, True))
        return results

    async def _track_unlocked(self, batch: _Batch) -> list[TrackResult] | None:
        """Store a batch in three statements outside a transaction: resolve its identifiers and
        message ids, read its existing profiles, and write it all in one statement that fails,
        writing nothing, when any of that changed meanwhile (`_STORE`). Nothing waits for a lock or
        for a commit but that statement, and a batch takes three round trips to PostgreSQL instead
        of `_track`'s five (six with new identifiers): `Track` at 300 calls/s in bench/track.py,
        p50 4.0-4.6 -> 3.3-3.5 ms.

        None, with nothing written, when the batch needs `_track`'s locks: its tenant has segments or
        computed traits (their writes take statements of their own), it crosses a threshold, a
        profile was merged away, or a concurrent write changed what it read."""
        tenant = batch.tenant
        async with self.ingest_engine.connect() as conn:
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
                write = _prepare_write(fresh, plan, read, definitions, segments=False)
                if write.enrichment.signals or write.enrichment.behavioural:
                    return None
                await _store(driver, tenant, batch.now, write, plan.new_identities)
            except (_Conflict, asyncpg.SerializationError, asyncpg.DeadlockDetectedError):
                return None
        return _with_known(batch.events, known, write.results)

    async def _track(self, conn: AsyncConnection, batch: _Batch) -> list[TrackResult]:
        rows = await conn.execute(_RESOLVE_EVENTS, _resolve_params(batch.tenant, batch.events))
        bound, known = _bound_and_known(rows)
        # events stored before are left out; their results name the originals
        written = await self._write_events(conn, batch.without(known), bound)
        return _with_known(batch.events, known, written)

    async def _write_events(
        self, conn: AsyncConnection, batch: _Batch, bound: dict[Key, ProfileState]
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
        write = _prepare_write(batch, plan, locked, definitions, segments=bool(rules))
        enrichment = write.enrichment
        changes = await apply_membership(conn, tenant, rules, enrichment.views, now)
        await _store(driver, tenant, now, write, [])
        if enrichment.behavioural:
            behavioural = enrichment.behavioural
            await conn.execute(
                _SET_TRAITS,
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
            bound.update(await self._resolve(conn, tenant, lost))
        raise _Conflict

    async def _resolve(
        self, conn: AsyncConnection, tenant: str, keys: list[Key], *, lock: bool = False
    ) -> dict[Key, ProfileState]:
        """The profiles bound to `keys`. Locked (identify), each is read whole, and a merged-away one
        means start again. Unlocked (ingest), each is known by id only until `_profiles` reads it: a plan
        may take an identifier to fill in a customer_id or email the profile already has, and the
        write keeps the profile's own (`coalesce` in `_STORE`; `_profiles` refreshes the state)."""
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

    async def _profiles(
        self, driver: asyncpg.Connection, tenant: str, plan: TrackPlan, definitions: Enrichment, *, lock: bool
    ) -> dict[str, _EnrichedRow]:
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
            raise _Conflict
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
                raise _Conflict
            state = states[pid]
            state.customer_id = customer_id or state.customer_id
            state.email = email or state.email
            state.first_name = first_name
            state.consents = _parse_consents(consents)
            row = out[pid] = _EnrichedRow.of_columns(
                traits, counters, last_seen_types, score, score_at, tags, held_traits
            )
            row.ctid = ctid
            row.xmin = xmin
        return out

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
            if command.traits:
                await self._write_traits(conn, tenant, pid, DECLARED, command.traits, now)
            await enqueue(conn, outbox, outbox_msgs, now)
            [profile] = await self._load(conn, tenant, [pid], now)
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
        await refresh_traits(conn, tenant, [to_id])
        await self._merge_enrichment(conn, tenant, from_id, to_id, now)
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

    async def _merge_enrichment(
        self, conn: AsyncConnection, tenant: str, from_id: str, to_id: str, now: datetime
    ) -> None:
        """Counters, last seen times and score of `from_id` added to `to_id`'s; `from_id` leaves
        every segment (a merged-away profile is never a member)."""
        rows = {
            r.profile_id: _EnrichedRow.of(r)
            for r in await conn.execute(_ENRICHMENT_OF, {"tenant": tenant, "ids": [from_id, to_id]})
        }
        definitions = await self.definitions(conn, tenant)
        merged = merge_states(
            rows[to_id].enriched, rows[from_id].enriched, definitions.scoring.half_life_days, now
        )
        await conn.execute(
            profiles.update()
            .where(profiles.c.tenant_id == tenant, profiles.c.profile_id == to_id)
            .values(
                counters=counters_to_json(merged.counters),
                last_seen_types=last_seen_to_json(merged.last_seen),
                score=merged.score,
                score_at=merged.score_at,
            )
        )
        await conn.execute(
            segment_members.delete().where(
                segment_members.c.tenant_id == tenant, segment_members.c.profile_id == from_id
            )
        )

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
        self,
        tenant: str,
        rows: Sequence[ImportRow],
        now: datetime,
        *,
        make_profile_id: Callable[[], str],
        claimed: Callable[[], None] = lambda: None,
        before_commit: Callable[[], Awaitable[None]] | None = None,
        held: ImportInFlight | None = None,
    ) -> ImportResult:
        """Upsert the valid rows of one batch in one transaction (see `plan_import`): profiles by
        customer_id, else email; tags; backend traits; consent decisions that change the current
        view go to the ledger with a ConsentChanged message, unchanged ones are skipped.

        The batch's profiles are read first, in one statement; an existing profile the batch
        changes nothing of is neither locked nor written (see `drop_unchanged`), so re-importing
        a file writes nothing. `claimed` is called once the transaction holds the profiles it
        changes: the existing ones locked, the identifiers of the new ones bound. A later batch
        that starts after that waits for this one wherever they share a person, so it lands
        after it. `held`, shared by the batches of one import, says what its uncommitted
        batches hold: a later batch locks (and so waits for) the profiles they locked even when
        it finds nothing to change in what it read, and waits for the batch that bound one of
        its identifiers to end before it reads (rather than read the identifier as unbound, fail
        to bind it and start over). `before_commit` is awaited last, before the commit (to
        commit batches in order)."""
        if not rows:
            claimed()
            return ImportResult(0, 0, 0)
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        mine: list[str] = []
        number = 0
        if held is not None:
            number = held.started = held.started + 1

        async def work(conn: AsyncConnection) -> ImportResult:
            keys = list(dict.fromkeys(k for row in rows for k in row.identifiers()))
            if held is not None:
                # (an earlier batch's only: a later one waits for this one to commit)
                waits = {f for n, f in filter(None, map(held.keys.get, keys)) if n < number}
                if waits:
                    await asyncio.wait(waits)
            # What the earlier batches locked, taken before the read: one that commits after the
            # read's snapshot is still among them then (they leave it once committed).
            keep = frozenset(held.profiles) if held is not None else frozenset()
            bound: dict[Key, str] = {}
            stored: dict[str, StoredProfile] = {}
            if keys:
                found = await conn.execute(
                    _IMPORT_READ, {"tenant": tenant, "source": BACKEND, "keys": orjson.dumps(keys).decode()}
                )
                for rec in found:
                    if rec.found is None or rec.merged_into is not None:
                        raise _Conflict  # merged or erased as it was read: read again
                    for i in rec.keys:
                        bound[keys[i - 1]] = rec.profile_id
                    stored[rec.profile_id] = StoredProfile(
                        rec.customer_id,
                        rec.email,
                        rec.first_name,
                        rec.last_name,
                        rec.phone,
                        frozenset(rec.tags),
                        json_value(rec.traits) or {},
                        {(purpose, channel): st for purpose, channel, st in json_value(rec.consents) or ()},
                    )
            hashes = {
                identifier_hash(v) for r in rows if r.consent for v in (r.customer_id, r.email, r.phone) if v
            }
            erased: set[str] = set()
            if hashes:
                found = await conn.execute(_IMPORT_SUPPRESSED, {"tenant": tenant, "hashes": list(hashes)})
                erased = set(found.scalars())
            kept = list(rows)
            not_restored: list[int] = []
            if erased:
                for i, r in enumerate(rows):
                    values = (r.customer_id, r.email, r.phone)
                    if r.consent is not None and any(v and identifier_hash(v) in erased for v in values):
                        kept[i] = dataclasses.replace(r, consent=None)
                        not_restored.append(r.row_number)
            plan = plan_import(kept, bound, make_profile_id)
            plan = drop_unchanged(plan, stored, keep)
            new = {p.profile_id for p in plan.profiles if p.new}
            ids = [p.profile_id for p in plan.profiles if not p.new]
            if ids:
                locked = (await conn.execute(_IMPORT_LOCK, {"tenant": tenant, "ids": ids})).all()
                if len(locked) < len(ids) or any(r.merged_into is not None for r in locked):
                    raise _Conflict  # merged or erased since it was read: read again

            def claim() -> None:
                if held is not None:
                    held.profiles.update(ids)
                    mine.extend(ids)
                    held.keys.update(((kind, value), (number, done)) for kind, value, _ in plan.bind)
                claimed()

            await self._write_import(conn, tenant, plan, now, claim)
            changes: list[tuple[str, Consent]] = []
            if plan.consents:
                # a profile created by this batch has no consent yet; the others' statuses are
                # read again now that they are locked
                consenting = sorted({pid for pid, _ in plan.consents} - new)
                current = {
                    (r.profile_id, r.purpose, r.channel): r.status
                    for r in (
                        await conn.execute(_CURRENT_STATUSES, {"tenant": tenant, "ids": consenting})
                        if consenting
                        else ()
                    )
                }
                changes = consent_changes(current, plan.consents)
            if changes:
                await self._write_import_consents(conn, tenant, changes, new, now)
            if before_commit is not None:
                await before_commit()
            return ImportResult(len(rows), plan.created, len(changes), not_restored)

        try:
            return await self._transaction(work)
        finally:
            done.set_result(None)
            if held is not None:
                held.profiles.subtract(mine)
                for pid in mine:
                    if held.profiles[pid] <= 0:
                        del held.profiles[pid]
                for key in [k for k, (_, f) in held.keys.items() if f is done]:
                    del held.keys[key]

    async def _write_import_consents(
        self,
        conn: AsyncConnection,
        tenant: str,
        changes: Sequence[tuple[str, Consent]],
        new: Set[str],
        now: datetime,
    ) -> None:
        """Record a batch's consent changes (see `_IMPORT_CONSENTS`)."""
        latest: dict[tuple[str, str, str], int] = {}  # as `current_view` picks
        for i, (pid, c) in enumerate(changes):
            key = (pid, c.purpose, c.channel)
            j = latest.get(key)
            if j is None or c.recorded_at >= changes[j][1].recorded_at:
                latest[key] = i
        current = set(latest.values())
        decisions = [
            [
                pid,
                c.purpose,
                c.channel,
                c.status,
                c.source,
                c.evidence,
                c.recorded_at.isoformat(),
                CONSENT_SUBJECT,
                self.consent_message(tenant, pid, c).hex(),
                i in current,
                pid in new,
            ]
            for i, (pid, c) in enumerate(changes)
        ]
        # (a profile created by this batch already has updated_at = now)
        touch = sorted({pid for pid, _ in changes} - new)
        await conn.execute(
            _IMPORT_CONSENTS,
            {"tenant": tenant, "now": now, "decisions": orjson.dumps(decisions).decode(), "touch": touch},
        )

    async def _write_import(
        self, conn: AsyncConnection, tenant: str, plan: ImportPlan, now: datetime, claimed: Callable[[], None]
    ) -> None:
        if plan.bind:
            won = await conn.scalar(
                _IMPORT_BIND, {"tenant": tenant, "now": now, "bind": orjson.dumps(plan.bind).decode()}
            )
            if won < len(plan.bind):
                raise _Conflict  # a concurrent call bound one first: plan again against it
        claimed()
        ps = plan.profiles
        if not ps:
            return
        new_traits: dict[str, dict[str, str]] = {p.profile_id: {} for p in ps if p.new}
        traits: tuple[list[tuple[str, str, str]], list[tuple[str, str, str]]] = ([], [])
        for (pid, name), value in plan.traits.items():
            if pid in new_traits:
                new_traits[pid][name] = value
            traits[pid in new_traits].append((pid, name, value))
        tags: tuple[list[tuple[str, str]], list[tuple[str, str]]] = ([], [])
        for t in plan.tags:
            tags[t[0] in new_traits].append(t)
        changed = await conn.execute(
            _IMPORT_WRITE,
            {
                "tenant": tenant,
                "now": now,
                "source": BACKEND,
                # (traits: the new profile's effective traits; null for an existing one)
                "profiles": orjson.dumps(
                    [
                        [
                            p.profile_id,
                            p.customer_id,
                            p.email,
                            p.first_name,
                            p.last_name,
                            p.phone,
                            new_traits[p.profile_id] if p.new else None,
                        ]
                        for p in ps
                    ]
                ).decode(),
                "new_tags": orjson.dumps(tags[True]).decode(),
                "tags": orjson.dumps(tags[False]).decode(),
                "new_traits": orjson.dumps(traits[True]).decode(),
                "traits": orjson.dumps(traits[False]).decode(),
            },
        )
        # (a new profile got its effective traits with its insert)
        await refresh_traits(conn, tenant, [r.profile_id for r in changed])

    async def _lock_existing(self, conn: AsyncConnection, tenant: str, profile_id: str) -> str:
        """Lock a profile by id (a merged-away id stands for the profile it was merged into);
        NotFound when the tenant has no such profile. Returns the locked profile's id."""
        return (await self._lock_row(conn, tenant, profile_id)).profile_id

    async def _lock_row(self, conn: AsyncConnection, tenant: str, profile_id: str) -> Any:
        target = profile_id
        for _ in range(2):
            row = (await conn.execute(_LOCK_PROFILE, {"tenant": tenant, "profile_id": target})).first()
            if row is None:
                raise NotFound(f"profile {profile_id!r} not found")
            if row.merged_into is None:
                return row
            target = row.merged_into
        raise _Conflict

    async def merge_profiles(
        self, tenant: str, profile_id: str, other_profile_id: str, now: datetime
    ) -> tuple[Profile, str | None]:
        """Merge two profiles by the survivor rule; (survivor, merged-away id or None if they were
        one already). Locks both in id order, as every writer does."""

        async def work(conn: AsyncConnection) -> tuple[Profile, str | None]:
            first, second = sorted((profile_id, other_profile_id))
            rows = [await self._lock_row(conn, tenant, first), await self._lock_row(conn, tenant, second)]
            if rows[0].profile_id == rows[1].profile_id:
                [profile] = await self._load(conn, tenant, [rows[0].profile_id], now)
                return profile, None
            survivor, merged = choose_survivor(rows[0], rows[1])
            check_mergeable(survivor, merged)
            msgs = await self._merge(
                conn, tenant, merged.profile_id, survivor.profile_id, None, now, REASON_REQUEST
            )
            await enqueue(conn, outbox, msgs, now)
            [profile] = await self._load(conn, tenant, [survivor.profile_id], now)
            return profile, merged.profile_id

        return await self._transaction(work)

    async def set_consent(self, tenant: str, profile_id: str, consent: Consent, now: datetime) -> Profile:
        """Record one consent decision for an existing profile (NotFound otherwise)."""

        async def work(conn: AsyncConnection) -> Profile:
            target = await self._lock_existing(conn, tenant, profile_id)
            msgs = await self._record_consents(conn, tenant, target, [consent])
            await conn.execute(
                profiles.update()
                .where(profiles.c.tenant_id == tenant, profiles.c.profile_id == target)
                .values(updated_at=now)
            )
            await enqueue(conn, outbox, msgs, now)
            [profile] = await self._load(conn, tenant, [target], now)
            return profile

        return await self._transaction(work)

    async def _write_traits(
        self,
        conn: AsyncConnection,
        tenant: str,
        profile_id: str,
        source: str,
        traits: Mapping[str, TraitScalar | None],
        now: datetime,
    ) -> None:
        """Set (or, for None, remove) one source's values of a profile's traits; refresh the
        effective ones."""
        setting = {k: v for k, v in traits.items() if v is not None}
        removing = [k for k, v in traits.items() if v is None]
        if setting:
            await conn.execute(
                _SET_TRAITS,
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
        await refresh_traits(conn, tenant, [profile_id])

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
            target = await self._lock_existing(conn, tenant, profile_id)
            await self._write_traits(conn, tenant, target, source, traits, now)
            await conn.execute(
                profiles.update()
                .where(profiles.c.tenant_id == tenant, profiles.c.profile_id == target)
                .values(updated_at=now)
            )
            [profile] = await self._load(conn, tenant, [target], now, trait_sources=True)
            return profile

        return await self._transaction(work)

    # ---- reads ----------------------------------------------------------------------------------

    async def _load(
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
                consents=_parse_consents(r.consents),
                created_at=r.created_at,
                updated_at=r.updated_at,
                last_seen_at=r.last_seen_at,
                enriched=enriched_of(r, definitions, now),
                trait_sources=tuple(sources.get(r.profile_id, ())),
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
            return await self._load(conn, tenant, profile_ids, now, merged=merged)

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
            found = await self._load(conn, tenant, [pid], now, trait_sources=trait_sources) if pid else []
        if not found:
            raise NotFound(f"no profile with {lookup.kind} {lookup.value!r}")
        return found[0]
