"""Two trigger processes on one database and one bus: they share the event partitions and the
timers, and each firing happens exactly once."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest_asyncio

from relevans.delivery.v1 import bus_pb2 as delivery_bus_pb2
from relevans.kit.clock import ManualClock
from relevans.kit.settings import Settings
from tests.helpers import eventually, stays
from tests.helpers.cart import DELAY
from tests.helpers.trigger import Harness

PROFILES = 200


@pytest_asyncio.fixture
async def two(settings: Settings, clock: ManualClock, nats_url: str) -> AsyncIterator[Harness]:
    async with Harness.running(settings, clock, nats_url, instances=2) as h:
        yield h


async def test_two_processes_share_the_partitions_and_fire_each_absence_timer_once(two: Harness) -> None:
    """Start events of many profiles, spread over every partition, consumed by two processes;
    after the delay each profile gets exactly one delivery request, none twice, none missing."""
    await two.create()
    for i in range(PROFILES):
        await two.publish(two.enriched("add_to_cart", profile_id=f"p{i}"))
    await eventually(two.consumed, timeout=30)
    await two.clock.advance(DELAY)

    async def all_fired() -> list[delivery_bus_pb2.DeliveryRequest]:
        got = await two.requests()
        return got if len(got) >= PROFILES else []

    got = await eventually(all_fired, timeout=30)

    async def more() -> bool:
        return len(await two.requests()) > PROFILES

    await stays(more, duration=0.5)
    assert sorted(r.profile_id for r in got) == sorted(f"p{i}" for i in range(PROFILES))
    assert len({r.idempotency_key for r in got}) == PROFILES


async def test_a_profiles_start_and_cancel_events_are_applied_in_order_across_two_processes(
    two: Harness,
) -> None:
    """Each profile adds to its cart and then buys, the two events published one after the other
    while two processes consume: had any purchase been applied before its start event, that
    profile's timer would survive and fire. Nothing fires."""
    await two.create()
    for i in range(PROFILES):
        await two.publish(two.enriched("add_to_cart", profile_id=f"p{i}"))
        await two.publish(two.enriched("purchase", profile_id=f"p{i}"))
    await eventually(two.consumed, timeout=30)
    await two.clock.advance(DELAY * 2)
    await stays(two.requests, duration=0.5)
