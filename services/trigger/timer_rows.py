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
from sqlalchemy.ext.asyncio import AsyncConnection

from relevans.kit.db import DriverStatement, fetch_on_driver, json_text, unnest
from services.trigger.domain import CancelTimers, RetireTimer, ScheduleTimer
from services.trigger.domain.firing import DueTimer, Firing
from services.trigger.tables import PENDING, timers

# (tenant_id, trigger_id, profile_id, occurrence): one timer, one firing.
TimerKey = tuple[str, str, str, str]


def timer_key(t: Firing | DueTimer) -> TimerKey:
    return (t.tenant_id, t.trigger_id, t.profile_id, t.occurrence)


_SCHEDULE_COLUMNS = (
    ("tenant_id", "text"),
    ("trigger_id", "text"),
    ("profile_id", "text"),
    ("occurrence", "text"),
    ("started_at", "timestamptz"),
    ("due_at", "timestamptz"),
    ("variables", "text"),
)
_INSERT = f"""
INSERT INTO timers (tenant_id, trigger_id, profile_id, occurrence, started_at, due_at, first_due_at,
                    status, variables, created_at)
SELECT tenant_id, trigger_id, profile_id, occurrence, started_at, due_at, due_at,
       'pending', CAST(variables AS jsonb), CAST(:now AS timestamptz)
FROM {unnest("u", _SCHEDULE_COLUMNS)} ORDER BY ord
ON CONFLICT (tenant_id, trigger_id, profile_id, occurrence) DO
"""
_INSERT_TIMERS = DriverStatement(_INSERT + "NOTHING")
_MOVE_TIMERS = DriverStatement(
    _INSERT
    + """UPDATE SET started_at = excluded.started_at, due_at = excluded.due_at,
    first_due_at = excluded.due_at, variables = excluded.variables
WHERE timers.status = 'pending'"""
)


def _schedule_columns(schedules: Sequence[ScheduleTimer], now: datetime) -> dict[str, Any]:
    return {
        "tenant_id": [i.tenant_id for i in schedules],
        "trigger_id": [i.trigger_id for i in schedules],
        "profile_id": [i.profile_id for i in schedules],
        "occurrence": [i.occurrence for i in schedules],
        "started_at": [i.started_at for i in schedules],
        "due_at": [i.due_at for i in schedules],
        "variables": [json_text(i.variables) for i in schedules],
        "now": now,
    }


async def insert_timers(conn: AsyncConnection, schedules: Sequence[ScheduleTimer], now: datetime) -> None:
    """A pending timer per schedule. One already there (a redelivered start, or an earlier schedule
    of the batch) stays as it is, unless the schedule moves it and it is still pending: then it
    takes the new times and variables (of the batch's last schedule that moves it)."""
    fixed = [i for i in schedules if not i.move]
    if fixed:
        await fetch_on_driver(conn, _INSERT_TIMERS, _schedule_columns(fixed, now))
    moving = {timer_key_of(i): i for i in schedules if i.move}
    if moving:
        await fetch_on_driver(conn, _MOVE_TIMERS, _schedule_columns(list(moving.values()), now))


def timer_key_of(i: ScheduleTimer) -> TimerKey:
    return (i.tenant_id, i.trigger_id, i.profile_id, i.occurrence)


# Each pending timer a cancel (or supersede) of the batch covers, with the first in the batch's order
# that covers it: applied one by one, that one would have retired it and the rest found it retired.
_RETIRE = """
WITH hit AS (
    SELECT DISTINCT ON (t.ctid) t.ctid, u.reason
    FROM {unnest} CROSS JOIN LATERAL (
        SELECT t.ctid FROM timers t
        WHERE t.tenant_id = u.tenant_id AND t.trigger_id = u.trigger_id AND t.profile_id = u.profile_id
          AND t.status = 'pending' AND {covers}
    ) t
    ORDER BY t.ctid, u.ord
)
UPDATE timers t SET status = '{status}', cancelled_at = CAST(:now AS timestamptz), reason = hit.reason
FROM hit WHERE t.ctid = hit.ctid AND t.status = 'pending'
"""
_OF_PERSON = (("tenant_id", "text"), ("trigger_id", "text"), ("profile_id", "text"))
# `match`: [[property, value], ...] of the start event's properties; a start without the property
# matches a value of null.
_CANCEL = DriverStatement(
    _RETIRE.format(
        unnest=unnest("u", (*_OF_PERSON, ("until", "timestamptz"), ("reason", "text"), ("match", "text"))),
        covers="""t.started_at <= u.until AND NOT EXISTS (
            SELECT 1 FROM jsonb_array_elements(CAST(u.match AS jsonb)) AS m(pair)
            WHERE coalesce(t.variables -> 'event' -> (m.pair ->> 0), CAST('null' AS jsonb)) <> m.pair -> 1
        )""",
        status="cancelled",
    )
)
_SUPERSEDE = DriverStatement(
    _RETIRE.format(
        unnest=unnest(
            "u", (*_OF_PERSON, ("started_at", "timestamptz"), ("occurrence", "text"), ("reason", "text"))
        ),
        covers="(t.started_at, t.occurrence) < (u.started_at, u.occurrence)",
        status="superseded",
    )
)


async def cancel_timers(conn: AsyncConnection, cancels: Sequence[CancelTimers], now: datetime) -> None:
    """Cancel the pending timers each cancel covers, as if applied one by one: those without a
    `match` first, then those with one, each in the order given."""
    ordered = [c for c in cancels if not c.match] + [c for c in cancels if c.match]
    await fetch_on_driver(
        conn,
        _CANCEL,
        {
            "tenant_id": [c.tenant_id for c in ordered],
            "trigger_id": [c.trigger_id for c in ordered],
            "profile_id": [c.profile_id for c in ordered],
            "until": [c.until for c in ordered],
            "reason": [c.reason for c in ordered],
            "match": [json.dumps([[name, value] for name, value in c.match]) for c in ordered],
            "now": now,
        },
    )


async def supersede_timers(conn: AsyncConnection, schedules: Sequence[ScheduleTimer], now: datetime) -> None:
    """Each schedule that supersedes retires its profile's older pending timers of the same trigger."""
    schedules = [i for i in schedules if i.supersede]
    if not schedules:
        return
    await fetch_on_driver(
        conn,
        _SUPERSEDE,
        {
            "tenant_id": [i.tenant_id for i in schedules],
            "trigger_id": [i.trigger_id for i in schedules],
            "profile_id": [i.profile_id for i in schedules],
            "started_at": [i.started_at for i in schedules],
            "occurrence": [i.occurrence for i in schedules],
            "reason": [f"superseded by {i.occurrence}" for i in schedules],
            "now": now,
        },
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
