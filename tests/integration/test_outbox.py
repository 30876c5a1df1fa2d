"""The outbox relay against real PostgreSQL and NATS: at-least-once publishing, exactly-once effects."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from datetime import timedelta

import asyncpg
import nats
import pytest
import pytest_asyncio
import sqlalchemy as sa
from alembic import command
from sqlalchemy import Connection
from sqlalchemy.ext.asyncio import AsyncEngine

from relevans.kit.bus import Bus, PublishError
from relevans.kit.clock import ManualClock
from relevans.kit.db import alembic_config, create_engine
from relevans.kit.outbox import (
    _RELAY_TURN_SETTINGS,
    OutboxMessage,
    OutboxRelay,
    Position,
    enqueue,
    outbox_table,
)
from relevans.kit.settings import Settings
from tests.helpers import eventually
from tests.helpers.plans import explain, rows_read

metadata = sa.MetaData()
outbox = outbox_table(metadata)


class RelayCrash(Exception):
    pass


class CrashingRelay(OutboxRelay):
    """Publishes, then dies before it can save how far it got."""

    async def _save(self, conn: asyncpg.Connection, position: Position) -> None:
        raise RelayCrash


@pytest_asyncio.fixture
async def engine(settings: Settings) -> AsyncIterator[AsyncEngine]:
    engine = create_engine(settings.database_url("trigger"))
    async with engine.begin() as conn:
        await conn.execute(sa.text("DROP TABLE IF EXISTS outbox, outbox_relay"))
        await conn.run_sync(metadata.create_all)
    yield engine
    await engine.dispose()


async def commit(engine: AsyncEngine, clock: ManualClock, *payloads: bytes) -> None:
    """One transaction enqueueing a message on rv.profile.test per payload."""
    async with engine.begin() as conn:
        await enqueue(conn, outbox, [OutboxMessage("rv.profile.test", p) for p in payloads], clock.now())


async def stream_messages(bus: Bus, stream: str) -> int:
    info = await bus.js.stream_info(stream)
    return int(info.state.messages)


async def test_relay_publishes_committed_rows_once_in_order(
    engine: AsyncEngine, bus: Bus, clock: ManualClock
) -> None:
    await commit(engine, clock, *(f"m{i}".encode() for i in range(5)))
    relay = OutboxRelay(engine, outbox, bus, service="t", clock=clock)
    assert await relay.relay_once() == 5
    assert await relay.relay_once() == 0
    assert await relay.backlog() == 0
    sub = await bus.js.pull_subscribe("rv.profile.test", durable="reader", stream="RV_PROFILE")
    msgs = await sub.fetch(10, timeout=2)
    assert [m.data for m in msgs] == [f"m{i}".encode() for i in range(5)]
    assert all(m.headers and m.headers["Nats-Msg-Id"].startswith("t-") for m in msgs)


class SlowBus(Bus):
    """A bus whose batches leave a while after the relay read them (a slow network, a GC pause)."""

    async def publish_batch(self, messages: Sequence[tuple[str, bytes, str]], timeout: float = 5.0) -> None:
        await asyncio.sleep(0.3)
        await super().publish_batch(messages, timeout)


async def test_a_transaction_that_commits_after_later_rows_were_published_is_published_next(
    engine: AsyncEngine, bus: Bus, clock: ManualClock
) -> None:
    """The relay keeps a position, not a mark per row: rows with lower ids that commit after higher
    ones were published are not skipped."""
    async with engine.connect() as slow:
        slow_tx = await slow.begin()
        await enqueue(slow, outbox, [OutboxMessage("rv.profile.test", b"lower id")], clock.now())
        await commit(engine, clock, b"higher id")
        relay = OutboxRelay(engine, outbox, bus, service="t", clock=clock)
        assert await relay.relay_once() == 1
        assert await relay.backlog() == 0  # the uncommitted row is not counted yet
        await slow_tx.commit()
    assert await relay.backlog() == 1
    assert await relay.relay_once() == 1
    assert await relay.relay_once() == 0
    assert await relay.backlog() == 0
    sub = await bus.js.pull_subscribe("rv.profile.test", durable="reader", stream="RV_PROFILE")
    assert [m.data for m in await sub.fetch(10, timeout=2)] == [b"higher id", b"lower id"]


async def test_the_backlog_is_counted_from_the_unpublished_rows_alone(
    engine: AsyncEngine, bus: Bus, clock: ManualClock
) -> None:
    """The relay counts its backlog every few seconds while it leads: counting it by reading every
    kept row (a day of events) would stall publishing for as long as that takes."""
    relay = OutboxRelay(engine, outbox, bus, service="t", clock=clock)
    for i in range(40):  # rows of many transactions, published, as a day of ingest leaves them
        await commit(engine, clock, *(f"old {i}-{j}".encode() for j in range(25)))
    while await relay.relay_once():
        pass
    async with engine.begin() as conn:
        await conn.execute(sa.text("ANALYZE outbox"))
    await commit(engine, clock, b"new 1", b"new 2")
    await commit(engine, clock, b"new 3")
    assert await relay.backlog() == 3

    async with engine.connect() as conn:
        raw: asyncpg.Connection = (await conn.get_raw_connection()).driver_connection
        published = await raw.fetchval("SELECT published FROM outbox_relay WHERE outbox = 'outbox'")
        plan = await explain(raw, relay._backlog, (published, None, 0), setup=_RELAY_TURN_SETTINGS)
    assert rows_read(plan) <= 3 + 1  # the count's own row


async def test_a_position_ahead_of_the_database_publishes_every_kept_row_again(
    engine: AsyncEngine, bus: Bus, clock: ManualClock
) -> None:
    """After a logical restore into another cluster the saved position can be ahead of the new
    cluster's transaction ids: taken as it is, it would pass every new row for published."""
    async with engine.begin() as conn:
        await conn.execute(
            sa.text("INSERT INTO outbox_relay (outbox, published) VALUES ('outbox', '900000000:900000000:')")
        )
        await enqueue(conn, outbox, [OutboxMessage("rv.profile.test", b"after restore")], clock.now())
    relay = OutboxRelay(engine, outbox, bus, service="t", clock=clock)
    assert await relay.relay_once() == 1
    assert await relay.relay_once() == 0
    sub = await bus.js.pull_subscribe("rv.profile.test", durable="reader", stream="RV_PROFILE")
    assert [m.data for m in await sub.fetch(10, timeout=2)] == [b"after restore"]


