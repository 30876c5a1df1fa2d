"""The kit's bus helpers on a real NATS JetStream: streams, dedupe, ack-after-commit consumers."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

import nats
import pytest
from nats.aio.msg import Msg

from relevans.kit.bus import STREAMS, Bus, Consumer, PublishError
from tests.helpers import eventually


async def test_ensure_streams_is_idempotent(bus: Bus) -> None:
    await bus.ensure_streams()
    await bus.ensure_streams()
    names = {s.name for s in STREAMS}
    for name in names:
        info = await bus.js.stream_info(name)
        assert info.config.duplicate_window and info.config.duplicate_window >= 600


async def test_publish_with_the_same_msg_id_is_stored_once(bus: Bus) -> None:
    for _ in range(3):
        await bus.publish("rv.profile.test", b"x", msg_id="same")
    await bus.publish("rv.profile.test", b"y", msg_id="other")
    assert (await bus.js.stream_info("RV_PROFILE")).state.messages == 2


async def _run(consumer: Consumer) -> tuple[asyncio.Event, asyncio.Task[None]]:
    stop = asyncio.Event()
    return stop, asyncio.create_task(consumer.run(stop))


async def test_publish_batch_stores_each_message_once_by_its_msg_id(bus: Bus) -> None:
    batch = [(f"rv.profile.batch.{i % 3}", f"payload-{i}".encode(), f"batch-{i}") for i in range(50)]
    await bus.publish_batch(batch)
    await bus.publish_batch(batch[:10])  # published again: JetStream drops the duplicates
    info = await bus.js.stream_info("RV_PROFILE")
    assert info.state.messages == 50
    msg = await bus.js.get_msg("RV_PROFILE", info.state.first_seq)
    assert (msg.subject, msg.data, (msg.headers or {}).get("Nats-Msg-Id")) == (
        "rv.profile.batch.0",
        b"payload-0",
        "batch-0",
    )


async def test_publish_batch_refuses_what_the_server_would_drop_the_connection_for(bus: Bus) -> None:
    too_large = b"x" * (bus.nc.max_payload + 1)
    with pytest.raises(PublishError, match="exceeds the server's limit"):
        await bus.publish_batch([("rv.profile.ok", b"small", "a"), ("rv.profile.big", too_large, "b")])
    for subject, msg_id in (("rv.profile two", "c"), ("", "d"), ("rv.profile.x", "e\r\nPUB x 1")):
        with pytest.raises(ValueError, match="cannot publish"):
            await bus.publish_batch([(subject, b"x", msg_id)])
    # nothing of a refused batch went out, and the connection still works
    await bus.publish_batch([("rv.profile.ok", b"after", "f")])
    assert (await bus.js.stream_info("RV_PROFILE")).state.messages == 1


async def test_consumer_acks_only_what_the_handler_committed(bus: Bus) -> None:
    committed: list[bytes] = []
    attempts: dict[bytes, int] = {}

    async def handler(msgs: Sequence[Msg]) -> None:
        # A poison message fails every batch it is in; the rest must still go through, once each.
        for m in msgs:
            attempts[m.data] = attempts.get(m.data, 0) + 1
        if any(m.data == b"poison" for m in msgs):
            raise RuntimeError("cannot handle")
        committed.extend(m.data for m in msgs)

    for payload in (b"a", b"poison", b"b"):
        await bus.publish("rv.profile.test", payload, msg_id=payload.decode())
    consumer = Consumer(
        bus,
        service="t",
        stream="RV_PROFILE",
        durable="test-consumer",
        filter_subject="rv.profile.>",
        handler=handler,
        max_attempts=2,
    )
    stop, task = await _run(consumer)

    async def poison_given_up() -> bool:
        return attempts.get(b"poison", 0) >= 3

    await eventually(lambda: _has(committed, [b"a", b"b"]))
    await eventually(poison_given_up, timeout=15)
    stop.set()
    await asyncio.wait_for(task, 5)
    assert sorted(committed) == [b"a", b"b"]
    info = await bus.js.consumer_info("RV_PROFILE", "test-consumer")
    assert info.num_ack_pending == 0 and info.num_pending == 0


async def _has(items: list[bytes], wanted: list[bytes]) -> bool:
    return sorted(items) == wanted


async def test_a_failed_handler_means_redelivery_after_restart(bus: Bus) -> None:
    seen: list[bytes] = []
    fail = True

    async def handler(msgs: Sequence[Msg]) -> None:
        if fail:
            raise RuntimeError("database down")
        seen.extend(m.data for m in msgs)

    await bus.publish("rv.profile.test", b"kept", msg_id="kept")
    consumer = Consumer(
        bus,
        service="t",
        stream="RV_PROFILE",
        durable="redeliver",
        filter_subject="rv.profile.>",
        handler=handler,
    )
    stop, task = await _run(consumer)

    async def nacked() -> bool:
        try:
            info = await bus.js.consumer_info("RV_PROFILE", "redeliver")
        except nats.js.errors.NotFoundError:
            return False  # not created yet
        return info.num_redelivered >= 1 or info.num_ack_pending >= 1

    await eventually(nacked)
    stop.set()
    await asyncio.wait_for(task, 5)
    fail = False
    stop, task = await _run(consumer)

    async def got_it() -> bool:
        return seen == [b"kept"]

    await eventually(got_it, timeout=10)
    stop.set()
    await asyncio.wait_for(task, 5)


async def test_a_consumer_hands_over_the_next_batches_while_earlier_ones_are_handled(bus: Bus) -> None:
    # Each batch waits until two are being handled at once: with one batch at a time this hangs.
    active, most = 0, 0
    two_at_once = asyncio.Event()
    handled: list[bytes] = []

    async def handler(msgs: Sequence[Msg]) -> None:
        nonlocal active, most
        active += 1
        most = max(most, active)
        if active == 2:
            two_at_once.set()
        await two_at_once.wait()
        handled.extend(m.data for m in msgs)
        active -= 1

    for i in range(6):
        await bus.publish("rv.profile.test", str(i).encode(), msg_id=f"m{i}")
    consumer = Consumer(
        bus,
        service="t",
        stream="RV_PROFILE",
        durable="in-flight",
        filter_subject="rv.profile.>",
        handler=handler,
        batch=1,
        batches_in_flight=2,
    )
    stop, task = await _run(consumer)

    async def all_handled() -> bool:
        return sorted(handled) == [str(i).encode() for i in range(6)]

    await eventually(all_handled)
    stop.set()
    await asyncio.wait_for(task, 5)
    assert most == 2  # never more batches at once than asked for
    info = await bus.js.consumer_info("RV_PROFILE", "in-flight")
    assert info.num_ack_pending == 0 and info.num_pending == 0
