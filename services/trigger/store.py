"""The trigger service's transactions (SQLAlchemy Core on asyncpg; tables in `tables`).

The store applies what the domain decides: `apply_facts` loads the definitions, per-person
state and tenant policies a batch of facts (events, segment and trait changes) needs, asks
`plan_facts` what they mean, and writes timers, cancellations, state and the decision trace in
the caller's single transaction; `fire_due` decides due timers person by person by the policies
(`fire_rows`) and writes their delivery requests to the outbox in the same transaction;
`merge_people` re-points a merged-away profile's timers, state, firings and trace to the
surviving profile and remembers the alias, so the person's later facts — under either id —
find one state.

A trigger's condition is stored as its kind's name and the kind's JSON (`triggers.condition_kind`,
`triggers.condition`), its state as the kind's JSON (`trigger_states.state`), its policy as
`domain.policies` writes it (`triggers.policy`); all read and written through the kinds registry.

Concurrency: a batch takes a transaction-scoped advisory lock per (tenant, profile) it touches,
in a fixed order, before reading state, so two service instances never interleave one person's
facts; the timer worker takes the same locks (without waiting: a busy person waits for the next
round), so one person's due messages and cap counts are decided by one transaction at a time. The
`firings` table keys each firing by (tenant, trigger, profile, occurrence): whatever happens, a
firing writes its delivery request once. A merge takes the locks of both profiles; a batch
resolves merged-away ids to their survivors before locking and re-checks after, so no fact lands
on an id a merge just retired.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from datetime import datetime

import sqlalchemy as sa
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from relevans.kit.db import DriverStatement, fetch_on_driver, json_value
from relevans.kit.erasure import Erased
from relevans.kit.errors import NotFound
from relevans.kit.locks import lock_key32
from relevans.kit.merges import Person, ProfileMerge, forget_aliases, record_alias, surviving_ids
from services.trigger import fire_rows, person_rows, state_rows, timer_rows, trace, withdrawals
from services.trigger.definitions import TRIGGER_COLUMNS, context, trigger_def
from services.trigger.domain import (
    Fact,
    PendingTimer,
    Plan,
    TriggerDef,
    plan_facts,
    plan_merge,
    relevant_facts,
    resolve_create,
)
from services.trigger.domain.events import TraitChange
from services.trigger.domain.kinds import kind_named
from services.trigger.domain.policies import (
    TenantPolicy,
    tenant_policy_from_json,
    tenant_policy_to_json,
    trigger_policy_to_json,
)
from services.trigger.tables import (
    PENDING,
    decisions,
    erased_profiles,
    firings,
    merged_profiles,
    people,
    policies,
    timers,
    trigger_states,
    triggers,
)

# Through SQLAlchemy: the first statement of a batch's transaction begins it (on the driver, a
# statement of its own would have to begin it first).
_ACTIVE_TRIGGERS = sa.text(
    f"SELECT {TRIGGER_COLUMNS} FROM triggers tr WHERE tr.tenant_id = ANY(CAST(:tenants AS text[])) "
    "ORDER BY tr.tenant_id, tr.trigger_id"
)
_POLICIES = DriverStatement(
    "SELECT tenant_id, policy, updated_at FROM policies WHERE tenant_id = ANY(CAST(:tenants AS text[]))"
)


# People armed per statement batch when a trigger keyed on a trait is created.
ARM_BATCH = 5_000

# First key of the two-key advisory locks this service takes per (tenant, profile).
PROFILE_LOCK_NAMESPACE = 0x52565447  # "RVTG"

MessageFor = fire_rows.MessageFor


class MergedMeanwhile(Exception):
    """A profile was merged away while this transaction waited for its lock; the bus retries it."""


@dataclass(frozen=True, slots=True)
class FireResult:
    claimed: int
    fired: int


class TriggerStore:
    """`engine` for definitions, policies, merges, erasures and the trace's reads; `hot_engine` (see
    `create_engine`'s `lookups_only` and `plan_each_run`) for the hot path — a batch of facts and a
    timer round — whose every statement finds its rows by key: a plan made once while a table was
    small (a new database under load, before PostgreSQL's first analyze of it) read the whole
    table for every batch (the timer round's firings, a hash join over a sequential scan)."""

    def __init__(self, engine: AsyncEngine, hot_engine: AsyncEngine | None = None) -> None:
        self.engine = engine
        self.hot_engine = hot_engine or engine
        # The condition-false entries this process wrote lately (`trace.CollapsedNotes`).
        self.collapsed = trace.CollapsedNotes()

    # ---- GDPR ---------------------------------------------------------------------------------

    async def purge_people(self, conn: AsyncConnection, erased: Sequence[Erased], now: datetime) -> None:
        """Delete the timers, trigger states, firings, decision trace and known traits of erased
        people and of the ids merged into them (in the caller's transaction), under their advisory
        locks so no fact of theirs is applied meanwhile."""
        persons = sorted({(e.tenant_id, e.profile_id) for e in erased})
        await self._lock_people(conn, persons)
        await conn.execute(
            pg_insert(erased_profiles)
            .values([{"tenant_id": t, "profile_id": p, "erased_at": now} for t, p in persons])
            .on_conflict_do_nothing()
        )
        # The ids merged into an erased person are erased with them, and the links between ids go.
        merged_ids = await forget_aliases(conn, merged_profiles, persons)
        if merged_ids:
            await conn.execute(
                pg_insert(erased_profiles)
                .values([{"tenant_id": t, "profile_id": p, "erased_at": now} for t, p in merged_ids])
                .on_conflict_do_nothing()
            )
        for tenant_id, profile_id in sorted({*persons, *merged_ids}):
            for table in (timers, trigger_states, firings, decisions, people):
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
        await trace.move(conn, tenant, gone, survivor)
        await conn.execute(people.delete().where(people.c.tenant_id == tenant, people.c.profile_id == gone))
        kinds = await self._condition_kinds(conn, tenant, None)
        states = await state_rows.read_states(conn, [(tenant, survivor), (tenant, gone)], {tenant: kinds})
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
            {t: k for t, k in kinds.items() if t in involved},
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
        await state_rows.write_states(
            conn,
            {(tenant, trigger, survivor): st for trigger, st in plan.states.items()},
            {tenant: kinds},
            now,
        )
        if plan.retire:
            await timer_rows.retire(conn, tenant, survivor, plan.retire, now)

    # ---- definitions ---------------------------------------------------------------------------

    async def create_trigger(self, tenant_id: str, requested: TriggerDef, now: datetime) -> TriggerDef:
        """Store a new trigger; the same definition again returns the stored one (AlreadyExists if not).

        A kind that keys its timers on a trait (a date) is armed in the same transaction for every
        person whose traits the service knows: their timers exist as the trigger does."""
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
            "policy": trigger_policy_to_json(requested.policy),
        }
        async with self.engine.begin() as conn:
            for _ in range(3):
                inserted = (
                    await conn.execute(
                        pg_insert(triggers).values(values).on_conflict_do_nothing().returning(*triggers.c)
                    )
                ).first()
                if inserted is not None:
                    created = trigger_def(inserted._mapping)
                    await self._arm(conn, tenant_id, created, now)
                    return created
                existing = await self._get(conn, tenant_id, requested.trigger_id)
                if existing is not None:
                    return resolve_create(existing, requested)
        raise RuntimeError("trigger kept appearing and disappearing while being created")

    async def _arm(self, conn: AsyncConnection, tenant_id: str, trigger: TriggerDef, now: datetime) -> None:
        """Decide a new trigger's `arming_trait` for every known person who has it, as if it had
        just been set (the trigger is not visible to other transactions yet: no person lock needed)."""
        kind = kind_named(trigger.condition.kind)
        trait = kind.arming_trait(trigger.condition)
        if trait is None:
            return
        ctx = context((await self._policies(conn, [tenant_id])).get(tenant_id, TenantPolicy()), now)
        known = await person_rows.with_trait(conn, tenant_id, trait)
        for start in range(0, len(known), ARM_BATCH):
            facts: list[Fact] = [
                TraitChange(
                    tenant_id=tenant_id,
                    profile_id=profile_id,
                    change_id=f"created:{trigger.trigger_id}",
                    name=trait,
                    before=None,
                    after=traits[trait],
                    traits=traits,
                    occurred_at=now,
                )
                for profile_id, traits in known[start : start + ARM_BATCH]
            ]
            plan = plan_facts({tenant_id: [trigger]}, facts, {}, {tenant_id: ctx})
            await self._apply(conn, plan, {tenant_id: {trigger.trigger_id: kind.name}}, now)

    async def _get(self, conn: AsyncConnection, tenant_id: str, trigger_id: str) -> TriggerDef | None:
        row = (
            await conn.execute(
                sa.select(triggers).where(
                    triggers.c.tenant_id == tenant_id, triggers.c.trigger_id == trigger_id
                )
            )
        ).first()
        return None if row is None else trigger_def(row._mapping)

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
        return [trigger_def(r._mapping) for r in rows]

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

    # ---- policies ------------------------------------------------------------------------------

    async def get_policy(self, tenant_id: str) -> TenantPolicy:
        async with self.engine.connect() as conn:
            return (await self._policies(conn, [tenant_id])).get(tenant_id, TenantPolicy())

    async def set_policy(self, tenant_id: str, policy: TenantPolicy, now: datetime) -> TenantPolicy:
        insert = pg_insert(policies).values(
            tenant_id=tenant_id, policy=tenant_policy_to_json(policy), updated_at=now
        )
        async with self.engine.begin() as conn:
            await conn.execute(
                insert.on_conflict_do_update(
                    index_elements=["tenant_id"],
                    set_={"policy": insert.excluded.policy, "updated_at": insert.excluded.updated_at},
                )
            )
        return replace(policy, updated_at=now)

    @staticmethod
    async def _policies(conn: AsyncConnection, tenants: Sequence[str]) -> dict[str, TenantPolicy]:
        rows = await fetch_on_driver(conn, _POLICIES, {"tenants": list(tenants)})
        return {
            r["tenant_id"]: replace(
                tenant_policy_from_json(json_value(r["policy"])), updated_at=r["updated_at"]
            )
            for r in rows
        }

    # ---- facts: events, segment and trait changes ------------------------------------------------

    async def apply_facts(self, facts: Sequence[Fact], now: datetime) -> Plan:
        """Decide and apply what a batch of facts means, in one transaction; return the plan."""
        committed: list[Callable[[], None]] = []
        async with self.hot_engine.begin() as conn:
            plan = await self.apply_facts_in(conn, facts, now, committed)
        for done in committed:
            done()
        return plan

    async def apply_facts_in(
        self, conn: AsyncConnection, facts: Sequence[Fact], now: datetime, committed: list[Callable[[], None]]
    ) -> Plan:
        """`apply_facts` in the caller's transaction; `committed` gets what to do once it commits."""
        tenants = sorted({f.tenant_id for f in facts})
        if not tenants:
            return Plan([], {}, [])
        by_tenant = await self._active_triggers(conn, tenants)
        if not by_tenant:
            return Plan([], {}, [])
        tenant_policies = await self._policies(conn, tenants)
        contexts = {t: context(tenant_policies.get(t, TenantPolicy()), now) for t in tenants}
        relevant = relevant_facts(by_tenant, facts, contexts)
        if not relevant:
            return Plan([], {}, [])
        survivors = await surviving_ids(
            conn, merged_profiles, {(f.tenant_id, f.profile_id) for f in relevant}
        )
        if survivors:
            relevant = [
                replace(f, profile_id=survivors.get((f.tenant_id, f.profile_id), f.profile_id))
                for f in relevant
            ]
        persons = sorted({(f.tenant_id, f.profile_id) for f in relevant})
        await self._lock_people(conn, persons)
        gone = await fetch_on_driver(conn, state_rows.GONE, state_rows.persons_params(persons))
        if any(r["merged"] for r in gone):
            raise MergedMeanwhile("a profile of the batch was merged while its lock was awaited")
        if gone:
            erased = {(r["tenant_id"], r["profile_id"]) for r in gone}
            relevant = [f for f in relevant if (f.tenant_id, f.profile_id) not in erased]
            persons = [p for p in persons if p not in erased]
            if not relevant:
                return Plan([], {}, [])
        kinds = {t: {d.trigger_id: d.condition.kind for d in ds} for t, ds in by_tenant.items()}
        states = await state_rows.read_states(conn, persons, kinds)
        plan = plan_facts(by_tenant, relevant, states, contexts)
        committed.append(await self._apply(conn, plan, kinds, now))
        return plan

    async def apply_profile_changes(self, changes: person_rows.ProfileChanges, now: datetime) -> Plan:
        """Remember people's traits and consents and decide what segment and trait changes mean,
        in one transaction (erased people are neither remembered nor decided)."""
        committed: list[Callable[[], None]] = []
        async with self.hot_engine.begin() as conn:
            remembered: list[person_rows.KnownTraits | person_rows.KnownConsent] = [
                *changes.traits,
                *changes.consents,
            ]
            persons = {(c.tenant_id, c.profile_id) for c in remembered}
            survivor = await surviving_ids(conn, merged_profiles, persons) if persons else {}

            def person(c: person_rows.KnownTraits | person_rows.KnownConsent) -> tuple[str, str]:
                return (c.tenant_id, survivor.get((c.tenant_id, c.profile_id), c.profile_id))

            erased = await self._erased(conn, sorted({person(c) for c in remembered})) if persons else set()
            kept = person_rows.ProfileChanges(
                [t for t in changes.traits if person(t) not in erased],
                [c for c in changes.consents if person(c) not in erased],
                changes.facts,
            )
            await person_rows.remember(conn, kept, survivor)
            plan = await self.apply_facts_in(conn, changes.facts, now, committed)
        for done in committed:
            done()
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
        rows = await conn.execute(_ACTIVE_TRIGGERS, {"tenants": list(tenants)})
        out: dict[str, list[TriggerDef]] = {}
        for r in rows:
            out.setdefault(r.tenant_id, []).append(trigger_def(r._mapping))
        return out

    @staticmethod
    async def _condition_kinds(
        conn: AsyncConnection, tenant: str, trigger_ids: set[str] | None
    ) -> dict[str, str]:
        """The condition kind of each of these triggers (None: all of the tenant's) that still exists."""
        query = sa.select(triggers.c.trigger_id, triggers.c.condition_kind).where(
            triggers.c.tenant_id == tenant
        )
        if trigger_ids is not None:
            query = query.where(triggers.c.trigger_id.in_(sorted(trigger_ids)))
        return {r.trigger_id: r.condition_kind for r in await conn.execute(query)}

    async def _lock_people(self, conn: AsyncConnection, people: Sequence[tuple[str, str]]) -> None:
        keys = sorted({lock_key32(t, p) for t, p in people})
        await conn.execute(
            sa.text(
                "SELECT pg_advisory_xact_lock(:ns, k) "
                "FROM unnest(CAST(:keys AS integer[])) WITH ORDINALITY AS u(k, i) ORDER BY i"
            ),
            {"ns": PROFILE_LOCK_NAMESPACE, "keys": keys},
        )

    async def _apply(
        self, conn: AsyncConnection, plan: Plan, kinds: Mapping[str, Mapping[str, str]], now: datetime
    ) -> Callable[[], None]:
        """Write a plan; return what to do once its transaction commits. Inserts, then cancels,
        then supersedes: the domain never schedules a start that an earlier cancel covers, so this
        order gives the same result as applying in sequence."""
        schedules, cancels = plan.schedules, plan.cancels
        if schedules:
            await timer_rows.insert_timers(conn, schedules, now)
        if cancels:
            await timer_rows.cancel_timers(conn, cancels, now)
        if schedules:
            await timer_rows.supersede_timers(conn, schedules, now)
        await withdrawals.withdraw(conn, plan.withdrawals, now)
        await state_rows.write_states(conn, plan.states, kinds, now)
        return await trace.record(conn, plan.notes, collapsed=self.collapsed)

    # ---- timers --------------------------------------------------------------------------------

    async def fire_due(self, now: datetime, limit: int, message_for: MessageFor) -> FireResult:
        """Decide up to about `limit` due timers person by person and write what was decided, atomically
        (`fire_rows`); delivery requests go to the outbox in the same transaction."""
        async with self.hot_engine.begin() as conn:
            persons = await fire_rows.claim_people(conn, now, limit, PROFILE_LOCK_NAMESPACE)
            if not persons:
                return FireResult(0, 0)
            due = await fire_rows.due_timers(conn, persons, now, trigger_def)
            tenant_policies = await self._policies(conn, sorted({t for t, _ in persons}))
            decided, handed = await fire_rows.settle(conn, persons, due, tenant_policies, now, message_for)
        return FireResult(decided, handed)

    # ---- the decision trace ----------------------------------------------------------------------

    async def explain(
        self,
        tenant_id: str,
        profile_id: str,
        trigger_id: str | None,
        after: tuple[datetime, int] | None,
        limit: int,
    ) -> list[trace.DecisionRow]:
        """The decisions about a person (under this id, the id it was merged into, and the ids merged
        into that one), newest first."""
        async with self.engine.connect() as conn:
            found = await surviving_ids(conn, merged_profiles, [(tenant_id, profile_id)])
            person = found.get((tenant_id, profile_id), profile_id)
            m = merged_profiles
            aliases = await conn.execute(
                sa.select(m.c.profile_id).where(
                    m.c.tenant_id == tenant_id, m.c.surviving_profile_id == person
                )
            )
            ids = sorted({person, profile_id, *(r.profile_id for r in aliases)})
            return await trace.explain(conn, tenant_id, ids, trigger_id, after, limit)

    async def record_delivery(self, outcomes: Sequence[trace.DeliveryOutcome]) -> None:
        async with self.engine.begin() as conn:
            erased = await self._erased(conn, sorted({(o.tenant_id, o.profile_id) for o in outcomes}))
            await trace.record_delivery(
                conn, [o for o in outcomes if (o.tenant_id, o.profile_id) not in erased]
            )

    async def prune_decisions(self, before: datetime, limit: int = 10_000) -> int:
        async with self.engine.begin() as conn:
            return await trace.prune(conn, before, limit)
