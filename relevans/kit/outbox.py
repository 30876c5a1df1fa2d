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

import sqlalchemy as sa
import structlog
from sqlalchemy.dialects import postgresql
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

_TAKE_TURN = sa.text("SELECT pg_try_advisory_xact_lock(hashtextextended(:key, 0))")


class OutboxRelay:
    """Publishes outbox rows in id order. Any number of relays may share a table: they take turns
    (a transaction-scoped advisory lock per table), because two relays publishing different batches
    at once could publish one profile's messages out of order."""

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
        self._wake = asyncio.Event()

    def notify(self) -> None:
        """Wake the relay now: a transaction that wrote to the outbox has committed."""
        self._wake.set()

    async def relay_once(self) -> int:
        """Publish one batch; return how many rows were published."""
        t = self.table
        async with self.engine.begin() as conn:
            # The turn keeps relays apart, so the rows need no row locks (locking each cost PostgreSQL
            # as much as reading it).
            if not await conn.scalar(_TAKE_TURN, {"key": f"outbox:{t.name}"}):
                return 0  # another relay is publishing; this one polls again
            rows = (
                await conn.execute(
                    sa.select(t.c.id, t.c.subject, t.c.payload)
                    .where(t.c.published_at.is_(None))
                    .order_by(t.c.id)
                    .limit(self.batch)
                )
            ).all()
            if not rows:
                return 0
            # Any failure (an error ack, no ack in time) raises: the transaction rolls back and
            # the rows are published again later with the same ids, which JetStream dedupes.
            prefix = f"{self.service}-"  # Nats-Msg-Id = <service>-<outbox id>
            await self.bus.publish_batch(
                [(subject, payload, f"{prefix}{row_id}") for row_id, subject, payload in rows],
                timeout=self.ack_timeout_s,
            )
            await self._mark_published(conn, [row_id for row_id, _, _ in rows])
        metrics.OUTBOX_PUBLISHED.labels(self.service).inc(len(rows))
        return len(rows)

    async def _mark_published(self, conn: AsyncConnection, ids: list[int]) -> None:
        # One array parameter, not one bind parameter per id.
        t = self.table
        ids_param = sa.bindparam("ids", ids, type_=postgresql.ARRAY(sa.BigInteger))
        now = self.clock.now()
        await conn.execute(t.update().where(t.c.id == sa.any_(ids_param)).values(published_at=now))

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
        finally:
            watcher.cancel()
        await self._flush()

    async def _wake_on(self, stop: asyncio.Event) -> None:
        await stop.wait()
        self._wake.set()

    async def _loop(self, stop: asyncio.Event) -> None:
        idle_rounds = 0
        while not stop.is_set():
            # Cleared before reading, so a notify() or stop during this round is not lost.
            self._wake.clear()
            try:
                published = await self.relay_once()
            except Exception:
                if stop.is_set():
                    break
                log.exception("outbox relay failed; retrying", service=self.service)
                await asyncio.sleep(0.5)
                continue
            if published:
                continue
            idle_rounds += 1
            if idle_rounds % 200 == 1:
                metrics.OUTBOX_BACKLOG.labels(self.service).set(await self.backlog())
                await self.purge_published()
            try:
                await asyncio.wait_for(self._wake.wait(), timeout=self.poll_interval_s)
            except TimeoutError:
                pass

    async def _flush(self, max_rounds: int = 20) -> None:
        """On shutdown, publish what the last calls committed, so the next start has nothing to catch up."""
        for _ in range(max_rounds):
            try:
                if await self.relay_once() == 0:
                    return
            except Exception:
                log.warning(
                    "final outbox flush failed; the next relay publishes the rest", service=self.service
                )
                return
