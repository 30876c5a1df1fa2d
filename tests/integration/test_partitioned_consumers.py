"""Partitioned consumers (`relevans.kit.bus.partitioned`) under partition leases
(`relevans.kit.partitions.PartitionLeases`) on a real PostgreSQL and NATS JetStream: processes
share the partitions, one at a time per partition, each partition is handled in order, and
`take_over` replaces a single legacy durable without replaying or skipping a message."""

from __future__ import annotations

import asyncio
import random
from collections.abc import AsyncIterator, Sequence

import nats
import pytest
import pytest_asyncio
from nats.aio.msg import Msg
from sqlalchemy import text

from relevans.kit.bus import Bus, Consumer, partitioned, take_over
from relevans.kit.db import create_engine
from relevans.kit.partitions import PartitionLeases
from relevans.kit.settings import Settings
from tests.helpers import eventually

STREAM = "RV_EVENTS"
PARTITIONS = 4
NAMESPACE, MEMBERS = 0x54455350, 0x5445534D  # "TESP", "TESM"
ALL = frozenset(range(PARTITIONS))


def _recorder(*into: list[tuple[int, int]], delay_ms: float = 0.0) -> object:
    async def handle(msgs: Sequence[Msg]) -> None:
        if delay_ms:
            await asyncio.sleep(random.uniform(0, delay_ms) / 1000)  # shuffles interleavings
        for m in msgs:
            partition, n = (int(x) for x in m.data.split(b":"))
            for handled in into:
                handled.append((partition, n))

    return handle


def _consumers(bus: Bus, handler: object, *, batch: int) -> list[Consumer]:
    return partitioned(
        bus,
        service="test",
        stream=STREAM,
        durable="test-events",
        subject="rv.events",
        partitions=PARTITIONS,
        handler=handler,  # type: ignore[arg-type]
        batch=batch,
    )


class Process:
    """One consuming "process": its own bus connection, engine and leases."""

    def __init__(self, settings: Settings, n: int, handled: list[tuple[int, int]]) -> None:
        self.bus = Bus(settings.nats_url, f"process-{n}")
        self.engine = create_engine(settings.database_url("trigger"), pool_size=1)
        self.handled: list[tuple[int, int]] = []
        self.handler = _recorder(handled, self.handled, delay_ms=5)
        self.stop = asyncio.Event()
        self.task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        await self.bus.connect()
        consumers = _consumers(self.bus, self.handler, batch=20)
        self.leases = PartitionLeases(
            self.engine,
            [c.run for c in consumers],
            namespace=NAMESPACE,
            member_namespace=MEMBERS,
            rebalance_interval=0.05,
        )
        self.task = asyncio.create_task(self.leases.run(self.stop))

    async def close(self) -> None:
        self.stop.set()
        if self.task is not None:
            await asyncio.wait_for(self.task, 10)
            self.task = None
        await self.leases.close()
        await self.bus.close()
        await self.engine.dispose()


@pytest_asyncio.fixture
async def processes(
    settings: Settings, bus: Bus
) -> AsyncIterator[tuple[list[Process], list[tuple[int, int]]]]:
    """Two processes and what all of them handled, in order of handling."""
    handled: list[tuple[int, int]] = []
    out = [Process(settings, n, handled) for n in range(2)]
    for p in out:
        await p.start()
    yield out, handled
    for p in out:
        await p.close()


def _by_partition(handled: list[tuple[int, int]]) -> dict[int, list[int]]:
    out: dict[int, list[int]] = {}
    for partition, n in handled:
        out.setdefault(partition, []).append(n)
    return out


async def _publish(bus: Bus, numbers: range) -> None:
    await bus.publish_batch(
        [(f"rv.events.{n % PARTITIONS}", f"{n % PARTITIONS}:{n}".encode(), f"m-{n}") for n in numbers]
    )


def _assert_once_in_order(handled: list[tuple[int, int]], total: int) -> None:
    assert sorted(handled) == sorted((n % PARTITIONS, n) for n in range(total))  # each exactly once
    for partition, numbers in _by_partition(handled).items():
        assert numbers == sorted(numbers), f"partition {partition} out of order"


