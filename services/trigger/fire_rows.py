"""The timer worker's transaction: claim due timers person by person, decide them by the
policies, write what was decided.

A round (1) picks the people of up to `limit` due pending timers (`FOR UPDATE SKIP LOCKED` inside
a savepoint rolled back at once: workers pick different people, and no row lock outlives the
pick), (2) takes the advisory lock of each of those people that no other transaction holds
(`pg_try_advisory_xact_lock`: a person whose facts or timers are being handled elsewhere waits for
the next round), (3) locks every due timer of the locked people — only holders of a person's lock
change their timers, so this waits at most for another worker's pick — and so decides one
person's due messages together, whichever worker picked which of them, (4) loads
what the decision needs — the tenants' policies, the people's traits and consents, the messages
already handed to delivery — and (5) writes the outcome: firings, delivery requests in the
outbox, deferred due times, dropped timers, the timers that follow, and the decision trace.
Because the cap counts run under the person's lock, two workers (in one process or two) never both
send past a cap.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from datetime import datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncConnection

from relevans.kit.db import DriverStatement, fetch_on_driver, json_value, unnest
from relevans.kit.locks import lock_key32
from relevans.kit.outbox import OutboxMessage
from services.trigger import outbox_rows, person_rows, timer_rows, trace
from services.trigger.definitions import TRIGGER_COLUMNS
from services.trigger.domain import TriggerDef
from services.trigger.domain.firing import DueTimer, Firing, Settled, settle_person
from services.trigger.domain.policies import Sent, TenantPolicy, history_horizon
from services.trigger.tables import PENDING, timers

MessageFor = Callable[[Firing, datetime], OutboxMessage]
Person = tuple[str, str]


async def claim_people(conn: AsyncConnection, now: datetime, limit: int, namespace: int) -> list[Person]:
    """Steps 1-2: the people of up to `limit` due timers whose lock this transaction got."""
    t = timers
    pick = await conn.begin_nested()
    rows = (
        await conn.execute(
            sa.select(t.c.tenant_id, t.c.profile_id)
            .where(PENDING, t.c.due_at <= now)
            .order_by(t.c.due_at)
            .limit(limit)
            .with_for_update(skip_locked=True)
        )
    ).all()
    await pick.rollback()
    people = sorted({(r.tenant_id, r.profile_id) for r in rows})
    if not people:
        return []
    got = await conn.execute(
        sa.text(
            "SELECT i FROM unnest(CAST(:keys AS integer[])) WITH ORDINALITY AS u(k, i) "
            "WHERE pg_try_advisory_xact_lock(:ns, k)"
        ),
        {"ns": namespace, "keys": [lock_key32(tenant, profile) for tenant, profile in people]},
    )
    return [people[i - 1] for (i,) in got]


_PEOPLE = unnest("u", (("tenant_id", "text"), ("profile_id", "text")))
_DUE = DriverStatement(f"""
SELECT t.tenant_id, t.trigger_id, t.profile_id, t.occurrence, CAST(t.variables AS text) AS variables,
       t.due_at, t.first_due_at
FROM {_PEOPLE} CROSS JOIN LATERAL (
    SELECT * FROM timers t
    WHERE t.tenant_id = u.tenant_id AND t.profile_id = u.profile_id AND t.status = 'pending'
      AND t.due_at <= CAST(:now AS timestamptz)
    FOR UPDATE
) t
ORDER BY t.due_at
""")
_TRIGGERS = DriverStatement(f"""
SELECT {TRIGGER_COLUMNS} FROM {unnest("u", (("tenant_id", "text"), ("trigger_id", "text")))}
JOIN triggers tr ON tr.tenant_id = u.tenant_id AND tr.trigger_id = u.trigger_id
""")


def _people(people: Sequence[Person]) -> dict[str, Any]:
    return {"tenant_id": [t for t, _ in people], "profile_id": [p for _, p in people]}


async def due_timers(
    conn: AsyncConnection, people: Sequence[Person], now: datetime, trigger_def: Callable[[Any], TriggerDef]
) -> list[DueTimer]:
    """Step 3: every due pending timer of these people, with its trigger (None when deleted)."""
    rows = await fetch_on_driver(conn, _DUE, {**_people(people), "now": now})
    wanted = sorted({(r["tenant_id"], r["trigger_id"]) for r in rows})
    found = await fetch_on_driver(
        conn, _TRIGGERS, {"tenant_id": [t for t, _ in wanted], "trigger_id": [i for _, i in wanted]}
    )
    defs = {(r["tenant_id"], r["trigger_id"]): trigger_def(r) for r in found}
    return [
        DueTimer(
            tenant_id=r["tenant_id"],
            trigger_id=r["trigger_id"],
            profile_id=r["profile_id"],
            occurrence=r["occurrence"],
            variables=json_value(r["variables"]),
            due_at=r["due_at"],
            first_due_at=r["first_due_at"],
            trigger=defs.get((r["tenant_id"], r["trigger_id"])),
        )
        for r in rows
    ]


_HISTORY = DriverStatement(f"""
SELECT f.tenant_id, f.profile_id, f.trigger_id, f.channel, f.purpose, f.fired_at
FROM {_PEOPLE} CROSS JOIN LATERAL (
    SELECT * FROM firings f
    WHERE f.tenant_id = u.tenant_id AND f.profile_id = u.profile_id
      AND (CAST(:since AS timestamptz) IS NULL OR f.fired_at > CAST(:since AS timestamptz))
) f
""")


async def history(
    conn: AsyncConnection, people: Sequence[Person], since: datetime | None
) -> dict[Person, list[Sent]]:
    """The messages handed to delivery for these people since `since` (None: ever): what caps and
    re-entry count."""
    out: dict[Person, list[Sent]] = {}
    for r in await fetch_on_driver(conn, _HISTORY, {**_people(people), "since": since}):
        out.setdefault((r["tenant_id"], r["profile_id"]), []).append(
            Sent(r["trigger_id"], r["channel"], r["purpose"], r["fired_at"])
        )
    return out


async def settle(
    conn: AsyncConnection,
    people: Sequence[Person],
    due: Sequence[DueTimer],
    policies: Mapping[str, TenantPolicy],
    now: datetime,
    message_for: MessageFor,
) -> tuple[int, int]:
    """Steps 4-5 for the locked people's due timers; returns (decided, handed)."""
    if not due:
        return 0, 0
    horizons = [
        history_horizon(policies.get(tenant, TenantPolicy()), [d.trigger.policy for d in due if d.trigger])
        for tenant in {d.tenant_id for d in due}
    ]
    since = None if None in horizons else now - max(h for h in horizons if h is not None)
    sent = await history(conn, people, since)
    known = await person_rows.load(conn, people)
    by_person: dict[Person, list[DueTimer]] = {}
    for d in due:
        by_person.setdefault((d.tenant_id, d.profile_id), []).append(d)
    total = Settled()
    for person, mine in by_person.items():
        traits, consents = known.get(person, ({}, {}))
        part = settle_person(
            mine, sent.get(person, []), policies.get(person[0], TenantPolicy()), traits, consents, now
        )
        total.handed += part.handed
        total.deferred += part.deferred
        total.retired += part.retired
        total.notes += part.notes
        total.note_keys += part.note_keys
        total.follow_ups += part.follow_ups
    await _write(conn, total, now, message_for)
    return len(due), len(total.handed)


