"""Partitioned in-order consumers (`relevans.kit.bus.partitioned`) on a real NATS JetStream:
several processes share the partition durables, each partition is handled in order, and
`take_over` replaces a single legacy durable without replaying or skipping a message."""

from __future__ import annotations

import asyncio
import random
from collections.abc import AsyncIterator, Sequence

import nats
import pytest
import pytest_asyncio
from nats.aio.msg import Msg

from relevans.kit.bus import Bus, Consumer, partitioned, take_over
from relevans.kit.settings import Settings
from tests.helpers import eventually

STREAM = "RV_EVENTS"
PARTITIONS = 4


@pytest_asyncio.fixture
async def buses(settings: Settings, bus: Bus) -> AsyncIterator[list[Bus]]:
    """Two more connections besides `bus`: one per consuming "process"."""
    out = [Bus(settings.nats_url, f"process-{n}") for n in range(2)]
    for b in out:
        await b.connect()
    yield out
    for b in out:
        await b.close()


def _recorder(handled: list[tuple[int, int]], delay_ms: float = 0.0) -> object:
    async def handle(msgs: Sequence[Msg]) -> None:
        if delay_ms:
            await asyncio.sleep(random.uniform(0, delay_ms) / 1000)  # shuffles interleavings
        for m in msgs:
            partition, n = (int(x) for x in m.data.split(b":"))
            handled.append((partition, n))

    return handle


async def _running(consumers: list[Consumer]) -> tuple[asyncio.Event, list[asyncio.Task[None]]]:
    stop = asyncio.Event()
    return stop, [asyncio.create_task(c.run(stop)) for c in consumers]


async def _stop(stop: asyncio.Event, tasks: list[asyncio.Task[None]]) -> None:
    stop.set()
    await asyncio.wait_for(asyncio.gather(*tasks), 10)


def _consumers(
    bus: Bus, handled: list[tuple[int, int]], *, batch: int, delay_ms: float = 0.0
) -> list[Consumer]:
    return partitioned(
        bus,
        service="test",
        stream=STREAM,
        durable="test-events",
        subject="rv.events",
        partitions=PARTITIONS,
        handler=_recorder(handled, delay_ms),  # type: ignore[arg-type]
        batch=batch,
    )


def _by_partition(handled: list[tuple[int, int]]) -> dict[int, list[int]]:
    out: dict[int, list[int]] = {}
    for partition, n in handled:
        out.setdefault(partition, []).append(n)
    return out


async def test_two_processes_handle_every_message_once_and_each_partition_in_order(
    bus: Bus, buses: list[Bus]
) -> None:
    """Two consumer sets on the same durables, a handler that takes a random few milliseconds and
    messages published while they consume: every message is handled exactly once, each partition's
    in publish order, and both processes took part (the partitions spread over them)."""
    handled: list[tuple[int, int]] = []
    per_process: list[list[tuple[int, int]]] = [[], []]

    def consumers(n: int) -> list[Consumer]:
        out = _consumers(buses[n], per_process[n], batch=20, delay_ms=5)
        for c in out:
            record = c.handler

            async def both(msgs: Sequence[Msg], record: object = record) -> None:
                await record(msgs)  # type: ignore[operator]
                handled.extend((int(m.data.split(b":")[0]), int(m.data.split(b":")[1])) for m in msgs)

            c.handler = both
        return out

    stop, tasks = await _running(consumers(0) + consumers(1))
    total = 3000
    messages = [(p, n) for n in range(total) for p in [n % PARTITIONS]]
    for start in range(0, total, 100):
        await bus.publish_batch(
            [(f"rv.events.{p}", f"{p}:{n}".encode(), f"m-{n}") for p, n in messages[start : start + 100]]
        )

    async def all_handled() -> bool:
        return len(handled) >= total

    await eventually(all_handled, timeout=60)
    await _stop(stop, tasks)
    assert sorted(handled) == sorted(messages)  # each exactly once
    for partition, numbers in _by_partition(handled).items():
        assert numbers == sorted(numbers), f"partition {partition} out of order"
    assert all(per_process), "one process handled nothing"


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
    successors = _consumers(bus, handled, batch=5)
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