async def test_two_processes_share_the_partitions_and_one_takes_all_when_the_other_stops(
    bus: Bus, processes: tuple[list[Process], list[tuple[int, int]]]
) -> None:
    """Two processes hold half the partitions each; messages published while they consume, with
    a handler that takes a random few milliseconds, are each handled exactly once and in publish
    order per partition, by both. Then one stops while a backlog is being consumed: the other takes
    every partition and goes on in order, nothing lost, nothing twice."""
    (first, second), handled = processes

    async def balanced() -> bool:
        a, b = first.leases.held(), second.leases.held()
        return len(a) == len(b) == PARTITIONS // 2 and a | b == ALL

    await eventually(balanced)
    for start in range(0, 2000, 100):
        await _publish(bus, range(start, start + 100))

    async def both_worked() -> bool:
        return bool(first.handled and second.handled)

    await eventually(both_worked, timeout=30)
    await second.close()
    assert second.leases.held() == frozenset()
    for start in range(2000, 3000, 100):
        await _publish(bus, range(start, start + 100))

    async def all_handled() -> bool:
        return len(handled) >= 3000

    await eventually(all_handled, timeout=60)
    assert first.leases.held() == ALL
    _assert_once_in_order(handled, 3000)


async def test_a_process_whose_connection_drops_stops_and_rejoins(
    settings: Settings, bus: Bus, processes: tuple[list[Process], list[tuple[int, int]]]
) -> None:
    """The server ends one process's leases session (its locks go with it): that process stops
    handling its partitions, joins again and takes its share back, and every message is handled.
    (Not necessarily once, nor in order: the other process may take a partition before the one
    that lost it has noticed.)"""
    (first, second), handled = processes

    async def balanced() -> bool:
        a, b = first.leases.held(), second.leases.held()
        return len(a) == len(b) == PARTITIONS // 2 and a | b == ALL

    await eventually(balanced)
    await _publish(bus, range(0, 500))
    admin = create_engine(settings.database_url("trigger"), pool_size=1)
    try:
        async with admin.connect() as conn:
            await conn.execute(
                text(
                    "SELECT pg_terminate_backend(pid) FROM pg_locks WHERE locktype = 'advisory'"
                    " AND classid = :ns AND objsubid = 2 AND objid = :slot"
                ),
                {"ns": MEMBERS, "slot": second.leases._slot},
            )
    finally:
        await admin.dispose()
    await _publish(bus, range(500, 1000))

    async def all_handled() -> bool:
        return len(set(handled)) >= 1000

    await eventually(all_handled, timeout=60)
    await eventually(balanced)
    assert set(handled) == {(n % PARTITIONS, n) for n in range(1000)}


async def test_take_over_starts_each_partition_right_after_the_legacy_ack_floor(bus: Bus) -> None:
    """The legacy single durable acked the first 12 of 30 messages: its partitioned successors
    handle exactly the other 18, in order per partition, and the legacy durable is gone."""
    for n in range(30):
        await bus.publish(f"rv.events.{n % PARTITIONS}", f"{n % PARTITIONS}:{n}".encode(), msg_id=f"m-{n}")
    legacy = await bus.js.pull_subscribe("rv.events.>", durable="test-events", stream=STREAM)
    msgs = await legacy.fetch(12, timeout=2)
    assert len(msgs) == 12
    for m in msgs:
        await m.ack_sync()
    await legacy.unsubscribe()

    handled: list[tuple[int, int]] = []
    successors = _consumers(bus, _recorder(handled), batch=5)
    await take_over(bus, "test-events", successors)
    with pytest.raises(nats.js.errors.NotFoundError):
        await bus.js.consumer_info(STREAM, "test-events")
    await take_over(bus, "test-events", successors)  # a second process starting later: nothing to do

    stop, tasks = await _running(successors)

    async def done() -> bool:
        return len(handled) >= 18

    await eventually(done)
    await _stop(stop, tasks)
    assert sorted(n for _, n in handled) == list(range(12, 30))
    for numbers in _by_partition(handled).values():
        assert numbers == sorted(numbers)


async def _running(consumers: list[Consumer]) -> tuple[asyncio.Event, list[asyncio.Task[None]]]:
    stop = asyncio.Event()
    return stop, [asyncio.create_task(c.run(stop)) for c in consumers]


async def _stop(stop: asyncio.Event, tasks: list[asyncio.Task[None]]) -> None:
    stop.set()
    await asyncio.wait_for(asyncio.gather(*tasks), 10)
