"""Tables and queries of the trigger service (SQLAlchemy Core on asyncpg).

The store applies what the domain decides: `apply_events` loads the definitions
and per-profile state a batch of events needs, asks `plan_events` what the
events mean, and writes timers, cancellations and state in the caller's single
transaction; `fire_due` claims due timers with `FOR UPDATE SKIP LOCKED` and
writes their delivery requests to the outbox in the same transaction;
`merge_people` re-points a merged-away profile's timers, state and firings to the
surviving profile and remembers the alias, so the person's later events — under
either id — find one state.

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

import hashlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from datetime import datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from relevans.kit.erasure import Erased
from relevans.kit.errors import NotFound
from relevans.kit.merges import (
    Person,
    ProfileMerge,
    forget_aliases,
    merged_profiles_table,
    record_alias,
    surviving_ids,
)
from relevans.kit.outbox import OutboxMessage, enqueue, outbox_table
from services.trigger.domain import (
    Absence,
    DueTimer,
    EventFacts,
    Firing,
    PendingTimer,
    Plan,
    StateKey,
    TriggerDef,
    TriggerState,
    fire,
    plan_events,
    plan_merge,
    relevant_events,
    resolve_create,
)

TZ = sa.DateTime(timezone=True)
TIMER_STATUSES = ("pending", "fired", "cancelled", "superseded")
# First key of the two-key advisory locks this service takes per (tenant, profile).
PROFILE_LOCK_NAMESPACE = 0x52565447  # "RVTG"

metadata = sa.MetaData()

triggers = sa.Table(
    "triggers",
    metadata,
    sa.Column("tenant_id", sa.Text, primary_key=True),
    sa.Column("trigger_id", sa.Text, primary_key=True),
    sa.Column("display_name", sa.Text, nullable=False),
    sa.Column("start_event_type", sa.Text, nullable=False),
    sa.Column("cancel_event_type", sa.Text, nullable=False),
    sa.Column("delay", sa.Interval, nullable=False),
    sa.Column("channel", sa.Text, nullable=False),
    sa.Column("purpose", sa.Text, nullable=False),
    sa.Column("template_id", sa.Text, nullable=False),
    sa.Column("created_at", TZ, nullable=False),
)

timers = sa.Table(
    "timers",
    metadata,
    sa.Column("tenant_id", sa.Text, primary_key=True),
    sa.Column("trigger_id", sa.Text, primary_key=True),
    sa.Column("profile_id", sa.Text, primary_key=True),
    # The start event's id: one timer per (trigger, profile, occurrence).
    sa.Column("occurrence", sa.Text, primary_key=True),
    sa.Column("started_at", TZ, nullable=False),
    sa.Column("due_at", TZ, nullable=False),
    sa.Column("status", sa.Text, nullable=False),
    sa.Column("variables", JSONB, nullable=False),
    sa.Column("created_at", TZ, nullable=False),
    sa.Column("fired_at", TZ),
    sa.Column("cancelled_at", TZ),
    sa.Column("reason", sa.Text),
    sa.CheckConstraint("status IN ('pending', 'fired', 'cancelled', 'superseded')", name="timers_status"),
    sa.Index("timers_due", "due_at", postgresql_where=sa.text("status = 'pending'")),
    sa.Index(
        "timers_pending_profile",
        "tenant_id",
        "profile_id",
        "trigger_id",
        postgresql_where=sa.text("status = 'pending'"),
    ),
    # A person's timers of every status, which a merge moves and an erasure deletes (migration 0005).
    sa.Index("timers_profile", "tenant_id", "profile_id"),
)

# `status = 'pending'` written as a literal, not sent as a parameter: the partial indexes of pending
# timers serve a statement only when its plan knows the status without its parameters, and a
# statement run often gets a generic plan (measured with 1.5 million timers: the due-timer claim
# planned generically read the whole table, 463 ms, instead of `timers_due`).
PENDING = timers.c.status == sa.literal_column("'pending'")

trigger_states = sa.Table(
    "trigger_states",
    metadata,
    sa.Column("tenant_id", sa.Text, primary_key=True),
    sa.Column("trigger_id", sa.Text, primary_key=True),
    sa.Column("profile_id", sa.Text, primary_key=True),
    sa.Column("last_start_at", TZ),
    sa.Column("last_start_occurrence", sa.Text),
    sa.Column("last_cancel_at", TZ),
    sa.Column("updated_at", TZ, nullable=False),
    sa.Index("trigger_states_profile", "tenant_id", "profile_id"),
)

firings = sa.Table(
    "firings",
    metadata,
    sa.Column("tenant_id", sa.Text, primary_key=True),
    sa.Column("trigger_id", sa.Text, primary_key=True),
    sa.Column("profile_id", sa.Text, primary_key=True),
    sa.Column("occurrence", sa.Text, primary_key=True),
    sa.Column("idempotency_key", sa.Text, nullable=False),
    sa.Column("fired_at", TZ, nullable=False),
    # A person's firings, which a merge moves and an erasure deletes (migration 0005).
    sa.Index("firings_profile", "tenant_id", "profile_id"),
)

# GDPR: erased people (a random profile id, nothing personal); an event of theirs that arrives
# after the erasure (the event stream and the erasure stream are consumed independently) is ignored.
erased_profiles = sa.Table(
    "erased_profiles",
    metadata,
    sa.Column("tenant_id", sa.Text, primary_key=True),
    sa.Column("profile_id", sa.Text, primary_key=True),
    sa.Column("erased_at", TZ, nullable=False),
)

merged_profiles = merged_profiles_table(metadata)

outbox = outbox_table(metadata)

# The key of timers and firings: one per (tenant, trigger, profile, occurrence).
TIMER_KEY = ["tenant_id", "trigger_id", "profile_id", "occurrence"]

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
        absence=Absence(row.start_event_type, row.cancel_event_type, row.delay),
        channel=row.channel,
        purpose=row.purpose,
        template_id=row.template_id,
        created_at=row.created_at,
    )


def profile_lock_key(tenant_id: str, profile_id: str) -> int:
    """A stable signed 32-bit key for the advisory lock of one person."""
    digest = hashlib.blake2b(f"{tenant_id}/{profile_id}".encode(), digest_size=4).digest()
    return int.from_bytes(digest, "big", signed=True)


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
        by `plan_merge` (one pending reminder per trigger: the newest cart's). Redelivery finds
        nothing left under the merged-away id and changes nothing. When the survivor is already
        erased (the erasure overtook the merge), the merged-away profile is erased with it.
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
            await self._move(conn, table, tenant, gone, survivor)
        states = await self._states(conn, [(tenant, survivor), (tenant, gone)])
        t = timers
        pending = (
            await conn.execute(
                sa.select(t.c.trigger_id, t.c.occurrence, t.c.started_at).where(
                    t.c.tenant_id == tenant, t.c.profile_id == survivor, PENDING
                )
            )
        ).all()
        plan = plan_merge(
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
            await conn.execute(
                t.update()
                .where(
                    t.c.tenant_id == tenant,
                    t.c.profile_id == survivor,
                    t.c.trigger_id == sa.bindparam("b_trigger"),
                    t.c.occurrence == sa.bindparam("b_occurrence"),
                    PENDING,
                )
                .values(
                    status=sa.bindparam("b_status"),
                    cancelled_at=now,
                    reason=sa.bindparam("b_reason"),
                ),
                [
                    {
                        "b_trigger": r.trigger_id,
                        "b_occurrence": r.occurrence,
                        "b_status": r.status,
                        "b_reason": r.reason,
                    }
                    for r in plan.retire
                ],
            )

    @staticmethod
    async def _move(conn: AsyncConnection, table: sa.Table, tenant: str, gone: str, survivor: str) -> None:
        """Re-point a timers-keyed table's rows (an UPDATE, so a row a timer worker holds is waited
        for and moved as it committed); a row whose key the survivor already has is dropped."""
        theirs = table.alias("theirs")
        await conn.execute(
            table.update()
            .where(
                table.c.tenant_id == tenant,
                table.c.profile_id == gone,
                ~sa.exists().where(
                    theirs.c.tenant_id == tenant,
                    theirs.c.profile_id == survivor,
                    theirs.c.trigger_id == table.c.trigger_id,
                    theirs.c.occurrence == table.c.occurrence,
                ),
            )
            .values(profile_id=survivor)
        )
        await conn.execute(table.delete().where(table.c.tenant_id == tenant, table.c.profile_id == gone))

    # ---- definitions ---------------------------------------------------------------------------

    async def create_trigger(self, tenant_id: str, requested: TriggerDef, now: datetime) -> TriggerDef:
        """Store a new trigger; the same definition again returns the stored one (AlreadyExists if not)."""
        a = requested.absence
        values = {
            "tenant_id": tenant_id,
            "trigger_id": requested.trigger_id,
            "display_name": requested.display_name,
            "start_event_type": a.start_event_type,
            "cancel_event_type": a.cancel_event_type,
            "delay": a.delay,
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

    async def _lock_people(self, conn: AsyncConnection, people: Sequence[tuple[str, str]]) -> None:
        keys = sorted({profile_lock_key(t, p) for t, p in people})
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
        t = timers
        schedules = plan.schedules
        if schedules:
            await conn.execute(
                pg_insert(t)
                .values(
                    [
                        {
                            "tenant_id": i.tenant_id,
                            "trigger_id": i.trigger_id,
                            "profile_id": i.profile_id,
                            "occurrence": i.occurrence,
                            "started_at": i.started_at,
                            "due_at": i.due_at,
                            "status": "pending",
                            "variables": i.variables,
                            "created_at": now,
                        }
                        for i in schedules
                    ]
                )
                .on_conflict_do_nothing(index_elements=TIMER_KEY)
            )
        cancels = plan.cancels
        if cancels:
            await conn.execute(
                t.update()
                .where(
                    t.c.tenant_id == sa.bindparam("b_tenant"),
                    t.c.trigger_id == sa.bindparam("b_trigger"),
                    t.c.profile_id == sa.bindparam("b_profile"),
                    PENDING,
                    t.c.started_at <= sa.bindparam("b_until", type_=TZ),
                )
                .values(
                    status="cancelled",
                    cancelled_at=sa.bindparam("b_now", type_=TZ),
                    reason=sa.bindparam("b_reason"),
                ),
                [
                    {
                        "b_tenant": c.tenant_id,
                        "b_trigger": c.trigger_id,
                        "b_profile": c.profile_id,
                        "b_until": c.until,
                        "b_now": now,
                        "b_reason": c.reason,
                    }
                    for c in cancels
                ],
            )
        if schedules:
            await conn.execute(
                t.update()
                .where(
                    t.c.tenant_id == sa.bindparam("b_tenant"),
                    t.c.trigger_id == sa.bindparam("b_trigger"),
                    t.c.profile_id == sa.bindparam("b_profile"),
                    PENDING,
                    sa.tuple_(t.c.started_at, t.c.occurrence)
                    < sa.tuple_(sa.bindparam("b_started", type_=TZ), sa.bindparam("b_occurrence")),
                )
                .values(
                    status="superseded",
                    cancelled_at=sa.bindparam("b_now", type_=TZ),
                    reason=sa.bindparam("b_reason"),
                ),
                [
                    {
                        "b_tenant": i.tenant_id,
                        "b_trigger": i.trigger_id,
                        "b_profile": i.profile_id,
                        "b_started": i.started_at,
                        "b_occurrence": i.occurrence,
                        "b_now": now,
                        "b_reason": f"superseded by {i.occurrence}",
                    }
                    for i in schedules
                ],
            )
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
        t, tr = timers, triggers
        claim = (
            sa.select(
                t.c.tenant_id,
                t.c.trigger_id,
                t.c.profile_id,
                t.c.occurrence,
                t.c.variables,
                tr.c.channel,
                tr.c.purpose,
                tr.c.template_id,
            )
            .select_from(
                t.outerjoin(tr, sa.and_(tr.c.tenant_id == t.c.tenant_id, tr.c.trigger_id == t.c.trigger_id))
            )
            .where(PENDING, t.c.due_at <= now)
            .order_by(t.c.due_at)
            .limit(limit)
            .with_for_update(skip_locked=True, of=t)
        )
        async with self.engine.begin() as conn:
            rows = (await conn.execute(claim)).all()
            if not rows:
                return FireResult(0, 0)
            due = [
                DueTimer(
                    tenant_id=r.tenant_id,
                    trigger_id=r.trigger_id,
                    profile_id=r.profile_id,
                    occurrence=r.occurrence,
                    variables=r.variables,
                    channel=r.channel,
                    purpose=r.purpose,
                    template_id=r.template_id,
                )
                for r in rows
            ]
            decided = [(d, fire(d)) for d in due]
            to_fire = [f for _, f in decided if f is not None]
            orphans = [d for d, f in decided if f is None]
            new: list[Firing] = []
            if to_fire:
                inserted = (
                    await conn.execute(
                        pg_insert(firings)
                        .values(
                            [
                                {
                                    "tenant_id": f.tenant_id,
                                    "trigger_id": f.trigger_id,
                                    "profile_id": f.profile_id,
                                    "occurrence": f.occurrence,
                                    "idempotency_key": f.idempotency_key,
                                    "fired_at": now,
                                }
                                for f in to_fire
                            ]
                        )
                        .on_conflict_do_nothing()
                        .returning(*(firings.c[k] for k in TIMER_KEY))
                    )
                ).all()
                fresh = {tuple(r) for r in inserted}
                new = [f for f in to_fire if (f.tenant_id, f.trigger_id, f.profile_id, f.occurrence) in fresh]
                await conn.execute(
                    t.update()
                    .where(
                        sa.tuple_(t.c.tenant_id, t.c.trigger_id, t.c.profile_id, t.c.occurrence).in_(
                            [(f.tenant_id, f.trigger_id, f.profile_id, f.occurrence) for f in to_fire]
                        )
                    )
                    .values(status="fired", fired_at=now)
                )
            if orphans:
                await conn.execute(
                    t.update()
                    .where(
                        sa.tuple_(t.c.tenant_id, t.c.trigger_id, t.c.profile_id, t.c.occurrence).in_(
                            [(d.tenant_id, d.trigger_id, d.profile_id, d.occurrence) for d in orphans]
                        )
                    )
                    .values(status="cancelled", cancelled_at=now, reason="trigger deleted")
                )
            await enqueue(conn, outbox, [message_for(f, now) for f in new], now)
        return FireResult(len(rows), len(new))
