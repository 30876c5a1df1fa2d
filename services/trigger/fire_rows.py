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

from collections.abc import Callable, Mapping, Sequence
from datetime import datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.ext.asyncio import AsyncConnection

from relevans.kit.locks import lock_key32
from relevans.kit.outbox import OutboxMessage, enqueue
from services.trigger import person_rows, timer_rows, trace
from services.trigger.domain import TriggerDef
from services.trigger.domain.firing import DueTimer, Firing, Settled, settle_person
from services.trigger.domain.policies import Sent, TenantPolicy, history_horizon
from services.trigger.tables import PENDING, firings, outbox, timers, triggers

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


async def due_timers(
    conn: AsyncConnection, people: Sequence[Person], now: datetime, trigger_def: Callable[[Any], TriggerDef]
) -> list[DueTimer]:
    """Step 3: every due pending timer of these people, with its trigger (None when deleted)."""
    t, tr = timers, triggers
    rows = await conn.execute(
        sa.select(
            t.c.tenant_id,
            t.c.trigger_id,
            t.c.profile_id,
            t.c.occurrence,
            t.c.variables,
            t.c.due_at,
            t.c.first_due_at,
            *(c.label(f"tr_{c.name}") for c in tr.c),
        )
        .select_from(
            t.outerjoin(tr, sa.and_(tr.c.tenant_id == t.c.tenant_id, tr.c.trigger_id == t.c.trigger_id))
        )
        .where(sa.tuple_(t.c.tenant_id, t.c.profile_id).in_(list(people)), PENDING, t.c.due_at <= now)
        .order_by(t.c.due_at)
        .with_for_update(of=t)
    )
    out = []
    for r in rows:
        trigger = None
        if r.tr_trigger_id is not None:
            trigger = trigger_def({c.name: getattr(r, f"tr_{c.name}") for c in tr.c})
        out.append(
            DueTimer(
                tenant_id=r.tenant_id,
                trigger_id=r.trigger_id,
                profile_id=r.profile_id,
                occurrence=r.occurrence,
                variables=r.variables,
                due_at=r.due_at,
                first_due_at=r.first_due_at,
                trigger=trigger,
            )
        )
    return out


async def history(
    conn: AsyncConnection, people: Sequence[Person], since: datetime | None
) -> dict[Person, list[Sent]]:
    """The messages handed to delivery for these people since `since` (None: ever): what caps and
    re-entry count."""
    f = firings
    query = sa.select(
        f.c.tenant_id, f.c.profile_id, f.c.trigger_id, f.c.channel, f.c.purpose, f.c.fired_at
    ).where(sa.tuple_(f.c.tenant_id, f.c.profile_id).in_(list(people)))
    if since is not None:
        query = query.where(f.c.fired_at > since)
    out: dict[Person, list[Sent]] = {}
    for r in await conn.execute(query):
        out.setdefault((r.tenant_id, r.profile_id), []).append(
            Sent(r.trigger_id, r.channel, r.purpose, r.fired_at)
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
        await timer_rows.set_timers(
            conn, [timer_rows.timer_key(f) for _, f in s.handed], status="fired", fired_at=now
        )
    for status in ("cancelled", "dropped"):
        for reason in sorted({r for _, st, r in s.retired if st == status}):
            keys = [timer_rows.timer_key(t) for t, st, r in s.retired if st == status and r == reason]
            await timer_rows.set_timers(conn, keys, status=status, cancelled_at=now, reason=reason)
    if s.deferred:
        t = timers
        await conn.execute(
            t.update()
            .where(
                t.c.tenant_id == sa.bindparam("b_tenant"),
                t.c.trigger_id == sa.bindparam("b_trigger"),
                t.c.profile_id == sa.bindparam("b_profile"),
                t.c.occurrence == sa.bindparam("b_occurrence"),
            )
            .values(due_at=sa.bindparam("b_until")),
            [
                {
                    "b_tenant": d.tenant_id,
                    "b_trigger": d.trigger_id,
                    "b_profile": d.profile_id,
                    "b_occurrence": d.occurrence,
                    "b_until": until,
                }
                for d, until in s.deferred
            ],
        )
    if s.follow_ups:
        await timer_rows.insert_timers(conn, s.follow_ups, now)
    await trace.record(conn, s.notes, s.note_keys)
    if new:
        await enqueue(conn, outbox, [message_for(f, now) for f in new], now)


# Rows as executemany parameters of a statement built once (see `timer_rows.insert_timers`).
_RECORD_FIRINGS = (
    pg_insert(firings)
    .on_conflict_do_nothing()
    .returning(firings.c.tenant_id, firings.c.trigger_id, firings.c.profile_id, firings.c.occurrence)
)


async def record_firings(conn: AsyncConnection, to_fire: Sequence[Firing], now: datetime) -> list[Firing]:
    """Record the firings; return those not recorded before (only they are sent)."""
    inserted = (
        await conn.execute(
            _RECORD_FIRINGS,
            [
                {
                    "tenant_id": f.tenant_id,
                    "trigger_id": f.trigger_id,
                    "profile_id": f.profile_id,
                    "occurrence": f.occurrence,
                    "idempotency_key": f.idempotency_key,
                    "fired_at": now,
                    "channel": f.channel,
                    "purpose": f.purpose,
                }
                for f in to_fire
            ],
        )
    ).all()
    fresh = {tuple(r) for r in inserted}
    return [f for f in to_fire if timer_rows.timer_key(f) in fresh]
