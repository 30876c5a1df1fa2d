"""The transactional outbox (docs/architecture.md, "Nothing acknowledged is lost").

A service writes its bus messages into its own `outbox` table in the same
transaction as the state change; the relay publishes them with
`Nats-Msg-Id = <service>-<outbox id>`, so a relay that dies after publishing and
before saving how far it got re-publishes the same ids and JetStream drops the
duplicates. Published rows are kept for `retention` so they can be replayed.

How far the relay got is one row per outbox table (`outbox_relay`), not a mark on
every row: each row carries the id of the transaction that wrote it (`xid`), and
the relay publishes in windows between two PostgreSQL snapshots, as PgQ does. A
window holds the rows of the transactions that committed after the snapshot the
last window ended at and before the one this window ends at, in id order. A
transaction that commits late (its ids lower than rows already published) falls
into a later window instead of being skipped, and a row is never written twice.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

import asyncpg
import sqlalchemy as sa
import structlog
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from relevans.kit import metrics
from relevans.kit.bus import Bus
from relevans.kit.clock import Clock

log = structlog.get_logger(__name__)


class Xid8(sa.types.UserDefinedType[int]):
    """PostgreSQL's 64-bit transaction id (never wraps around)."""

    cache_ok = True

    def get_col_spec(self, **kw: object) -> str:
        return "xid8"


# Whether an outbox row `o` is not published by a position (see `Position`), given as SQL
# expressions for its `published`, `window_end` and `after_id`: its transaction was still running
# at the `published` snapshot or began after it. (Two index conditions: a transaction left open
# for long does not make the relay read every row written since it began.)
_UNPUBLISHED = """(o.xid >= pg_snapshot_xmax(CAST({published} AS pg_snapshot))
    OR o.xid = ANY(ARRAY(SELECT pg_snapshot_xip(CAST({published} AS pg_snapshot)))))"""
_UNPUBLISHED_ROW = (
    _UNPUBLISHED
    + """
    AND NOT ({window_end} IS NOT NULL AND o.id <= {after_id}
             AND pg_visible_in_snapshot(o.xid, CAST({window_end} AS pg_snapshot)))"""
)

# The position as the `outbox_relay` row `r` holds it.
_SAVED = {"published": "r.published", "window_end": "r.window_end", "after_id": "r.after_id"}

# The snapshot before any transaction: nothing is published yet.
NOTHING_PUBLISHED = "1:1:"


