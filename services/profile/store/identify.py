"""Identify and merge: bind a person's identifiers to one profile, merging the profiles they were
bound to (see domain/merge.py for which survives)."""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from relevans.kit.merges import MERGED_SUBJECT
from relevans.kit.outbox import OutboxMessage, enqueue
from services.profile.domain import ANONYMOUS, IdentifyCommand, Profile, plan_identify
from services.profile.domain.enrichment import counters_to_json, last_seen_to_json, merge_states
from services.profile.domain.merge import (
    REASON_ANONYMOUS,
    REASON_KNOWN,
    REASON_REQUEST,
    check_mergeable,
    choose_survivor,
    consents_taken_over,
)
from services.profile.domain.traits import DECLARED
from services.profile.store.consents import (
    CONSENT_SUBJECT,
    UPSERT_CONSENTS,
    ConsentStore,
    consent_columns,
    consents_of,
)
from services.profile.store.gdpr import suppressed_hashes
from services.profile.store.reads import ProfileReads
from services.profile.store.rows import (
    Conflict,
    Definitions,
    EnrichedRow,
    MergedMessage,
    TraitsMessages,
    lock_row,
    resolve,
    transaction,
)
from services.profile.store.tables import (
    consent_ledger,
    consents,
    events,
    identities,
    merges,
    outbox,
    profiles,
    segment_members,
)
from services.profile.store.traits import (
    IDENTIFY_SOURCE,
    MERGE_SOURCE,
    refresh_traits,
    traits_messages,
    write_traits,
)

_ATTACH = sa.text("""
INSERT INTO identities (tenant_id, kind, value, profile_id, created_at)
SELECT :tenant, i.kind, i.value, :profile_id, :now
FROM unnest(CAST(:kinds AS text[]), CAST(:vals AS text[])) AS i(kind, value)
ORDER BY i.kind, i.value
ON CONFLICT DO NOTHING
RETURNING kind, value
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

_ENRICHMENT_OF = sa.text("""
SELECT p.profile_id, p.traits, p.counters, p.last_seen_types, p.score, p.score_at,
       ARRAY[]::text[] AS tags, ARRAY[]::text[] AS held_traits
FROM profiles p
WHERE p.tenant_id = :tenant AND p.profile_id = ANY(CAST(:ids AS text[]))
""")

_MERGE_PROFILES = sa.text("""
UPDATE profiles t
SET last_seen_at = CASE WHEN s.last_seen_at IS NULL THEN t.last_seen_at
                        ELSE greatest(t.last_seen_at, s.last_seen_at) END,
    first_name = coalesce(t.first_name, s.first_name), updated_at = :now
FROM profiles s
WHERE t.tenant_id = :tenant AND t.profile_id = :to_id AND s.tenant_id = :tenant AND s.profile_id = :from_id
""")


class IdentifyStore:
    """Identify and MergeProfiles: both lock the profiles they merge in profile id order, as every
    writer does."""

    def __init__(
        self,
        engine: AsyncEngine,
        definitions: Definitions,
        merged_message: MergedMessage,
        traits_message: TraitsMessages,
        reads: ProfileReads,
        consents: ConsentStore,
    ) -> None:
        self.engine = engine
        self.definitions = definitions
        self.merged_message = merged_message
        self.traits_message = traits_message
        self.reads = reads
        self.consents = consents

    async def identify(
        self, tenant: str, command: IdentifyCommand, now: datetime, *, make_profile_id: Callable[[], str]
    ) -> tuple[Profile, bool]:
        """Find or create the known profile, merge the anonymous id's shadow profile into it (and
        the other known profile when customer_id and email were bound to two: see domain/merge.py),
        set the first name and record consents and declared traits. Returns the profile and whether
        it was created."""

        async def work(conn: AsyncConnection) -> tuple[Profile, bool]:
            bound = await resolve(conn, tenant, command.identifiers(), lock=True)
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
                    raise Conflict
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
            outbox_msgs += await self.consents.record(conn, tenant, pid, given)
            if command.traits:
                changes = await write_traits(conn, tenant, pid, DECLARED, command.traits, now)
                outbox_msgs += traits_messages(self.traits_message, tenant, changes, now, IDENTIFY_SOURCE)
            await enqueue(conn, outbox, outbox_msgs, now)
            [profile] = await self.reads.load(conn, tenant, [pid], now)
            return profile, plan.created

        return await transaction(self.engine, work)

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
        """Merge profile `from_id` into `to_id` (both already locked by `resolve`): move its
        identities, events, consent ledger, tags and traits, take over its consent decisions that
        are more recent than the survivor's, take its first name if the survivor has none, mark it
        merged (with the profiles merged into it before), record the merge and enqueue
        ProfileMerged (and ConsentChanged for each decision taken over, TraitsChanged when the
        survivor's effective traits changed)."""
        ids = {"tenant": tenant, "from_id": from_id, "to_id": to_id}
        for table in (identities, events, consent_ledger):
            await conn.execute(
                table.update()
                .where(table.c.tenant_id == tenant, table.c.profile_id == from_id)
                .values(profile_id=to_id)
            )
        held = await consents_of(conn, tenant, [from_id, to_id])
        taken = consents_taken_over(held.get(to_id, []), held.get(from_id, []))
        if taken:
            latest = [(to_id, c) for c in taken]
            await conn.execute(UPSERT_CONSENTS, {"tenant": tenant, **consent_columns(latest)})
        await conn.execute(
            consents.delete().where(consents.c.tenant_id == tenant, consents.c.profile_id == from_id)
        )
        await conn.execute(_MERGE_TAGS, ids)
        await conn.execute(_MERGE_TRAITS, ids)
        await conn.execute(_MERGE_PROFILES, {**ids, "now": now})
        changes = await refresh_traits(conn, tenant, [to_id])
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
            *(OutboxMessage(CONSENT_SUBJECT, self.consents.consent_message(tenant, to_id, c)) for c in taken),
            OutboxMessage(MERGED_SUBJECT, self.merged_message(tenant, to_id, from_id, now, reason)),
            *traits_messages(self.traits_message, tenant, changes, now, MERGE_SOURCE),
        ]

    async def _merge_enrichment(
        self, conn: AsyncConnection, tenant: str, from_id: str, to_id: str, now: datetime
    ) -> None:
        """Counters, last seen times and score of `from_id` added to `to_id`'s; `from_id` leaves
        every segment (a merged-away profile is never a member)."""
        rows = {
            r.profile_id: EnrichedRow.of(r)
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

    async def merge_profiles(
        self, tenant: str, profile_id: str, other_profile_id: str, now: datetime
    ) -> tuple[Profile, str | None]:
        """Merge two profiles by the survivor rule; (survivor, merged-away id or None if they were
        one already). Locks both in id order, as every writer does."""

        async def work(conn: AsyncConnection) -> tuple[Profile, str | None]:
            first, second = sorted((profile_id, other_profile_id))
            rows = [await lock_row(conn, tenant, first), await lock_row(conn, tenant, second)]
            if rows[0].profile_id == rows[1].profile_id:
                [profile] = await self.reads.load(conn, tenant, [rows[0].profile_id], now)
                return profile, None
            survivor, merged = choose_survivor(rows[0], rows[1])
            check_mergeable(survivor, merged)
            msgs = await self._merge(
                conn, tenant, merged.profile_id, survivor.profile_id, None, now, REASON_REQUEST
            )
            await enqueue(conn, outbox, msgs, now)
            [profile] = await self.reads.load(conn, tenant, [survivor.profile_id], now)
            return profile, merged.profile_id

        return await transaction(self.engine, work)