async def _write(conn: AsyncConnection, s: Settled, now: datetime, message_for: MessageFor) -> None:
    new: list[Firing] = []
    if s.handed:
        new = await record_firings(conn, [f for _, f in s.handed], now)
        await fetch_on_driver(conn, _FIRED, {**_keys(f for _, f in s.handed), "now": now})
    if s.retired:
        await fetch_on_driver(
            conn,
            _RETIRED,
            {
                **_keys(t for t, _, _ in s.retired),
                "status": [status for _, status, _ in s.retired],
                "reason": [reason for _, _, reason in s.retired],
                "now": now,
            },
        )
    if s.deferred:
        deferred = {**_keys(d for d, _ in s.deferred), "until": [u for _, u in s.deferred]}
        await fetch_on_driver(conn, _DEFERRED, deferred)
    if s.follow_ups:
        await timer_rows.insert_timers(conn, s.follow_ups, now)
    await trace.record(conn, s.notes, s.note_keys)
    if new:
        await outbox_rows.enqueue(conn, [message_for(f, now) for f in new], now)


_KEY = (("tenant_id", "text"), ("trigger_id", "text"), ("profile_id", "text"), ("occurrence", "text"))
_OF_KEY = """t.tenant_id = u.tenant_id AND t.trigger_id = u.trigger_id AND t.profile_id = u.profile_id
    AND t.occurrence = u.occurrence"""
_FIRED = DriverStatement(f"""
UPDATE timers t SET status = 'fired', fired_at = CAST(:now AS timestamptz)
FROM {unnest("u", _KEY)} WHERE {_OF_KEY}
""")
_RETIRED = DriverStatement(f"""
UPDATE timers t SET status = u.status, cancelled_at = CAST(:now AS timestamptz), reason = u.reason
FROM {unnest("u", (*_KEY, ("status", "text"), ("reason", "text")))} WHERE {_OF_KEY}
""")
_DEFERRED = DriverStatement(f"""
UPDATE timers t SET due_at = u.until
FROM {unnest("u", (*_KEY, ("until", "timestamptz")))} WHERE {_OF_KEY}
""")
_RECORD_FIRINGS = DriverStatement(f"""
INSERT INTO firings (tenant_id, trigger_id, profile_id, occurrence, idempotency_key, fired_at,
                     channel, purpose)
SELECT tenant_id, trigger_id, profile_id, occurrence, idempotency_key, CAST(:now AS timestamptz),
       channel, purpose
FROM {unnest("u", (*_KEY, ("idempotency_key", "text"), ("channel", "text"), ("purpose", "text")))}
ORDER BY ord
ON CONFLICT DO NOTHING
RETURNING tenant_id, trigger_id, profile_id, occurrence
""")


def _keys(timers: Iterable[Firing | DueTimer]) -> dict[str, list[str]]:
    keys = [timer_rows.timer_key(t) for t in timers]
    return {
        "tenant_id": [k[0] for k in keys],
        "trigger_id": [k[1] for k in keys],
        "profile_id": [k[2] for k in keys],
        "occurrence": [k[3] for k in keys],
    }


async def record_firings(conn: AsyncConnection, to_fire: Sequence[Firing], now: datetime) -> list[Firing]:
    """Record the firings; return those not recorded before (only they are sent)."""
    inserted = await fetch_on_driver(
        conn,
        _RECORD_FIRINGS,
        {
            **_keys(to_fire),
            "idempotency_key": [f.idempotency_key for f in to_fire],
            "channel": [f.channel for f in to_fire],
            "purpose": [f.purpose for f in to_fire],
            "now": now,
        },
    )
    fresh = {tuple(r) for r in inserted}
    return [f for f in to_fire if timer_rows.timer_key(f) in fresh]
