"""The outbox relay against real PostgreSQL and NATS: at-least-once publishing, exactly-once effects."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from datetime import timedelta

import nats
import pytest
import pytest_asyncio
import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from relevans.kit.bus import Bus
from relevans.kit.clock import ManualClock
from relevans.kit.db import create_engine
from relevans.kit.outbox import OutboxMessage, OutboxRelay, enqueue, outbox_table
from relevans.kit.settings import Settings

metadata = sa.MetaData()
outbox = outbox_table(metadata)


class RelayCrash(Exception):
    pass


class CrashingRelay(OutboxRelay):
    """Publishes, then dies before it can mark the rows as published."""

    async def _mark_published(self, conn: AsyncConnection, ids: list[int]) -> None:
        raise RelayCrash


@pytest_asyncio.fixture
async def engine(settings: Settings) -> AsyncIterator[AsyncEngine]:
    engine = create_engine(settings.database_url("trigger"))
    async with engine.begin() as conn:
        await conn.execute(sa.text("DROP TABLE IF EXISTS outbox"))
        await conn.run_sync(metadata.create_all)
    yield engine
    await engine.dispose()


@pytest_asyncio.fixture
async def bus(settings: Settings) -> AsyncIterator[Bus]:
    bus = Bus(settings.nats_url, "outbox-test")
    await bus.connect()
    await bus.ensure_streams()
    yield bus
    await bus.close()
    await bus.close()  # safe twice


async def stream_messages(bus: Bus, stream: str) -> int:
    info = await bus.js.stream_info(stream)
    return int(info.state.messages)


async def test_relay_publishes_committed_rows_once_in_order(
    engine: AsyncEngine, bus: Bus, clock: ManualClock
) -> None:
    async with engine.begin() as conn:
        await enqueue(
            conn, outbox, [OutboxMessage("rv.profile.test", f"m{i}".encode()) for i in range(5)], clock.now()
        )
    relay = OutboxRelay(engine, outbox, bus, service="t", clock=clock)
    assert await relay.relay_once() == 5
    assert await relay.relay_once() == 0
    assert await relay.backlog() == 0
    sub = await bus.js.pull_subscribe("rv.profile.test", durable="reader", stream="RV_PROFILE")
    msgs = await sub.fetch(10, timeout=2)
    assert [m.data for m in msgs] == [f"m{i}".encode() for i in range(5)]
    assert all(m.headers and m.headers["Nats-Msg-Id"].startswith("t-") for m in msgs)


async def test_rolled_back_transaction_publishes_nothing(
    engine: AsyncEngine, bus: Bus, clock: ManualClock
) -> None:
    with pytest.raises(RuntimeError):
        async with engine.begin() as conn:
            await enqueue(conn, outbox, [OutboxMessage("rv.profile.test", b"x")], clock.now())
            raise RuntimeError("state change failed")
    relay = OutboxRelay(engine, outbox, bus, service="t", clock=clock)
    assert await relay.relay_once() == 0
    assert await stream_messages(bus, "RV_PROFILE") == 0


async def test_relay_crash_after_publish_causes_no_second_message(
    engine: AsyncEngine, bus: Bus, clock: ManualClock
) -> None:
    async with engine.begin() as conn:
        await enqueue(conn, outbox, [OutboxMessage("rv.profile.test", b"once")], clock.now())
    with pytest.raises(RelayCrash):
        await CrashingRelay(engine, outbox, bus, service="t", clock=clock).relay_once()
    assert await stream_messages(bus, "RV_PROFILE") == 1
    assert await OutboxRelay(engine, outbox, bus, service="t", clock=clock).backlog() == 1

    # A new relay publishes the same row again; JetStream drops it by Nats-Msg-Id.
    assert await OutboxRelay(engine, outbox, bus, service="t", clock=clock).relay_once() == 1
    assert await stream_messages(bus, "RV_PROFILE") == 1


async def test_published_rows_are_kept_for_replay_then_purged(
    engine: AsyncEngine, bus: Bus, clock: ManualClock
) -> None:
    async with engine.begin() as conn:
        await enqueue(conn, outbox, [OutboxMessage("rv.profile.test", b"x")], clock.now())
    relay = OutboxRelay(engine, outbox, bus, service="t", clock=clock, retention=timedelta(hours=1))
    await relay.relay_once()
    assert await relay.purge_published() == 0
    await clock.advance(timedelta(hours=1, seconds=1))
    assert await relay.purge_published() == 1


async def test_relay_waits_for_unpublished_rows_of_open_transactions(
    engine: AsyncEngine, bus: Bus, clock: ManualClock
) -> None:
    """Two relays never publish the same row concurrently: rows are claimed with SKIP LOCKED."""
    async with engine.begin() as conn:
        await enqueue(conn, outbox, [OutboxMessage("rv.profile.test", b"a")], clock.now())
    first = OutboxRelay(engine, outbox, bus, service="t", clock=clock)
    second = OutboxRelay(engine, outbox, bus, service="t", clock=clock)
    async with engine.begin() as conn:
        await conn.execute(sa.select(outbox.c.id).with_for_update())
        assert await second.relay_once() == 0
    assert await first.relay_once() == 1
    nc = await nats.connect(bus.url)
    try:
        assert (await nc.jetstream().stream_info("RV_PROFILE")).state.messages == 1
    finally:
        await nc.close()


async def test_relay_flushes_committed_rows_when_stopped(
    engine: AsyncEngine, bus: Bus, clock: ManualClock
) -> None:
    relay = OutboxRelay(engine, outbox, bus, service="t", clock=clock, poll_interval_s=60)
    stop = asyncio.Event()
    running = asyncio.create_task(relay.run(stop))
    await asyncio.sleep(0)  # the relay is now idle, waiting for a notify or its poll interval
    async with engine.begin() as conn:
        await enqueue(conn, outbox, [OutboxMessage("rv.profile.test", b"late")], clock.now())
    stop.set()
    await asyncio.wait_for(running, 5)
    assert await stream_messages(bus, "RV_PROFILE") == 1