async def test_migrating_to_the_relay_position_keeps_published_rows_published(
    settings: Settings, bus: Bus, clock: ManualClock
) -> None:
    engine = create_engine(settings.database_url("profile"))
    try:
        async with engine.begin() as conn:
            await conn.run_sync(_alembic, "downgrade", "0005")
            await conn.execute(
                sa.text(
                    "INSERT INTO outbox (subject, payload, created_at, published_at) VALUES"
                    " ('rv.profile.test', 'old', now(), now()), ('rv.profile.test', 'new', now(), NULL)"
                )
            )
            await conn.run_sync(_alembic, "upgrade", "head")
        relay = OutboxRelay(engine, outbox, bus, service="t", clock=clock)
        assert await relay.backlog() == 1
        assert await relay.relay_once() == 1
        async with engine.begin() as conn:
            await enqueue(conn, outbox, [OutboxMessage("rv.profile.test", b"newer")], clock.now())
        async with engine.begin() as conn:
            await conn.run_sync(_alembic, "downgrade", "0005")
            unpublished = await conn.scalars(sa.text("SELECT payload FROM outbox WHERE published_at IS NULL"))
            assert list(unpublished) == [b"newer"]
        sub = await bus.js.pull_subscribe("rv.profile.test", durable="reader", stream="RV_PROFILE")
        assert [m.data for m in await sub.fetch(10, timeout=2)] == [b"new"]
    finally:
        await engine.dispose()


