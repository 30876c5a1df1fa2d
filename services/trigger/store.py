"""The trigger service's transactions (SQLAlchemy Core on asyncpg; tables in `tables`).

The store applies what the domain decides: `apply_events` loads the definitions
and per-profile state a batch of events needs, asks `plan_events` what the
events mean, and writes timers, cancellations and state in the caller's single
transaction; `fire_due` claims due timers with `FOR UPDATE SKIP LOCKED` and
writes their delivery requests to the outbox in the same transaction;
`merge_people` re-points a merged-away profile's timers, state and firings to the
surviving profile and remembers the alias, so the person's later events — under
either id — find one state.

A trigger's condition is stored as its kind's name and the kind's JSON (`triggers.condition_kind`,
`triggers.condition`), read and written through the kinds registry; `trigger_states` holds the
absence kind's per-person state, the only kind that keeps one so far.

Concurrency: a batch takes a transaction-scoped advisory lock per (tenant,
profile) it touches, in a fixed order, before reading state, so two service
instances never interleave one person's start and cancel events. A timer is
claimed by one worker at a time; a cancel that races a firing waits for the
row lock and then finds the timer no longer pending. The `firings` table keys
each firing by (tenant, trigger, profile, occurrence): whatever happens, a
firing writes its delivery request once. A merge takes the locks of both
profiles; a batch of events resolves merged-away ids to their survivors before
locking and re-checks after, so no event lands on an id a merge just retired.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from datetime import datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from relevans.kit.erasure import Erased
from relevans.kit.errors import NotFound
from relevans.kit.locks import lock_key32
from relevans.kit.merges import Person, ProfileMerge, forget_aliases, record_alias, surviving_ids
from relevans.kit.outbox import OutboxMessage, enqueue
from services.trigger import timer_rows
from services.trigger.domain import (
    EventFacts,
    Firing,
    PendingTimer,
    Plan,
    StateKey,
    TriggerDef,
    fire,
    plan_events,
    plan_merge,
    relevant_events,
    resolve_create,
)
from services.trigger.domain.kinds import kind_named
from services.trigger.domain.kinds.absence import TriggerState
from services.trigger.tables import (
    PENDING,
    erased_profiles,
    firings,
    merged_profiles,
    outbox,
    timers,
    trigger_states,
    triggers,
)

# First key of the two-key advisory locks this service takes per (tenant, profile).
PROFILE_LOCK_NAMESPACE = 0x52565447  # "RVTG"

MessageFor = Callable[[Firing, datetime], OutboxMessage]


class MergedMeanwhile(Exception):
    """A profile was merged away while this transaction waited for its lock; the bus retries it."""


@dataclass(frozen=True, slots=True)
class FireResult:
    claimed: int
    fired: int


def _trigger_def(row: sa.Row[Any]) -> TriggerDef:
    return TriggerDef(
        trigger_id=row.trigger_id,
        display_name=row.display_name,
        condition=kind_named(row.condition_kind).from_json(row.condition),
        channel=row.channel,
        purpose=row.purpose,
        template_id=row.template_id,
        created_at=row.created_at,
    )


class TriggerStore:
    def __init__(self, engine: AsyncEngine) -> None:
        self.engine = engine

    # ---- GDPR ---------------------------------------------------------------------------------

    async def purge_people(self, conn: AsyncConnection, erased: Sequence[Erased], now: datetime) -> None:
        """Delete the timers, trigger states and firings of erased people and of the ids merged into
        them (in the caller's transaction), under their advisory locks so no event of theirs is
        applied meanwhile."""
        people = sorted({(e.tenant_id, e.profile_id) for e in erased})
        await self._lock_people(conn, people)
        await conn.execute(
            pg_insert(erased_profiles)
            .values([{"tenant_id": t, "profile_id": p, "erased_at": now} for t, p in people])
            .on_conflict_do_nothing()
        )
        # The ids merged into an erased person are erased with them, and the links between ids go.
        merged_ids = await forget_aliases(conn, merged_profiles, people)
        if merged_ids:
            await conn.execute(
                pg_insert(erased_profiles)
                .values([{"tenant_id": t, "profile_id": p, "erased_at": now} for t, p in merged_ids])
                .on_conflict_do_nothing()
            )
        for tenant_id, profile_id in sorted({*people, *merged_ids}):
            for table in (timers, trigger_states, firings):
                await conn.execute(
                    table.delete().where(table.c.tenant_id == tenant_id, table.c.profile_id == profile_id)
                )

    # ---- profile merges ------------------------------------------------------------------------

    async def merge_people(
        self, conn: AsyncConnection, merges: Sequence[ProfileMerge], now: datetime
    ) -> None:
        """Apply profile merges in order, in the caller's transaction, under both profiles' locks.

        The merged-away id becomes an alias of the survivor (the survivor resolved through earlier
        merges); its timers and firings move to the survivor, so a firing already recorded under
        either id keeps deduplicating; the two states are combined and the pending timers settled
        by `plan_merge`, each trigger by its kind (absence: one pending reminder, the newest
        cart's). Redelivery finds nothing left under the merged-away id and changes nothing. When
        the survivor is already erased (the erasure overtook the merge), the merged-away profile is
        erased with it.
        """
        wanted = [m for m in merges if m.merged_profile_id != m.surviving_profile_id]
        involved = {(m.tenant_id, p) for m in wanted for p in (m.merged_profile_id, m.surviving_profile_id)}
        if not involved:
            return
        survivors = await surviving_ids(conn, merged_profiles, involved)
        locked = involved | {(tenant, s) for (tenant, _), s in survivors.items()}
        await self._lock_people(conn, sorted(locked))
        for m in wanted:
            await self._merge(conn, m, locked, now)

    async def _merge(
        self, conn: AsyncConnection, m: ProfileMerge, locked: set[Person], now: datetime
    ) -> None:
        tenant, gone = m.tenant_id, m.merged_profile_id
        found = await surviving_ids(conn, merged_profiles, [(tenant, m.surviving_profile_id)])
        survivor = found.get((tenant, m.surviving_profile_id), m.surviving_profile_id)
        if survivor == gone:
            return  # would make the id stand for itself (profile never merges back): nothing to move
        if (tenant, survivor) not in locked:
            raise MergedMeanwhile(f"profile {m.surviving_profile_id!r} was merged meanwhile")
        await record_alias(conn, merged_profiles, tenant, gone, survivor, m.merged_at)
        if await self._erased(conn, [(tenant, survivor)]):
            await self.purge_people(conn, [Erased(tenant, survivor, "", ())], now)
            return
        for table in (timers, firings):
            await timer_rows.move(conn, table, tenant, gone, survivor)
        states = await self._states(conn, [(tenant, survivor), (tenant, gone)])
        t = timers
        pending = (
            await conn.execute(
                sa.select(t.c.trigger_id, t.c.occurrence, t.c.started_at).where(
                    t.c.tenant_id == tenant, t.c.profile_id == survivor, PENDING
                )
            )
        ).all()
        involved = {trigger for _, trigger, _ in states} | {r.trigger_id for r in pending}
        plan = plan_merge(
            await self._condition_kinds(conn, tenant, involved),
            {trigger: st for (_, trigger, p), st in states.items() if p == survivor},
            {trigger: st for (_, trigger, p), st in states.items() if p == gone},
            [PendingTimer(r.trigger_id, r.occurrence, r.started_at) for r in pending],
            merged_profile_id=gone,
        )
        await conn.execute(
            trigger_states.delete().where(
                trigger_states.c.tenant_id == tenant, trigger_states.c.profile_id == gone
            )
        )
        await self._write_states(
            conn, {(tenant, trigger, survivor): st for trigger, st in plan.states.items()}, now
        )
        if plan.retire:
            await timer_rows.retire(conn, tenant, survivor, plan.retire, now)

    # ---- definitions ---------------------------------------------------------------------------

    async def create_trigger(self, tenant_id: str, requested: TriggerDef, now: datetime) -> TriggerDef:
        """Store a new trigger; the same definition again returns the stored one (AlreadyExists if not)."""
        kind = kind_named(requested.condition.kind)
        values = {
            "tenant_id": tenant_id,
            "trigger_id": requested.trigger_id,
            "display_name": requested.display_name,
            "condition_kind": kind.name,
            "condition": kind.to_json(requested.condition),
            "channel": requested.channel,
            "purpose": requested.purpose,
            "template_id": requested.template_id,
            "created_at": now,
        }
        async with self.engine.begin() as conn:
            for _ in range(3):
                inserted = (
                    await conn.execute(
                        pg_insert(triggers).values(values).on_conflict_do_nothing().returning(*triggers.c)
                    )
                ).first()
                if inserted is not None:
                    return _trigger_def(inserted)
                existing = await self._get(conn, tenant_id, requested.trigger_id)
                if existing is not None:
                    return resolve_create(existing, requested)
        raise RuntimeError("trigger kept appearing and disappearing while being created")

    async def _get(self, conn: AsyncConnection, tenant_id: str, trigger_id: str) -> TriggerDef | None:
        row = (
            await conn.execute(
                sa.select(triggers).where(
                    triggers.c.tenant_id == tenant_id, triggers.c.trigger_id == trigger_id
                )
            )
        ).first()
        return None if row is None else _trigger_def(row)

    async def get_trigger(self, tenant_id: str, trigger_id: str) -> TriggerDef:
        async with self.engine.connect() as conn:
            found = await self._get(conn, tenant_id, trigger_id)
        if found is None:
            raise NotFound(f"trigger {trigger_id!r} not found")
        return found

    async def list_triggers(self, tenant_id: str, after: str | None, limit: int) -> list[TriggerDef]:
        """Up to `limit` triggers in trigger_id order, starting after `after`."""
        query = sa.select(triggers).where(triggers.c.tenant_id == tenant_id)
        if after is not None:
            query = query.where(triggers.c.trigger_id > after)
        async with self.engine.connect() as conn:
            rows = (await conn.execute(query.order_by(triggers.c.trigger_id).limit(limit))).all()
        return [_trigger_def(r) for r in rows]

    async def delete_trigger(self, tenant_id: str, trigger_id: str, now: datetime) -> int:
        """Delete a trigger and cancel its pending timers; return how many were cancelled."""
        async with self.engine.begin() as conn:
            gone = (
                await conn.execute(
                    triggers.delete()
                    .where(triggers.c.tenant_id == tenant_id, triggers.c.trigger_id == trigger_id)
                    .returning(triggers.c.trigger_id)
                )
            ).first()
            if gone is None:
                raise NotFound(f"trigger {trigger_id!r} not found")
            cancelled = await conn.execute(
                timers.update()
                .where(
                    timers.c.tenant_id == tenant_id,
                    timers.c.trigger_id == trigger_id,
                    PENDING,
                )
                .values(status="cancelled", cancelled_at=now, reason="trigger deleted")
            )
            await conn.execute(
                trigger_states.delete().where(
                    trigger_states.c.tenant_id == tenant_id, trigger_states.c.trigger_id == trigger_id
                )
            )
        return int(cancelled.rowcount or 0)

    # ---- events --------------------------------------------------------------------------------

    async def apply_events(self, events: Sequence[EventFacts], now: datetime) -> Plan:
        """Decide and apply what a batch of events means, in one transaction; return the plan."""
        async with self.engine.begin() as conn:
            return await self.apply_events_in(conn, events, now)

    async def apply_events_in(
        self, conn: AsyncConnection, events: Sequence[EventFacts], now: datetime
    ) -> Plan:
        tenants = sorted({e.tenant_id for e in events})
        if not tenants:
            return Plan([], {})
        by_tenant = await self._active_triggers(conn, tenants)
        relevant = relevant_events(by_tenant, events)
        if not relevant:
            return Plan([], {})
        survivors = await surviving_ids(
            conn, merged_profiles, {(e.tenant_id, e.profile_id) for e in relevant}
        )
        if survivors:
            relevant = [
                replace(e, profile_id=survivors.get((e.tenant_id, e.profile_id), e.profile_id))
                for e in relevant
            ]
        people = sorted({(e.tenant_id, e.profile_id) for e in relevant})
        await self._lock_people(conn, people)
        if await surviving_ids(conn, merged_profiles, people):
            raise MergedMeanwhile("a profile of the batch was merged while its lock was awaited")
        erased = await self._erased(conn, people)
        if erased:
            relevant = [e for e in relevant if (e.tenant_id, e.profile_id) not in erased]
            people = [p for p in people if p not in erased]
            if not relevant:
                return Plan([], {})
        states = await self._states(conn, people)
        plan = plan_events(by_tenant, relevant, states)
        await self._apply(conn, plan, now)
        return plan

    async def _erased(self, conn: AsyncConnection, people: Sequence[tuple[str, str]]) -> set[tuple[str, str]]:
        rows = await conn.execute(
            sa.select(erased_profiles.c.tenant_id, erased_profiles.c.profile_id).where(
                sa.tuple_(erased_profiles.c.tenant_id, erased_profiles.c.profile_id).in_(list(people))
            )
        )
        return {(r.tenant_id, r.profile_id) for r in rows}

    async def _active_triggers(
        self, conn: AsyncConnection, tenants: Sequence[str]
    ) -> dict[str, list[TriggerDef]]:
        rows = (
            await conn.execute(
                sa.select(triggers)
                .where(triggers.c.tenant_id.in_(tenants))
                .order_by(triggers.c.tenant_id, triggers.c.trigger_id)
            )
        ).all()
        out: dict[str, list[TriggerDef]] = {}
        for r in rows:
            out.setdefault(r.tenant_id, []).append(_trigger_def(r))
        return out

    @staticmethod
    async def _condition_kinds(conn: AsyncConnection, tenant: str, trigger_ids: set[str]) -> dict[str, str]:
        """The condition kind of each of these triggers that still exists."""
        if not trigger_ids:
            return {}
        rows = await conn.execute(
            sa.select(triggers.c.trigger_id, triggers.c.condition_kind).where(
                triggers.c.tenant_id == tenant, triggers.c.trigger_id.in_(sorted(trigger_ids))
            )
        )
        return {r.trigger_id: r.condition_kind for r in rows}

    async def _lock_people(self, conn: AsyncConnection, people: Sequence[tuple[str, str]]) -> None:
        keys = sorted({lock_key32(t, p) for t, p in people})
        await conn.execute(
            sa.text(
                "SELECT pg_advisory_xact_lock(:ns, k) "
                "FROM unnest(CAST(:keys AS integer[])) WITH ORDINALITY AS u(k, i) ORDER BY i"
            ),
            {"ns": PROFILE_LOCK_NAMESPACE, "keys": keys},
        )

    async def _states(
        self, conn: AsyncConnection, people: Sequence[tuple[str, str]]
    ) -> dict[StateKey, TriggerState]:
        s = trigger_states
        rows = (
            await conn.execute(sa.select(s).where(sa.tuple_(s.c.tenant_id, s.c.profile_id).in_(list(people))))
        ).all()
        return {
            (r.tenant_id, r.trigger_id, r.profile_id): TriggerState(
                last_start_at=r.last_start_at,
                last_start_occurrence=r.last_start_occurrence,
                last_cancel_at=r.last_cancel_at,
            )
            for r in rows
        }

    async def _apply(self, conn: AsyncConnection, plan: Plan, now: datetime) -> None:
        """Write a plan. Inserts, then cancels, then supersedes: the domain never schedules a start
        that an earlier cancel covers, so this order gives the same result as applying in sequence."""
        schedules, cancels = plan.schedules, plan.cancels
        if schedules:
            await timer_rows.insert_timers(conn, schedules, now)
        if cancels:
            await timer_rows.cancel_timers(conn, cancels, now)
        if schedules:
            await timer_rows.supersede_timers(conn, schedules, now)
        await self._write_states(conn, plan.states, now)

    @staticmethod
    async def _write_states(
        conn: AsyncConnection, states: dict[StateKey, TriggerState], now: datetime
    ) -> None:
        if not states:
            return
        insert = pg_insert(trigger_states).values(
            [
                {
                    "tenant_id": tenant,
                    "trigger_id": trigger,
                    "profile_id": profile,
                    "last_start_at": st.last_start_at,
                    "last_start_occurrence": st.last_start_occurrence,
                    "last_cancel_at": st.last_cancel_at,
                    "updated_at": now,
                }
                for (tenant, trigger, profile), st in states.items()
            ]
        )
        await conn.execute(
            insert.on_conflict_do_update(
                index_elements=["tenant_id", "trigger_id", "profile_id"],
                set_={
                    "last_start_at": insert.excluded.last_start_at,
                    "last_start_occurrence": insert.excluded.last_start_occurrence,
                    "last_cancel_at": insert.excluded.last_cancel_at,
                    "updated_at": insert.excluded.updated_at,
                },
            )
        )

    # ---- timers --------------------------------------------------------------------------------

    async def fire_due(self, now: datetime, limit: int, message_for: MessageFor) -> FireResult:
        """Claim up to `limit` due timers, fire them and write their requests to the outbox, atomically."""
        async with self.engine.begin() as conn:
            due = await timer_rows.claim_due(conn, now, limit)
            if not due:
                return FireResult(0, 0)
            decided = [(d, fire(d)) for d in due]
            to_fire = [f for _, f in decided if f is not None]
            orphans = [d for d, f in decided if f is None]
            new: list[Firing] = []
            if to_fire:
                new = await timer_rows.record_firings(conn, to_fire, now)
                await timer_rows.set_timers(
                    conn, [timer_rows.timer_key(f) for f in to_fire], status="fired", fired_at=now
                )
            if orphans:
                await timer_rows.set_timers(
                    conn,
                    [timer_rows.timer_key(d) for d in orphans],
                    status="cancelled",
                    cancelled_at=now,
                    reason="trigger deleted",
                )
            await enqueue(conn, outbox, [message_for(f, now) for f in new], now)
        return FireResult(len(due), len(new))
