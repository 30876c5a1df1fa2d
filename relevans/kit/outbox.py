"""The transactional outbox (DESIGN §3).

A service writes its bus messages into its own `outbox` table in the same
transaction as the state change; the relay publishes them with
`Nats-Msg-Id = <service>-<outbox id>`, so a relay that dies after publishing
and before marking the rows re-publishes the same ids and JetStream drops the
duplicates. Published rows are kept for `retention` so they can be replayed.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta

import asyncpg
import sqlalchemy as sa
import structlog
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from relevans.kit import metrics
from relevans.kit.bus import Bus
from relevans.kit.clock import Clock

log = structlog.get_logger(__name__)


def outbox_table(metadata: sa.MetaData) -> sa.Table:
    """The outbox table, declared in each service's own metadata and migrations."""
    return sa.Table(
        "outbox",
        metadata,
        sa.Column("id", sa.BigInteger, sa.Identity(), primary_key=True),
        sa.Column("subject", sa.Text, nullable=False),
        sa.Column("payload", sa.LargeBinary, nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("published_at", sa.DateTime(timezone=True)),
        sa.Index("outbox_unpublished", "id", postgresql_where=sa.text("published_at IS NULL")),
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


class OutboxRelay:
    """Publishes outbox rows in id order. Any number of relays may share a table, but one publishes
    at a time, because two relays publishing different batches at once could publish one profile's
    messages out of order.

    A running relay (`run`) leads: it holds a session advisory lock on a connection of its own for as
    long as it runs, and reads and marks rows on it without a transaction, two statements a round.
    The others stand by, try to take the lead every poll interval (so one takes over within it when
    the leader stops or its connection drops), and pass their own process's commits on to the leader
    with a PostgreSQL `NOTIFY`. `relay_once` publishes one round in a turn of its own (a transaction
    holding the same lock), for tools and tests.
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
        self._wake = asyncio.Event()
        self._key = f"outbox:{table.name}"
        self._channel = f"relevans_outbox_{table.name}"
        self._read = (
            f"SELECT id, subject, payload FROM {table.name} WHERE published_at IS NULL ORDER BY id LIMIT $1"
        )
        self._mark = f"UPDATE {table.name} SET published_at = $2 WHERE id = ANY($1::bigint[])"
        self._dsn = engine.url.set(drivername="postgresql").render_as_string(hide_password=False)
        self._conn: asyncpg.Connection | None = None  # the relay's own connection, while it runs
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
                return await self._publish_round(raw)

    async def _publish_round(self, conn: asyncpg.Connection) -> int:
        rows = await conn.fetch(self._read, self.batch)
        if not rows:
            return 0
        # Any failure (an error ack, no ack in time) raises before the rows are marked: they are
        # published again later with the same ids, which JetStream dedupes.
        prefix = f"{self.service}-"  # Nats-Msg-Id = <service>-<outbox id>
        await self.bus.publish_batch(
            [(subject, payload, f"{prefix}{row_id}") for row_id, subject, payload in rows],
            timeout=self.ack_timeout_s,
        )
        await self._mark_published(conn, [row_id for row_id, _, _ in rows])
        metrics.OUTBOX_PUBLISHED.labels(self.service).inc(len(rows))
        return len(rows)

    async def _mark_published(self, conn: asyncpg.Connection, ids: list[int]) -> None:
        await conn.execute(self._mark, ids, self.clock.now())

    async def backlog(self) -> int:
        async with self.engine.connect() as conn:
            count = await conn.scalar(
                sa.select(sa.func.count()).select_from(self.table).where(self.table.c.published_at.is_(None))
            )
        return int(count or 0)

    async def purge_published(self) -> int:
        cutoff = self.clock.now() - self.retention
        async with self.engine.begin() as conn:
            result = await conn.execute(self.table.delete().where(self.table.c.published_at < cutoff))
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
        idle_rounds = 0
        woken = True
        while not stop.is_set():
            # Cleared before reading, so a notify() or stop during this round is not lost.
            self._wake.clear()
            try:
                conn = await self._lead(woken)
                published = await self._publish_round(conn) if conn is not None else 0
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
                # (two statements and a publish) per commit.
                await asyncio.sleep(self.gather_s)
            elif self.leading:
                idle_rounds += 1
                if idle_rounds % 200 == 1:
                    metrics.OUTBOX_BACKLOG.labels(self.service).set(await self.backlog())
                    await self.purge_published()
            try:
                await asyncio.wait_for(self._wake.wait(), timeout=self.poll_interval_s)
                woken = True
            except TimeoutError:
                woken = False

    async def _lead(self, woken: bool) -> asyncpg.Connection | None:
        """The connection to publish on while this relay leads; None while another relay leads (this
        one then wakes the leader when its own process has committed rows)."""
        if self._conn is None or self._conn.is_closed():
            self.leading = False
            self._conn = await asyncpg.connect(self._dsn)
        if not self.leading:
            if await self._conn.fetchval(_TAKE_LEAD, self._key):
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
                conn = await self._lead(True)
                if conn is None or await self._publish_round(conn) < self.batch:
                    return
            except Exception:
                log.warning(
                    "final outbox flush failed; the next relay publishes the rest", service=self.service
                )
                return