def _alembic(conn: Connection, direction: str, revision: str) -> None:
    cfg = alembic_config("profile")
    cfg.attributes["connection"] = conn
    getattr(command, direction)(cfg, revision)


async def test_relays_sharing_a_table_take_turns_and_keep_the_order(
    engine: AsyncEngine, bus: Bus, clock: ManualClock, settings: Settings
) -> None:
    await commit(engine, clock, *(f"m{i}".encode() for i in range(10)))
    slow_bus = SlowBus(settings.nats_url, "outbox-test-slow")
    await slow_bus.connect()
    try:
        slow = OutboxRelay(engine, outbox, slow_bus, service="t", clock=clock, batch=5)
        fast = OutboxRelay(engine, outbox, bus, service="t", clock=clock, batch=5)
        slow_round = asyncio.create_task(slow.relay_once())
        await asyncio.sleep(0.1)  # the slow relay holds the first five rows
        assert await fast.relay_once() == 0  # not its turn: publishing 5-9 now would overtake 0-4
        assert await slow_round == 5
        assert await fast.relay_once() == 5
    finally:
        await slow_bus.close()
    sub = await bus.js.pull_subscribe("rv.profile.test", durable="reader", stream="RV_PROFILE")
    msgs = await sub.fetch(20, timeout=2)
    assert [m.data for m in msgs] == [f"m{i}".encode() for i in range(10)]


async def test_one_running_relay_leads_the_others_wake_it_and_take_over_when_it_stops(
    engine: AsyncEngine, bus: Bus, clock: ManualClock
) -> None:
    async def published() -> list[bytes]:
        sub = await bus.js.pull_subscribe("rv.profile.test", stream="RV_PROFILE")
        try:
            return [m.data for m in await sub.fetch(20, timeout=1)]
        except nats.errors.TimeoutError:
            return []
        finally:
            await sub.unsubscribe()

    first = OutboxRelay(engine, outbox, bus, service="t", clock=clock, poll_interval_s=60)
    standby = OutboxRelay(engine, outbox, bus, service="t", clock=clock, poll_interval_s=0.05)
    stop_first, stop_standby = asyncio.Event(), asyncio.Event()
    leading = asyncio.create_task(first.run(stop_first))
    await eventually(lambda: _true(first.leading))
    standing_by = asyncio.create_task(standby.run(stop_standby))
    try:
        await commit(engine, clock, b"a", b"b")
        standby.notify()  # its process committed: the leader, polling only every minute, is woken
        assert await eventually(published) == [b"a", b"b"]
        assert not standby.leading
        assert await standby.relay_once() == 0  # no turn of its own while another relay leads

        stop_first.set()
        await asyncio.wait_for(leading, 5)
        await eventually(lambda: _true(standby.leading))
        await commit(engine, clock, b"c")
        standby.notify()
        assert await eventually(lambda: _has(published, 3)) == [b"a", b"b", b"c"]
    finally:
        stop_first.set()
        stop_standby.set()
        await asyncio.wait_for(asyncio.gather(leading, standing_by), 5)
    assert not standby.leading
    assert await first.relay_once() == 0  # nothing left, and the lead is free again for a turn


async def _true(value: bool) -> bool:
    return value


async def _has(probe: Callable[[], Awaitable[list[bytes]]], n: int) -> list[bytes]:
    got = await probe()
    return got if len(got) >= n else []


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
    await commit(engine, clock, b"once")
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
    await commit(engine, clock, b"x")
    relay = OutboxRelay(engine, outbox, bus, service="t", clock=clock, retention=timedelta(hours=1))
    await relay.relay_once()
    assert await relay.purge_published() == 0
    await clock.advance(timedelta(hours=1, seconds=1))
    assert await relay.purge_published() == 1


