"""The statements over timers and firings that the store composes into its transactions.

Each runs in the caller's transaction and does one thing to many rows at once (one
statement per batch, not per timer). `PENDING` (see `tables`) keeps the partial
indexes of pending timers usable in every plan.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.ext.asyncio import AsyncConnection

from services.trigger.domain import CancelTimers, DueTimer, Firing, RetireTimer, ScheduleTimer
from services.trigger.tables import PENDING, TIMER_KEY, TZ, firings, timers, triggers

# (tenant_id, trigger_id, profile_id, occurrence): one timer, one firing.
TimerKey = tuple[str, str, str, str]


def timer_key(t: Firing | DueTimer) -> TimerKey:
    return (t.tenant_id, t.trigger_id, t.profile_id, t.occurrence)


async def insert_timers(conn: AsyncConnection, schedules: Sequence[ScheduleTimer], now: datetime) -> None:
    """A pending timer per schedule; one already there (a redelivered start) stays as it is."""
    await conn.execute(
        pg_insert(timers)
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


async def cancel_timers(conn: AsyncConnection, cancels: Sequence[CancelTimers], now: datetime) -> None:
    t = timers
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


async def supersede_timers(conn: AsyncConnection, schedules: Sequence[ScheduleTimer], now: datetime) -> None:
    """Each schedule supersedes its profile's older pending timers of the same trigger."""
    t = timers
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


async def retire(
    conn: AsyncConnection, tenant: str, profile: str, retire: Sequence[RetireTimer], now: datetime
) -> None:
    t = timers
    await conn.execute(
        t.update()
        .where(
            t.c.tenant_id == tenant,
            t.c.profile_id == profile,
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
            for r in retire
        ],
    )


async def move(conn: AsyncConnection, table: sa.Table, tenant: str, gone: str, survivor: str) -> None:
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


async def claim_due(conn: AsyncConnection, now: datetime, limit: int) -> list[DueTimer]:
    """Lock up to `limit` due pending timers (skipping those another worker holds), oldest first,
    each with its trigger's sending fields (None when the trigger is gone)."""
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
    return [
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
        for r in await conn.execute(claim)
    ]


async def record_firings(conn: AsyncConnection, to_fire: Sequence[Firing], now: datetime) -> list[Firing]:
    """Record the firings; return those not recorded before (only they are sent)."""
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
    return [f for f in to_fire if timer_key(f) in fresh]


async def set_timers(conn: AsyncConnection, keys: list[TimerKey], **values: Any) -> None:
    t = timers
    await conn.execute(
        t.update()
        .where(sa.tuple_(t.c.tenant_id, t.c.trigger_id, t.c.profile_id, t.c.occurrence).in_(keys))
        .values(**values)
    )