def create_first_outbox(op: Any) -> None:
    """Migration step (alembic `op`): the outbox as every service's first migration made it, with a
    `published_at` mark per row. History: never change it; `TO_POSITION` moved it on."""
    op.create_table(
        "outbox",
        sa.Column("id", sa.BigInteger, sa.Identity(), nullable=False),
        sa.Column("subject", sa.Text, nullable=False),
        sa.Column("payload", sa.LargeBinary, nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("published_at", sa.DateTime(timezone=True)),
        sa.PrimaryKeyConstraint("id"),
    )
    op.create_index("outbox_unpublished", "outbox", ["id"], postgresql_where=sa.text("published_at IS NULL"))


def outbox_table(metadata: sa.MetaData) -> sa.Table:
    """The outbox table, declared in each service's own metadata and migrations (with the
    `outbox_relay` table that says how far its relay got)."""
    if "outbox_relay" not in metadata.tables:
        sa.Table(
            "outbox_relay",
            metadata,
            sa.Column("outbox", sa.Text, primary_key=True),
            # Every transaction visible in this snapshot (text form) is published,
            sa.Column("published", sa.Text, nullable=False),
            # and of those visible in this one too, the rows up to `after_id` (a window under way).
            sa.Column("window_end", sa.Text),
            sa.Column("after_id", sa.BigInteger, nullable=False, server_default="0"),
        )
    return sa.Table(
        "outbox",
        metadata,
        sa.Column("id", sa.BigInteger, sa.Identity(), primary_key=True),
        sa.Column("subject", sa.Text, nullable=False),
        sa.Column("payload", sa.LargeBinary, nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("xid", Xid8, nullable=False, server_default=sa.text("pg_current_xact_id()")),
        sa.Index("outbox_xid", "xid", "id"),
    )


# The migration of an outbox table from a mark on each published row (`published_at`) to the
# relay's position: published rows get a transaction id every position has seen (3, the first
# normal one), the others the migration's own, which the position it starts from has not.
TO_POSITION = (
    "ALTER TABLE outbox ADD COLUMN xid xid8",
    "UPDATE outbox SET xid = CASE WHEN published_at IS NULL THEN pg_current_xact_id() ELSE '3' END",
    "ALTER TABLE outbox ALTER COLUMN xid SET NOT NULL, ALTER COLUMN xid SET DEFAULT pg_current_xact_id()",
    "DROP INDEX outbox_unpublished",
    "ALTER TABLE outbox DROP COLUMN published_at",
    "CREATE INDEX outbox_xid ON outbox (xid, id)",
    """CREATE TABLE outbox_relay (outbox text PRIMARY KEY, published text NOT NULL, window_end text,
                                 after_id bigint NOT NULL DEFAULT 0)""",
    "INSERT INTO outbox_relay (outbox, published) VALUES ('outbox', '4:4:')",
)
FROM_POSITION = (
    "ALTER TABLE outbox ADD COLUMN published_at timestamptz",
    f"""UPDATE outbox o SET published_at = now() FROM outbox_relay r
        WHERE r.outbox = 'outbox' AND NOT ({_UNPUBLISHED_ROW.format(**_SAVED)})""",
    "DROP TABLE outbox_relay",
    "DROP INDEX outbox_xid",
    "ALTER TABLE outbox DROP COLUMN xid",
    "CREATE INDEX outbox_unpublished ON outbox (id) WHERE published_at IS NULL",
)


@dataclass(frozen=True)
class OutboxMessage:
    subject: str
    payload: bytes


async def enqueue(
    conn: AsyncConnection, table: sa.Table, messages: Sequence[OutboxMessage], now: datetime
) -> None:
    """Add messages to the outbox inside the caller's transaction."""
    if messages:
        await conn.execute(
            table.insert(),
            [{"subject": m.subject, "payload": m.payload, "created_at": now} for m in messages],
        )


# Rows a relay reads and publishes per round.
RELAY_BATCH = 1000

_TAKE_TURN = "SELECT pg_try_advisory_xact_lock(hashtextextended($1, 0))"
_TAKE_LEAD = "SELECT pg_try_advisory_lock(hashtextextended($1, 0))"
# The relay plans its statements once, for any position: with plain table scans and parallel
# workers off, the plan PostgreSQL makes without knowing the position reads the outbox by its
# indexes, as it must (only a recent few transactions' rows are wanted); planning each round for
# the position given took longer than running the round's read.
_RELAY_SETTINGS = {
    "plan_cache_mode": "force_generic_plan",
    "enable_seqscan": "off",
    "max_parallel_workers_per_gather": "0",
}
_RELAY_TURN_SETTINGS = "; ".join(f"SET LOCAL {name} = {value}" for name, value in _RELAY_SETTINGS.items())
_START = "INSERT INTO outbox_relay (outbox, published) VALUES ($1, $2) ON CONFLICT DO NOTHING"
# A saved position ahead of the database's own transaction ids (restored from a logical dump into
# another cluster, whose ids start again low) would take every new row for published.
_LOAD = """
SELECT published, window_end, after_id,
       pg_snapshot_xmax(CAST(coalesce(window_end, published) AS pg_snapshot))
         > pg_snapshot_xmax(pg_current_snapshot()) AS ahead
FROM outbox_relay WHERE outbox = $1"""
_SAVED_POSITION = "SELECT published, window_end, after_id FROM outbox_relay WHERE outbox = $1"
_SAVE = "UPDATE outbox_relay SET published = $2, window_end = $3, after_id = $4 WHERE outbox = $1"


@dataclass(frozen=True)
class Position:
    """How far a relay got: every transaction visible in the snapshot `published` is published, and
    of a window under way (the transactions visible in `window_end` and not in `published`), the
    rows up to `after_id`."""

    published: str
    window_end: str | None = None
    after_id: int = 0


class OutboxRelay:
    """Publishes outbox rows, window by window and in id order within a window (see the module's
    docstring). Any number of relays may share a table, but one publishes at a time, because two
    relays publishing different batches at once could publish one profile's messages out of order.

    A running relay (`run`) leads: it holds a session advisory lock on a connection of its own for as
    long as it runs and reads rows on it without a transaction; a round is one read, and when it
    published something, one update of its position. The others stand by, try to take the lead
    every poll interval (so one takes over within it when the leader stops or its connection drops),
    and pass their own process's commits on to the leader with a PostgreSQL `NOTIFY`. `relay_once`
    publishes one round in a turn of its own (a transaction holding the same lock), for tools and
    tests.
    """

    def __init__(
        self,
        engine: AsyncEngine,
        table: sa.Table,
        bus: Bus,
        *,
        service: str,
        clock: Clock,
        batch: int = RELAY_BATCH,
        poll_interval_s: float = 0.05,
        retention: timedelta = timedelta(hours=24),
        ack_timeout_s: float = 5.0,
        gather_s: float = 0.005,
        chores_every: timedelta = timedelta(seconds=10),
    ) -> None:
        self.engine = engine
        self.table = table
        self.bus = bus
        self.service = service
        self.clock = clock
        self.batch = batch
        self.poll_interval_s = poll_interval_s
        self.retention = retention
        self.ack_timeout_s = ack_timeout_s
        self.gather_s = gather_s
        self.chores_every = chores_every
        self._chores_due: datetime | None = None  # while it leads: when to purge and count next
        self._wake = asyncio.Event()
        self._key = f"outbox:{table.name}"
        self._channel = f"relevans_outbox_{table.name}"
        name = table.name
        # A new window ends at the reading statement's own snapshot, which is what it sees. Its rows
        # are found by their transaction ids (an index), then read in id order from the first (the
        # primary key) with no condition on xid the planner could prefer to the order. The first is
        # the least of two minimums, each over one index condition: with the two as one condition
        # (`_UNPUBLISHED`'s OR), the generic plan read the whole `outbox_xid` index with the OR as
        # a filter — every kept row (a day's worth) at every round.
        self._open = f"""
            WITH s AS MATERIALIZED (
                SELECT pg_current_snapshot() AS window_end,
                       least(
                           (SELECT min(o.id + 0) FROM {name} o
                            WHERE o.xid >= pg_snapshot_xmax(CAST($1::text AS pg_snapshot))),
                           (SELECT min(o.id + 0) FROM {name} o
                            WHERE o.xid = ANY(ARRAY(SELECT pg_snapshot_xip(CAST($1::text AS pg_snapshot)))))
                       ) AS first_id
            )
            SELECT CAST(s.window_end AS text), o.id, o.subject, o.payload
            FROM s LEFT JOIN LATERAL (
                SELECT o.id, o.subject, o.payload FROM {name} o
                WHERE o.id >= s.first_id AND NOT pg_visible_in_snapshot(o.xid, CAST($1::text AS pg_snapshot))
                ORDER BY o.id LIMIT $2
            ) AS o ON true"""
        self._continue = f"""
            SELECT o.id, o.subject, o.payload FROM {name} o
            WHERE o.id > $3 AND NOT pg_visible_in_snapshot(o.xid, CAST($1::text AS pg_snapshot))
              AND pg_visible_in_snapshot(o.xid, CAST($2::text AS pg_snapshot))
            ORDER BY o.id LIMIT $4"""
        # Rows a position does not cover, found by their transaction ids (an index) on a connection
        # with `_RELAY_SETTINGS`: a plan that cannot know the position would otherwise read the
        # whole table (every kept row, a day's worth) every 10 s, with the relay waiting (figures:
        # bench/README.md).
        self._backlog = f"""
            SELECT count(*) FROM {name} o
            WHERE {_UNPUBLISHED_ROW.format(published="$1::text", window_end="$2::text", after_id="$3")}"""
        # Rows before the first one written since the cutoff, found by the primary key: the work is
        # the rows deleted, not the rows kept.
        self._purge = sa.text(f"""
            DELETE FROM {name} o USING outbox_relay r
            WHERE r.outbox = :name
              AND o.id < (SELECT coalesce(min(k.id), 9223372036854775807) FROM {name} k
                          WHERE k.created_at >= :cutoff)
              AND o.xid < pg_snapshot_xmin(CAST(r.published AS pg_snapshot))""")
        self._dsn = engine.url.set(drivername="postgresql").render_as_string(hide_password=False)
        self._conn: asyncpg.Connection | None = None  # the relay's own connection, while it runs
        self._position: Position | None = None  # while it leads
        self._saved: Position | None = None  # what the table holds of it, while it leads
        self.leading = False

    def notify(self) -> None:
        """Wake the relay now: a transaction that wrote to the outbox has committed."""
        self._wake.set()

    async def relay_once(self) -> int:
        """Publish one batch in a turn of its own; return how many rows were published (0 when
        another relay has the turn or leads)."""
        async with self.engine.connect() as conn:
            raw: asyncpg.Connection = (await conn.get_raw_connection()).driver_connection
            async with raw.transaction():
                if not await raw.fetchval(_TAKE_TURN, self._key):
                    return 0
                await raw.execute(_RELAY_TURN_SETTINGS)
                position = await self._load(raw)
                published, after = await self._publish_round(raw, position)
                if after != position:
                    await self._save(raw, after)
                return published

    async def _load(self, conn: asyncpg.Connection) -> Position:
        await conn.execute(_START, self.table.name, NOTHING_PUBLISHED)
        published, window_end, after_id, ahead = await conn.fetchrow(_LOAD, self.table.name)
        if ahead:
            log.warning(
                "outbox relay position is ahead of this database's transactions (restored from a dump?);"
                " publishing every kept row again, which consumers' keyed effects deduplicate",
                service=self.service,
                position=published,
            )
            position = Position(NOTHING_PUBLISHED)
            await self._save(conn, position)
            return position
        return Position(published, window_end, after_id)

    async def _save(self, conn: asyncpg.Connection, position: Position) -> None:
        await conn.execute(_SAVE, self.table.name, position.published, position.window_end, position.after_id)

    async def _publish_round(self, conn: asyncpg.Connection, position: Position) -> tuple[int, Position]:
        """Publish the next rows after `position`; return how many, and the position after them
        (not saved yet)."""
        if position.window_end is None:
            found = await conn.fetch(self._open, position.published, self.batch)
            window_end = found[0][0]
            rows = [row[1:] for row in found if row[1] is not None]
        else:
            window_end = position.window_end
            rows = await conn.fetch(
                self._continue, position.published, window_end, position.after_id, self.batch
            )
        if len(rows) < self.batch:
            after = Position(window_end)  # the window is done
        else:
            after = Position(position.published, window_end, rows[-1][0])
        if rows:
            # Any failure (an error ack, no ack in time) raises before the position moves: the rows
            # are published again later with the same ids, which JetStream dedupes.
            prefix = f"{self.service}-"  # Nats-Msg-Id = <service>-<outbox id>
            await self.bus.publish_batch(
                [(subject, payload, f"{prefix}{row_id}") for row_id, subject, payload in rows],
                timeout=self.ack_timeout_s,
            )
            metrics.OUTBOX_PUBLISHED.labels(self.service).inc(len(rows))
        return len(rows), after

    async def backlog(self) -> int:
        """Rows not published yet, by the saved position."""
        async with self.engine.connect() as conn:
            raw: asyncpg.Connection = (await conn.get_raw_connection()).driver_connection
            async with raw.transaction():
                await raw.execute(_RELAY_TURN_SETTINGS)
                saved = await raw.fetchrow(_SAVED_POSITION, self.table.name)
                return await self._count_backlog(
                    raw, Position(*saved) if saved else Position(NOTHING_PUBLISHED)
                )

    async def _count_backlog(self, conn: asyncpg.Connection, position: Position) -> int:
        """Rows `position` does not cover; `conn` plans with `_RELAY_SETTINGS`."""
        return int(
            await conn.fetchval(self._backlog, position.published, position.window_end, position.after_id)
        )

    async def purge_published(self) -> int:
        cutoff = self.clock.now() - self.retention
        async with self.engine.begin() as conn:
            result = await conn.execute(self._purge, {"name": self.table.name, "cutoff": cutoff})
        return int(result.rowcount or 0)

    async def run(self, stop: asyncio.Event) -> None:
        watcher = asyncio.create_task(self._wake_on(stop))
        try:
            await self._loop(stop)
            await self._flush()
        finally:
            watcher.cancel()
            await self._resign()

    async def _wake_on(self, stop: asyncio.Event) -> None:
        await stop.wait()
        self._wake.set()

    async def _loop(self, stop: asyncio.Event) -> None:
        woken = True
        while not stop.is_set():
            # Cleared before reading, so a notify() or stop during this round is not lost.
            self._wake.clear()
            try:
                published = await self._lead_round(woken)
                if self.leading and (self._chores_due is None or self.clock.now() >= self._chores_due):
                    await self._chores()
            except Exception:
                await self._resign()
                if stop.is_set():
                    break
                log.exception("outbox relay failed; retrying", service=self.service)
                await asyncio.sleep(0.5)
                continue
            if published == self.batch:
                continue  # more may be waiting; a partial batch was all there was when it was read
            if published:
                # Commits are frequent: let a few gather for the next round rather than run a round
                # (a read, a publish and an update) per commit.
                await asyncio.sleep(self.gather_s)
            try:
                await asyncio.wait_for(self._wake.wait(), timeout=self.poll_interval_s)
                woken = True
            except TimeoutError:
                woken = False

    async def _lead_round(self, woken: bool) -> int:
        """One round while this relay leads (0 while another does); a round that published saves
        the position after it. An empty window moves the position only in memory: nothing was
        published, so a successor that starts from the saved one finds the same."""
        conn = await self._lead(woken)
        if conn is None or self._position is None:
            return 0
        published, self._position = await self._publish_round(conn, self._position)
        if published:
            await self._save_lead()
        return published

    async def _save_lead(self) -> None:
        """Save the leader's position if it moved since last saved (a no-op when not leading)."""
        if self._conn is not None and self._position is not None and self._position != self._saved:
            await self._save(self._conn, self._position)
            self._saved = self._position

    async def _chores(self) -> None:
        """Every `chores_every`, busy or not: report the backlog and purge what is past retention."""
        self._chores_due = self.clock.now() + self.chores_every
        await self._save_lead()  # lets purge_published go as far as the relay got
        if self._conn is not None and self._position is not None:
            backlog = await self._count_backlog(self._conn, self._position)
            metrics.OUTBOX_BACKLOG.labels(self.service).set(backlog)
        await self.purge_published()

    async def _lead(self, woken: bool) -> asyncpg.Connection | None:
        """The connection to publish on while this relay leads; None while another relay leads (this
        one then wakes the leader when its own process has committed rows)."""
        if self._conn is None or self._conn.is_closed():
            self.leading = False
            self._conn = await asyncpg.connect(self._dsn, server_settings=_RELAY_SETTINGS)
        if not self.leading:
            if await self._conn.fetchval(_TAKE_LEAD, self._key):
                self._position = self._saved = await self._load(self._conn)
                self.leading = True
                await self._conn.add_listener(self._channel, self._on_notify)
                log.info("outbox relay leads", service=self.service)
            elif woken:
                await self._conn.execute(f"NOTIFY {self._channel}")
        return self._conn if self.leading else None

    def _on_notify(self, *_: object) -> None:
        self._wake.set()

    async def _resign(self) -> None:
        """Close the relay's connection, which ends its lead (PostgreSQL drops the session's locks)."""
        conn, self._conn, self.leading = self._conn, None, False
        self._position = self._saved = self._chores_due = None
        if conn is None or conn.is_closed():
            return
        try:
            await conn.close(timeout=2)
        except BaseException:
            conn.terminate()
            raise

    async def _flush(self, max_rounds: int = 20) -> None:
        """On shutdown, publish what the last calls committed, so the next start has nothing to catch up."""
        for _ in range(max_rounds):
            try:
                if await self._lead_round(True) < self.batch:
                    await self._save_lead()
                    return
            except Exception:
                log.warning(
                    "final outbox flush failed; the next relay publishes the rest", service=self.service
                )
                return
