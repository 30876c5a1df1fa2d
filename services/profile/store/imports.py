"""Import: upsert profiles, tags, backend traits and consent from a file, batch by batch.

A batch is read in one statement, planned in the domain (`plan_import`), and written in one
statement (two more when it binds identifiers or records consent); `ImportInFlight` orders the
concurrent batches of one import where they share a person.
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections import Counter
from collections.abc import Awaitable, Callable, Sequence, Set
from dataclasses import dataclass
from datetime import datetime

import orjson
import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from relevans.kit.db import json_value
from relevans.kit.identifiers import identifier_hash
from services.profile.domain import Consent, Key
from services.profile.domain.imports import (
    BACKEND,
    ImportPlan,
    ImportRow,
    StoredProfile,
    consent_changes,
    drop_unchanged,
    plan_import,
)
from services.profile.domain.traits import TraitChange
from services.profile.store.consents import CONSENT_SUBJECT
from services.profile.store.rows import Conflict, ConsentMessage, TraitsMessages, transaction
from services.profile.store.traits import IMPORT_SOURCE, TRAITS_SUBJECT, refresh_traits

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

# A batch's TraitsChanged messages, in one statement.
_IMPORT_TRAIT_MESSAGES = sa.text(f"""
INSERT INTO outbox (subject, payload, created_at)
SELECT '{TRAITS_SUBJECT}', m.payload, :now
FROM unnest(CAST(:payloads AS bytea[])) WITH ORDINALITY AS m(payload, ord)
ORDER BY m.ord
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
    # Profiles whose effective traits changed (and TraitsChanged messages enqueued).
    traits_changed: int = 0


class ImportStore:
    """ImportProfiles' writes: one transaction per batch of rows."""

    def __init__(
        self, engine: AsyncEngine, consent_message: ConsentMessage, traits_message: TraitsMessages
    ) -> None:
        self.engine = engine
        self.consent_message = consent_message
        self.traits_message = traits_message

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
        customer_id, else email; tags; backend traits, with a TraitsChanged message for each
        profile whose effective traits they change; consent decisions that change the current
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
                await _wait_for_earlier(held, keys, number)
            # What the earlier batches locked, taken before the read: one that commits after the
            # read's snapshot is still among them then (they leave it once committed).
            keep = frozenset(held.profiles) if held is not None else frozenset()
            bound, stored = await _read_stored(conn, tenant, keys)
            kept, not_restored = await _without_erased_consents(conn, tenant, rows)
            plan = plan_import(kept, bound, make_profile_id)
            plan = drop_unchanged(plan, stored, keep)
            new = {p.profile_id for p in plan.profiles if p.new}
            ids = [p.profile_id for p in plan.profiles if not p.new]
            await _lock_existing(conn, tenant, ids)

            def claim() -> None:
                if held is not None:
                    held.profiles.update(ids)
                    mine.extend(ids)
                    held.keys.update(((kind, value), (number, done)) for kind, value, _ in plan.bind)
                claimed()

            traits = await self._write_import(conn, tenant, plan, now, claim)
            if traits:
                payloads = self.traits_message(tenant, traits, now, IMPORT_SOURCE)
                await conn.execute(_IMPORT_TRAIT_MESSAGES, {"now": now, "payloads": payloads})
            changes = await _consent_changes(conn, tenant, plan, new)
            if changes:
                await self._write_import_consents(conn, tenant, changes, new, now)
            if before_commit is not None:
                await before_commit()
            return ImportResult(len(rows), plan.created, len(changes), not_restored, len(traits))

        try:
            return await transaction(self.engine, work)
        finally:
            done.set_result(None)
            if held is not None:
                _release(held, mine, done)

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
    ) -> list[TraitChange]:
        """Write the batch's profiles, tags and traits (see `_IMPORT_WRITE`); the changes of
        their effective traits, the new profiles' first."""
        if plan.bind:
            won = await conn.scalar(
                _IMPORT_BIND, {"tenant": tenant, "now": now, "bind": orjson.dumps(plan.bind).decode()}
            )
            if won < len(plan.bind):
                raise Conflict  # a concurrent call bound one first: plan again against it
        claimed()
        ps = plan.profiles
        if not ps:
            return []
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
        # (a new profile got its effective traits with its insert: all of them are new)
        created = [TraitChange(pid, t, {}, tuple(sorted(t))) for pid, t in new_traits.items() if t]
        return created + await refresh_traits(conn, tenant, [r.profile_id for r in changed])


# ---- the phases of `ImportStore.import_rows`, in order ------------------------------------------


async def _wait_for_earlier(held: ImportInFlight, keys: Sequence[Key], number: int) -> None:
    """Wait for the earlier batches of the import that bound one of `keys` to end (only an
    earlier batch's: a later one waits for this one to commit)."""
    waits = {f for n, f in filter(None, map(held.keys.get, keys)) if n < number}
    if waits:
        await asyncio.wait(waits)


async def _read_stored(
    conn: AsyncConnection, tenant: str, keys: list[Key]
) -> tuple[dict[Key, str], dict[str, StoredProfile]]:
    """The profiles `keys` are bound to: the profile id of each bound key, and what an import may
    change of each profile."""
    bound: dict[Key, str] = {}
    stored: dict[str, StoredProfile] = {}
    if not keys:
        return bound, stored
    found = await conn.execute(
        _IMPORT_READ, {"tenant": tenant, "source": BACKEND, "keys": orjson.dumps(keys).decode()}
    )
    for rec in found:
        if rec.found is None or rec.merged_into is not None:
            raise Conflict  # merged or erased as it was read: read again
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
    return bound, stored


async def _without_erased_consents(
    conn: AsyncConnection, tenant: str, rows: Sequence[ImportRow]
) -> tuple[list[ImportRow], list[int]]:
    """The rows with no consent where one of their identifiers was erased (GDPR), and the row
    numbers of those whose consent was so dropped."""
    hashes = {identifier_hash(v) for r in rows if r.consent for v in (r.customer_id, r.email, r.phone) if v}
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
    return kept, not_restored


async def _lock_existing(conn: AsyncConnection, tenant: str, ids: list[str]) -> None:
    """Lock the existing profiles the batch changes, in id order."""
    if ids:
        locked = (await conn.execute(_IMPORT_LOCK, {"tenant": tenant, "ids": ids})).all()
        if len(locked) < len(ids) or any(r.merged_into is not None for r in locked):
            raise Conflict  # merged or erased since it was read: read again


async def _consent_changes(
    conn: AsyncConnection, tenant: str, plan: ImportPlan, new: Set[str]
) -> list[tuple[str, Consent]]:
    """The batch's consent decisions that change a profile's current view."""
    if not plan.consents:
        return []
    # a profile created by this batch has no consent yet; the others' statuses are
    # read again now that they are locked
    consenting = sorted({pid for pid, _ in plan.consents} - new)
    current = {
        (r.profile_id, r.purpose, r.channel): r.status
        for r in (
            await conn.execute(_CURRENT_STATUSES, {"tenant": tenant, "ids": consenting}) if consenting else ()
        )
    }
    return consent_changes(current, plan.consents)


def _release(held: ImportInFlight, mine: Sequence[str], done: asyncio.Future[None]) -> None:
    """Take an ended batch's profiles and identifiers out of what the import holds."""
    held.profiles.subtract(mine)
    for pid in mine:
        if held.profiles[pid] <= 0:
            del held.profiles[pid]
    for key in [k for k, (_, f) in held.keys.items() if f is done]:
        del held.keys[key]