async def test_a_relay_that_publishes_every_round_still_purges_what_is_past_retention(
    engine: AsyncEngine, bus: Bus, clock: ManualClock
) -> None:
    async def kept() -> list[bytes]:
        async with engine.connect() as conn:
            return list(await conn.scalars(sa.text("SELECT payload FROM outbox ORDER BY id")))

    async def published(n: int) -> bool:
        return await stream_messages(bus, "RV_PROFILE") >= n

    relay = OutboxRelay(
        engine, outbox, bus, service="t", clock=clock, retention=timedelta(hours=1), poll_interval_s=60
    )
    stop = asyncio.Event()
    running = asyncio.create_task(relay.run(stop))
    try:
        await commit(engine, clock, b"old")
        relay.notify()
        await eventually(lambda: published(1))
        await clock.advance(timedelta(hours=2))
        await commit(engine, clock, b"new")
        relay.notify()  # a round that publishes, and is due to purge
        await eventually(lambda: published(2))
        assert await eventually(lambda: _only(kept, [b"new"])) == [b"new"]
    finally:
        stop.set()
        await asyncio.wait_for(running, 5)


async def _only(probe: Callable[[], Awaitable[list[bytes]]], expected: list[bytes]) -> list[bytes]:
    got = await probe()
    return got if got == expected else []


async def test_relay_flushes_committed_rows_when_stopped(
    engine: AsyncEngine, bus: Bus, clock: ManualClock
) -> None:
    relay = OutboxRelay(engine, outbox, bus, service="t", clock=clock, poll_interval_s=60)
    stop = asyncio.Event()
    running = asyncio.create_task(relay.run(stop))
    await asyncio.sleep(0)  # the relay is now idle, waiting for a notify or its poll interval
    await commit(engine, clock, b"late")
    stop.set()
    await asyncio.wait_for(running, 5)
    assert await stream_messages(bus, "RV_PROFILE") == 1


async def test_batch_whose_ack_reports_an_error_is_not_marked_published(
    engine: AsyncEngine, bus: Bus, clock: ManualClock
) -> None:
    """JetStream refuses the second message (too large for its stream): the whole batch stays unpublished."""
    await bus.js.add_stream(name="RELAY_SMALL", subjects=["relay.small"], max_msg_size=64)
    try:
        async with engine.begin() as conn:
            messages = [OutboxMessage("relay.small", b"ok"), OutboxMessage("relay.small", b"x" * 500)]
            await enqueue(conn, outbox, messages, clock.now())
        relay = OutboxRelay(engine, outbox, bus, service="t", clock=clock)
        with pytest.raises(PublishError, match="JetStream error"):
            await relay.relay_once()
        assert await relay.backlog() == 2
        # Published again on the next round; the first message is deduplicated by its Msg-Id.
        with pytest.raises(PublishError):
            await relay.relay_once()
        assert await stream_messages(bus, "RELAY_SMALL") == 1
        assert await relay.backlog() == 2
    finally:
        await bus.js.delete_stream("RELAY_SMALL")


async def test_subject_without_a_stream_fails_the_batch_at_once(
    engine: AsyncEngine, bus: Bus, clock: ManualClock
) -> None:
    async with engine.begin() as conn:
        await enqueue(conn, outbox, [OutboxMessage("relay.nowhere", b"x")], clock.now())
    relay = OutboxRelay(engine, outbox, bus, service="t", clock=clock, ack_timeout_s=30)
    started = time.monotonic()
    with pytest.raises(PublishError, match="no responders"):
        await relay.relay_once()
    assert time.monotonic() - started < 5
    assert await relay.backlog() == 1


async def test_missing_ack_fails_the_batch_after_the_timeout(
    engine: AsyncEngine, bus: Bus, clock: ManualClock
) -> None:
    """A subscriber that is not a stream never acks: the batch times out instead of hanging."""
    nc = await nats.connect(bus.url)
    try:
        await nc.subscribe("relay.void")
        await nc.flush()
        async with engine.begin() as conn:
            await enqueue(conn, outbox, [OutboxMessage("relay.void", b"x")], clock.now())
        relay = OutboxRelay(engine, outbox, bus, service="t", clock=clock, ack_timeout_s=0.3)
        with pytest.raises(PublishError, match="not acknowledged"):
            await asyncio.wait_for(relay.relay_once(), 5)
        assert await relay.backlog() == 1
    finally:
        await nc.close()


