"""The decision trace's rows: what each evaluation, firing and delivery outcome came to.

Notes of the domain (`intents.Note`) become `decisions` rows in the transaction that made
them. A trigger's condition-false evaluations for a person are one row (`collapse_key`): the
latest, with how many it stands for — every page view a condition turns down would otherwise be
a row. Even so, rewriting that row for every event was most of the database's work per event, so
a process writes it again at most once per `CONDITION_FALSE_REFRESH` per trigger and person
(`CollapsedNotes`): the evaluations between are counted in memory and added at the next write;
a process that stops loses at most that count, never a decision that changed something.
Delivery's outcomes, read from rv.delivery.status.*, are rows keyed by the message and status
(`dedupe_key`), so a redelivered status changes nothing. Rows older than the retention
are pruned; an erasure deletes the person's rows with the rest of them.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta

import sqlalchemy as sa
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.ext.asyncio import AsyncConnection

from relevans.kit.db import DriverStatement, fetch_on_driver, unnest
from services.trigger.domain.intents import Note
from services.trigger.tables import decisions

# Condition-false evaluations collapse into one row per (trigger, person).
COLLAPSED = frozenset({("not_fired", "condition_false")})
CONDITION_FALSE_REFRESH = timedelta(hours=1)
# (tenant, collapse key) pairs a process remembers; the least recently written are forgotten first
# (and written again at their next evaluation).
COLLAPSED_CAPACITY = 100_000

# (tenant, collapse key): one string per entry, not the event's own strings (kept alive by a tuple
# of them, 100,000 entries weighed more).
CollapsedKey = tuple[str, str]


class CollapsedNotes:
    """The condition-false rows this process wrote lately (by the time of their notes), and the
    evaluations counted since. Only what a committed transaction wrote is remembered
    (`record` returns the update to make once it commits)."""

    def __init__(
        self, refresh: timedelta = CONDITION_FALSE_REFRESH, capacity: int = COLLAPSED_CAPACITY
    ) -> None:
        self.refresh = refresh
        self.capacity = capacity
        self._written: OrderedDict[CollapsedKey, datetime] = OrderedDict()
        self._counted: dict[CollapsedKey, int] = {}

    def due(self, key: CollapsedKey, at: datetime) -> bool:
        last = self._written.get(key)
        return last is None or at - last >= self.refresh

    def counted(self, key: CollapsedKey) -> int:
        return self._counted.get(key, 0)

    def settle(
        self, written: Sequence[tuple[CollapsedKey, datetime]], held: Sequence[tuple[CollapsedKey, int]]
    ) -> None:
        for key, at in written:
            self._written[key] = at
            self._written.move_to_end(key)
            self._counted.pop(key, None)
        for key, count in held:
            if key in self._written:
                self._counted[key] = self._counted.get(key, 0) + count
        while len(self._written) > self.capacity:
            gone, _ = self._written.popitem(last=False)
            self._counted.pop(gone, None)


def _nothing() -> None:
    return None


@dataclass(frozen=True, slots=True)
class DecisionRow:
    decision_id: int
    trigger_id: str
    profile_id: str
    outcome: str
    reason_code: str
    reason: str
    decided_at: datetime
    event_id: str
    occurrence: str
    until: datetime | None
    idempotency_key: str
    count: int


@dataclass(frozen=True, slots=True)
class DeliveryOutcome:
    """A status delivery published about a message a trigger asked for."""

    tenant_id: str
    profile_id: str
    trigger_id: str
    idempotency_key: str
    # delivery_sent, delivery_suppressed or delivery_failed.
    outcome: str
    reason: str
    at: datetime


_NOTE_COLUMNS = (
    ("tenant_id", "text"),
    ("profile_id", "text"),
    ("trigger_id", "text"),
    ("outcome", "text"),
    ("reason_code", "text"),
    ("reason", "text"),
    ("decided_at", "timestamptz"),
    ("event_id", "text"),
    ("occurrence", "text"),
    ("until", "timestamptz"),
    ("idempotency_key", "text"),
)
_NOTES = ", ".join(name for name, _ in _NOTE_COLUMNS)
# One row per note in the order of the notes (the decision ids, taken in that order, order the rows
# of one instant); a collapsed row (`collapse_key`) adds its count to the stored one, if there is
# one. Only the collapsed rows go through ON CONFLICT: a speculative insertion costs PostgreSQL
# more than a plain one (bench/README.md, "Trigger"), and most rows are not collapsed.
_RECORD = DriverStatement(f"""
WITH u AS MATERIALIZED (
    SELECT {_NOTES}, count, collapse_key,
           nextval('decisions_decision_id_seq') AS decision_id
    FROM {unnest("u", (*_NOTE_COLUMNS, ("count", "bigint"), ("collapse_key", "text")))} ORDER BY ord
), plain AS (
    INSERT INTO decisions (decision_id, {_NOTES}, count)
    SELECT decision_id, {_NOTES}, count FROM u WHERE collapse_key IS NULL
)
INSERT INTO decisions (decision_id, {_NOTES}, count, collapse_key)
SELECT decision_id, {_NOTES}, count, collapse_key FROM u WHERE collapse_key IS NOT NULL
ON CONFLICT (tenant_id, collapse_key) WHERE collapse_key IS NOT NULL DO UPDATE SET
    count = decisions.count + excluded.count,
    decided_at = greatest(decisions.decided_at, excluded.decided_at),
    event_id = excluded.event_id,
    reason = excluded.reason
