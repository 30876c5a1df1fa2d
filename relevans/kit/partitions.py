"""Exclusive ownership of partitions among a service's processes, through PostgreSQL advisory locks.

A process handles partition `p` only while it holds the session-level advisory lock
`(namespace, p)` on one connection of its own, taken from the service's engine and kept open for
the process's life. The locks go with the session: a process that stops closes the connection and
releases them at once; one that dies, even by `kill -9`, loses them when its PostgreSQL backend
notices the closed socket (at once for a local process, since the kernel closes it; after the TCP
keepalive timeout if the host itself vanished). Until then its partitions stay unhandled, never
handled twice.

Members: every process also holds one lock `(member_namespace, slot)`, on the first free slot of
0..MAX_MEMBERS-1, so the number of live processes is the number of granted locks of that
namespace. Every `rebalance_interval` seconds (real time) a process aims at
`ceil(partitions / members)` partitions: it takes free ones while it holds fewer, starting from an
offset of its own so processes do not all reach for the same ones, and gives one up while it holds
more, its consumer stopped first (the kit's `Consumer` acks or hands over everything it fetched
before it returns), so the next holder continues where it ended, in order.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
from collections.abc import Awaitable, Callable, Sequence

import structlog
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

log = structlog.get_logger(__name__)

MAX_MEMBERS = 256
PartitionWorker = Callable[[asyncio.Event], Awaitable[None]]

# pg_locks shows an advisory lock taken with two int keys as classid = key1, objid = key2 (both
# oid, so the keys must be non-negative to compare as given) and objsubid = 2 (1 for one bigint).
# Advisory locks are per database; pg_locks lists the whole cluster's.
_GRANTED = text(
    "SELECT classid::bigint AS ns, objid::bigint AS key FROM pg_locks"
    " WHERE locktype = 'advisory' AND granted AND objsubid = 2"
    " AND database = (SELECT oid FROM pg_database WHERE datname = current_database())"
    " AND classid IN (CAST(:ns AS bigint)::oid, CAST(:members AS bigint)::oid)"
)
_TRY_LOCK = text("SELECT pg_try_advisory_lock(:ns, :key)")
_UNLOCK = text("SELECT pg_advisory_unlock(:ns, :key)")


class PartitionLeases:
    """Runs `workers[p]` (a consume loop until its event is set) while this process holds `p`."""

    def __init__(
        self,
        engine: AsyncEngine,
        workers: Sequence[PartitionWorker],
        *,
        namespace: int,
        member_namespace: int,
        rebalance_interval: float = 1.0,
        name: str = "partitions",
    ) -> None:
        for ns in (namespace, member_namespace):
            if not 0 <= ns < 2**31:
                raise ValueError(f"lock namespace {ns} must be a non-negative 32-bit int")
        if namespace == member_namespace:
            raise ValueError("partitions and members need different lock namespaces")
        self.engine = engine
        self.workers = list(workers)
        self.namespace = namespace
        self.member_namespace = member_namespace
        self.rebalance_interval = rebalance_interval
        self.name = name
        self._conn: AsyncConnection | None = None
        self._slot: int | None = None
        self._running: dict[int, tuple[asyncio.Event, asyncio.Task[None]]] = {}

    def held(self) -> frozenset[int]:
        """The partitions this process holds now."""
        return frozenset(self._running)

    async def run(self, stop: asyncio.Event) -> None:
        """Rebalance until `stop`, then stop every partition's worker and release the locks."""
        try:
            while not stop.is_set():
                try:
                    await self._rebalance()
                except Exception:
                    # The connection may be gone, and the locks with it: stop handling at once.
                    log.warning("partition leases lost; rejoining", leases=self.name, exc_info=True)
                    await self._stop_all()
                    await self.close()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), self.rebalance_interval)
            await self._stop_all()
        finally:
            for _, task in self._running.values():
                task.cancel()
            await asyncio.gather(*(task for _, task in self._running.values()), return_exceptions=True)
            self._running.clear()
            await self.close()

    async def close(self) -> None:
        """Release every lock by closing the connection (the session ends). Safe to call twice."""
        conn, self._conn, self._slot = self._conn, None, None
        if conn is None:
            return
        with contextlib.suppress(Exception):  # a broken connection is closed all the same
            await conn.invalidate()  # closed, not returned to the pool with the locks still held
        with contextlib.suppress(Exception):
            await conn.close()

    async def _rebalance(self) -> None:
        conn = await self._connection()
        rows = (await conn.execute(_GRANTED, {"ns": self.namespace, "members": self.member_namespace})).all()
        members = sum(1 for ns, _ in rows if ns == self.member_namespace)
        taken = {key for ns, key in rows if ns == self.namespace}
        partitions = len(self.workers)
        target = math.ceil(partitions / max(members, 1))
        offset = ((self._slot or 0) * target) % partitions if partitions else 0
        order = [(offset + n) % partitions for n in range(partitions)]
        if len(self._running) < target:
            for p in order:
                if len(self._running) >= target:
                    break
                if p in self._running or p in taken:
                    continue
                if await self._try_lock(conn, self.namespace, p):
                    self._start(p)
        elif len(self._running) > target:
            p = max(self._running, key=order.index)  # the one farthest from this process's offset
            await self._stop(p)
            await conn.execute(_UNLOCK, {"ns": self.namespace, "key": p})
            log.info("partition released", leases=self.name, partition=p, members=members)

    async def _connection(self) -> AsyncConnection:
        """The leases' own connection, joined as a member (on a free slot) when new."""
        if self._conn is not None:
            return self._conn
        conn = await self.engine.connect()
        try:
            conn = await conn.execution_options(isolation_level="AUTOCOMMIT")
            rows = (
                await conn.execute(_GRANTED, {"ns": self.namespace, "members": self.member_namespace})
            ).all()
            used = {key for ns, key in rows if ns == self.member_namespace}
            for slot in range(MAX_MEMBERS):
                if slot not in used and await self._try_lock(conn, self.member_namespace, slot):
                    break
            else:
                raise RuntimeError(f"more than {MAX_MEMBERS} processes hold {self.name} leases")
        except BaseException:
            await conn.invalidate()
            await conn.close()
            raise
        self._conn, self._slot = conn, slot
        log.info("partition leases joined", leases=self.name, slot=slot)
        return conn

    @staticmethod
    async def _try_lock(conn: AsyncConnection, ns: int, key: int) -> bool:
        return bool((await conn.execute(_TRY_LOCK, {"ns": ns, "key": key})).scalar_one())

    def _start(self, p: int) -> None:
        stop = asyncio.Event()
        task = asyncio.create_task(self._work(p, stop), name=f"{self.name}-{p}")
        self._running[p] = (stop, task)
        log.info("partition taken", leases=self.name, partition=p)

    async def _work(self, p: int, stop: asyncio.Event) -> None:
        """Partition `p`'s worker, restarted after a crash while `p` is held (as ServiceHost does)."""
        while not stop.is_set():
            try:
                await self.workers[p](stop)
                return
            except Exception:
                log.exception("partition worker crashed; restarting", leases=self.name, partition=p)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), 1.0)

    async def _stop(self, p: int) -> None:
        stop, task = self._running[p]
        stop.set()
        try:
            await task
        finally:
            del self._running[p]

    async def _stop_all(self) -> None:
        for stop, _ in self._running.values():
            stop.set()
        await asyncio.gather(*(task for _, task in self._running.values()), return_exceptions=True)
        self._running.clear()