class FlakyProxy:
    """A TCP proxy in front of NATS that can cut its connections or swallow what the server sends."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.swallow_replies = False
        self._writers: list[asyncio.StreamWriter] = []
        self._server: asyncio.Server | None = None
        self.port = 0

    async def __aenter__(self) -> FlakyProxy:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None
        self._server.close()
        self.cut()

    def refuse(self) -> None:
        """Stop accepting connections and cut the open ones: the client stays reconnecting."""
        assert self._server is not None
        self._server.close()
        self.cut()

    def cut(self) -> None:
        for writer in self._writers:
            writer.close()
        self._writers.clear()

    async def _accept(self, client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        server_r, server_w = await asyncio.open_connection("127.0.0.1", self.target_port)
        self._writers += [client_w, server_w]
        await asyncio.gather(
            self._pump(client_r, server_w, from_server=False),
            self._pump(server_r, client_w, from_server=True),
            return_exceptions=True,
        )

    async def _pump(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, *, from_server: bool
    ) -> None:
        with contextlib.suppress(OSError):
            while data := await reader.read(65536):
                if not (from_server and self.swallow_replies):
                    writer.write(data)
                    await writer.drain()
        writer.close()


async def test_relay_survives_a_reconnect_and_a_lost_ack_times_out(
    engine: AsyncEngine, clock: ManualClock, settings: Settings
) -> None:
    async with FlakyProxy(int(settings.nats_url.rsplit(":", 1)[1])) as proxy:
        bus = Bus(f"nats://127.0.0.1:{proxy.port}", "flaky")
        await bus.connect()
        try:
            await bus.ensure_streams()
            relay = OutboxRelay(engine, outbox, bus, service="t", clock=clock, ack_timeout_s=0.5)
            await commit(engine, clock, b"before")
            assert await relay.relay_once() == 1

            async def reconnected(count: int) -> bool:
                return bus.nc.is_connected and bus.nc.stats["reconnects"] >= count

            # The connection drops: nats-py reconnects and re-subscribes the ack inbox.
            proxy.cut()
            await eventually(lambda: reconnected(1))
            await commit(engine, clock, b"after reconnect")
            assert await relay.relay_once() == 1

            # The acks of a batch are lost: it fails within the timeout and stays unpublished.
            proxy.swallow_replies = True
            await commit(engine, clock, b"ack lost")
            with pytest.raises(PublishError):
                await asyncio.wait_for(relay.relay_once(), 5)
            assert await relay.backlog() == 1
            proxy.swallow_replies = False
            proxy.cut()
            await eventually(lambda: reconnected(2))
            assert await relay.relay_once() == 1
            assert await relay.backlog() == 0
            assert await stream_messages(bus, "RV_PROFILE") == 3
        finally:
            await bus.close()


async def test_publishing_while_reconnecting_buffers_at_most_the_clients_limit(settings: Settings) -> None:
    async with FlakyProxy(int(settings.nats_url.rsplit(":", 1)[1])) as proxy:
        bus = Bus(f"nats://127.0.0.1:{proxy.port}", "flaky")
        await bus.connect()
        try:
            await bus.ensure_streams()

            async def disconnected() -> bool:
                return not bus.nc.is_connected

            proxy.refuse()
            await eventually(disconnected)
            batch = [("rv.profile.test", b"x" * 100_000, f"m{i}") for i in range(8)]  # 800 kB a try
            failures = []
            for _ in range(4):  # the client's limit is 2 MiB: the third try no longer fits
                with pytest.raises(PublishError) as caught:
                    await bus.publish_batch(batch, timeout=0.1)
                failures.append(str(caught.value))
            assert "not acknowledged" in failures[0]
            assert "outbound buffer is full" in failures[-1]
        finally:
            await bus.close()