""")
_DEDUPED = pg_insert(decisions).on_conflict_do_nothing(
    index_elements=["tenant_id", "dedupe_key"], index_where=decisions.c.dedupe_key.is_not(None)
)


async def record(
    conn: AsyncConnection,
    notes: Sequence[Note],
    keys: Sequence[str] = (),
    collapsed: CollapsedNotes | None = None,
) -> Callable[[], None]:
    """Write notes (with the idempotency key of each, where one was handed to delivery). The
    condition-false notes of a trigger for a person in the batch are one row, the latest, at its
    place — unless `collapsed` says this process wrote that row lately: then they are only
    counted. Returns what to tell `collapsed` once the transaction has committed."""
    if not notes:
        return _nothing
    # Condition-false notes by (tenant, collapse key): the latest's place, and how many.
    latest: dict[CollapsedKey, int] = {}
    counts: dict[CollapsedKey, int] = {}
    rows: list[int] = []  # the places of the notes written, in order
    for i, n in enumerate(notes):
        if (n.outcome, n.reason_code) in COLLAPSED:
            k = (n.tenant_id, f"{n.trigger_id}\x1f{n.profile_id}\x1f{n.reason_code}")
            latest[k] = i
            counts[k] = counts.get(k, 0) + 1
        else:
            rows.append(i)
    written: list[tuple[CollapsedKey, datetime]] = []
    held: list[tuple[CollapsedKey, int]] = []
    collapse: dict[int, tuple[int, str]] = {}  # place -> (count, collapse key) of a collapsed row
    for key, i in latest.items():
        at = notes[i].at
        if collapsed is None or collapsed.due(key, at):
            written.append((key, at))
            count = counts[key] + (0 if collapsed is None else collapsed.counted(key))
            collapse[i] = (count, key[1])
            rows.append(i)
        else:
            held.append((key, counts[key]))
    if collapse:
        rows.sort()
    if not rows:
        return _nothing if collapsed is None else lambda: collapsed.settle(written, held)
    kept = [(notes[i], keys[i] if i < len(keys) else "", *collapse.get(i, (1, None))) for i in rows]
    await fetch_on_driver(
        conn,
        _RECORD,
        {
            "tenant_id": [n.tenant_id for n, _, _, _ in kept],
            "profile_id": [n.profile_id for n, _, _, _ in kept],
            "trigger_id": [n.trigger_id for n, _, _, _ in kept],
            "outcome": [n.outcome for n, _, _, _ in kept],
            "reason_code": [n.reason_code for n, _, _, _ in kept],
            "reason": [n.reason for n, _, _, _ in kept],
            "decided_at": [n.at for n, _, _, _ in kept],
            "event_id": [n.event_id for n, _, _, _ in kept],
            "occurrence": [n.occurrence for n, _, _, _ in kept],
            "until": [n.until for n, _, _, _ in kept],
            "idempotency_key": [k for _, k, _, _ in kept],
            "count": [c for _, _, c, _ in kept],
            "collapse_key": [c for _, _, _, c in kept],
        },
    )
    if collapsed is None:
        return _nothing
    return lambda: collapsed.settle(written, held)


async def record_delivery(conn: AsyncConnection, outcomes: Sequence[DeliveryOutcome]) -> None:
    if not outcomes:
        return
    rows = [
        {
            "tenant_id": o.tenant_id,
            "profile_id": o.profile_id,
            "trigger_id": o.trigger_id,
            "outcome": o.outcome,
            "reason_code": o.outcome.removeprefix("delivery_"),
            "reason": o.reason or o.outcome.removeprefix("delivery_"),
            "decided_at": o.at,
            "occurrence": occurrence_of(o.idempotency_key, o.trigger_id, o.profile_id),
            "idempotency_key": o.idempotency_key,
            "dedupe_key": f"{o.idempotency_key}\x1f{o.outcome}",
        }
        for o in outcomes
    ]
    await conn.execute(_DEDUPED, rows)


def occurrence_of(idempotency_key: str, trigger_id: str, profile_id: str) -> str:
    """The occurrence in a key `firing.idempotency_key` made ("" when it is not one)."""
    prefix = f"{trigger_id}:{profile_id}:"
    return idempotency_key[len(prefix) :] if idempotency_key.startswith(prefix) else ""


async def explain(
    conn: AsyncConnection,
    tenant_id: str,
    profile_ids: Sequence[str],
    trigger_id: str | None,
    after: tuple[datetime, int] | None,
    limit: int,
) -> list[DecisionRow]:
    """Up to `limit` rows about these profile ids (a person and the ids merged into them), newest
    first, starting after the (decided_at, decision_id) position `after`."""
    d = decisions
    query = sa.select(
        d.c.decision_id,
        d.c.trigger_id,
        d.c.profile_id,
        d.c.outcome,
        d.c.reason_code,
        d.c.reason,
        d.c.decided_at,
        d.c.event_id,
        d.c.occurrence,
        d.c.until,
        d.c.idempotency_key,
        d.c.count,
    ).where(d.c.tenant_id == tenant_id, d.c.profile_id.in_(list(profile_ids)))
    if trigger_id is not None:
        query = query.where(d.c.trigger_id == trigger_id)
    if after is not None:
        query = query.where(sa.tuple_(d.c.decided_at, d.c.decision_id) < sa.tuple_(*after))
    rows = await conn.execute(query.order_by(d.c.decided_at.desc(), d.c.decision_id.desc()).limit(limit))
    return [DecisionRow(**r._mapping) for r in rows]


async def move(conn: AsyncConnection, tenant_id: str, gone: str, survivor: str) -> None:
    """A merged-away profile's rows become the survivor's (collapsed rows of both stay two rows)."""
    d = decisions
    await conn.execute(
        d.update()
        .where(d.c.tenant_id == tenant_id, d.c.profile_id == gone)
        .values(profile_id=survivor, collapse_key=None)
    )


async def prune(conn: AsyncConnection, before: datetime, limit: int) -> int:
    """Delete up to `limit` rows decided before `before`; return how many."""
    d = decisions
    old = sa.select(d.c.decision_id).where(d.c.decided_at < before).limit(limit).scalar_subquery()
    result = await conn.execute(d.delete().where(d.c.decision_id.in_(old)))
    return int(result.rowcount or 0)
