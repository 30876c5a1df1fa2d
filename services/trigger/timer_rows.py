"""The statements over timers and firings that the store composes into its transactions.

Each runs in the caller's transaction and does one thing to many rows at once (one
statement per batch, not per timer). `PENDING` (see `tables`) keeps the partial
indexes of pending timers usable in every plan.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from datetime import datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.ext.asyncio import AsyncConnection

from services.trigger.domain import CancelTimers, RetireTimer, ScheduleTimer
from services.trigger.domain.firing import DueTimer, Firing
from services.trigger.tables import PENDING, TIMER_KEY, TZ, timers

# (tenant_id, trigger_id, profile_id, occurrence): one timer, one firing.
TimerKey = tuple[str, str, str, str]


def timer_key(t: Firing | DueTimer) -> TimerKey:
    return (t.tenant_id, t.trigger_id, t.profile_id, t.occurrence)


def _timer_row(i: ScheduleTimer, now: datetime) -> dict[str, Any]:
    return {
        "tenant_id": i.tenant_id,
        "trigger_id": i.trigger_id,
        "profile_id": i.profile_id,
        "occurrence": i.occurrence,
        "started_at": i.started_at,
        "due_at": i.due_at,
        "first_due_at": i.due_at,
        "status": "pending",
        "variables": i.variables,
        "created_at": now,
    }


_INSERT_TIMERS = pg_insert(timers).on_conflict_do_nothing(index_elements=TIMER_KEY)
_MOVING = pg_insert(timers)
_MOVE_TIMERS = _MOVING.on_conflict_do_update(
    index_elements=TIMER_KEY,
    set_={
        "started_at": _MOVING.excluded.started_at,
        "due_at": _MOVING.excluded.due_at,
        "first_due_at": _MOVING.excluded.due_at,
        "variables": _MOVING.excluded.variables,
    },
    where=PENDING,
)


async def insert_timers(conn: AsyncConnection, schedules: Sequence[ScheduleTimer], now: datetime) -> None:
    """A pending timer per schedule. One already there (a redelivered start) stays as it is, unless
    the schedule moves it and it is still pending: then it takes the new times and variables.

    Rows go as parameters of one statement built once (executemany), never as a VALUES list built
    per batch: SQLAlchemy compiles a list of values anew for every batch size, at a cost per bound
    value far above the insert's own."""
    fixed = [_timer_row(i, now) for i in schedules if not i.move]
    if fixed:
        await conn.execute(_INSERT_TIMERS, fixed)
    moving = {timer_key_of(i): _timer_row(i, now) for i in schedules if i.move}
    if moving:
        await conn.execute(_MOVE_TIMERS, list(moving.values()))


def timer_key_of(i: ScheduleTimer) -> TimerKey:
    return (i.tenant_id, i.trigger_id, i.profile_id, i.occurrence)


async def cancel_timers(conn: AsyncConnection, cancels: Sequence[CancelTimers], now: datetime) -> None:
    t = timers
    plain = [c for c in cancels if not c.match]
    if plain:
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
                for c in plain
            ],
        )
    for c in cancels:
        if not c.match:
            continue
        started = t.c.variables["event"]
        await conn.execute(
            t.update()
            .where(
                t.c.tenant_id == c.tenant_id,
                t.c.trigger_id == c.trigger_id,
                t.c.profile_id == c.profile_id,
                PENDING,
                t.c.started_at <= c.until,
                # A start without the property matches a cancel whose value is null.
                *(
                    sa.func.coalesce(started[name], sa.cast(sa.literal("null"), JSONB))
                    == sa.cast(sa.literal(json.dumps(value)), JSONB)
                    for name, value in c.match
                ),
            )
            .values(status="cancelled", cancelled_at=now, reason=c.reason)
        )


async def supersede_timers(conn: AsyncConnection, schedules: Sequence[ScheduleTimer], now: datetime) -> None:
    """Each schedule that supersedes retires its profile's older pending timers of the same trigger."""
    schedules = [i for i in schedules if i.supersede]
    if not schedules:
        return
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


async def set_timers(conn: AsyncConnection, keys: list[TimerKey], **values: Any) -> None:
    t = timers
    await conn.execute(
        t.update()
        .where(sa.tuple_(t.c.tenant_id, t.c.trigger_id, t.c.profile_id, t.c.occurrence).in_(keys))
        .values(**values)
    )
