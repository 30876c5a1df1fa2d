"""A banner's moment passing: the purchase after an abandoned cart on a web trigger withdraws the
banner that may be waiting (`rv.delivery.withdrawals`), once per purchase; delivery requests carry
the trigger's priority and the firing's expiry. Real PostgreSQL, NATS and gRPC, a ManualClock."""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import timedelta

import nats
import pytest_asyncio
from google.protobuf import duration_pb2

from relevans.common.v1 import common_pb2
from relevans.delivery.v1 import bus_pb2 as delivery_bus_pb2
from relevans.kit.clock import ManualClock
from relevans.kit.proto import from_timestamp
from relevans.kit.settings import Settings
from relevans.trigger.v1 import trigger_pb2
from tests.helpers import eventually, stays
from tests.helpers.cart import DELAY, cart_trigger
from tests.helpers.trigger import Harness

EXPIRY = timedelta(hours=6)


class Withdrawals:
    """What trigger published on `rv.delivery.withdrawals`, read as delivery would."""

    def __init__(self, sub: nats.js.JetStreamContext.PullSubscription) -> None:
        self.sub = sub
        self.received: list[delivery_bus_pb2.DeliveryWithdrawal] = []

    async def all(self) -> list[delivery_bus_pb2.DeliveryWithdrawal]:
        try:
            msgs = await self.sub.fetch(20, timeout=0.1)
        except (nats.errors.TimeoutError, TimeoutError):
            msgs = []
        for m in msgs:
            self.received.append(delivery_bus_pb2.DeliveryWithdrawal.FromString(m.data))
            await m.ack()
        return list(self.received)

    async def more_than(self, n: int) -> list[delivery_bus_pb2.DeliveryWithdrawal]:
        found = await self.all()
        return found if len(found) > n else []


@pytest_asyncio.fixture
async def harness(settings: Settings, clock: ManualClock, nats_url: str) -> AsyncIterator[Harness]:
    async with Harness.running(settings, clock, nats_url) as h:
        yield h


@pytest_asyncio.fixture
async def withdrawals(harness: Harness) -> Withdrawals:
    sub = await harness.js.pull_subscribe(
        "rv.delivery.withdrawals", durable="test-withdrawals", stream="RV_DELIVERY_REQUESTS"
    )
    return Withdrawals(sub)


def banner_trigger() -> trigger_pb2.Trigger:
    t = cart_trigger("cart-banner")
    t.channel = common_pb2.CHANNEL_WEB
    t.absence.match_properties.append("cart_id")
    t.policy.CopyFrom(
        trigger_pb2.TriggerPolicy(
            priority=5, expiry=duration_pb2.Duration(seconds=int(EXPIRY.total_seconds()))
        )
    )
    return t


async def test_the_purchase_after_a_shown_cart_banner_withdraws_it_once(
    harness: Harness, withdrawals: Withdrawals
) -> None:
    await harness.create(trigger=banner_trigger())
    start = harness.clock.now()
    await harness.publish(harness.enriched("add_to_cart", cart_id="c1"))
    await harness.publish(harness.enriched("add_to_cart", "p2", cart_id="c9"))
    await eventually(lambda: _pending(harness, 2))
    await harness.clock.advance(DELAY)
    requests = await eventually(lambda: _requests(harness, 2))
    for r in requests:
        assert (r.channel, r.priority) == (common_pb2.CHANNEL_WEB, 5)
        assert from_timestamp(r.expire_time) == start + DELAY + EXPIRY

    await harness.clock.advance(timedelta(hours=1))
    purchase = harness.enriched("purchase", cart_id="c1")
    await harness.publish(purchase)
    [w] = await eventually(withdrawals.all)
    assert (w.tenant_id, w.profile_id, w.trigger_id, w.reason) == ("shop", "p1", "cart-banner", "cancelled")
    assert from_timestamp(w.withdraw_time) == harness.clock.now()

    # The same purchase redelivered, and a purchase of another cart than the one shown: nothing more.
    await harness.publish(purchase)
    await harness.publish(harness.enriched("purchase", "p2", cart_id="c2"))
    await eventually(harness.consumed)
    await stays(lambda: withdrawals.more_than(1), duration=0.5)


async def test_a_purchase_before_the_banner_was_placed_withdraws_nothing(
    harness: Harness, withdrawals: Withdrawals
) -> None:
    await harness.create(trigger=banner_trigger())
    await harness.publish(harness.enriched("add_to_cart", cart_id="c1"))
    await eventually(lambda: _pending(harness, 1))
    await harness.clock.advance(timedelta(hours=1))
    await harness.publish(harness.enriched("purchase", cart_id="c1"))
    await eventually(harness.no_pending)
    await stays(withdrawals.all, duration=0.5)


async def _pending(h: Harness, n: int) -> bool:
    return len(await h.pending()) == n


async def _requests(h: Harness, n: int) -> list[delivery_bus_pb2.DeliveryRequest]:
    found = await h.requests()
    return found if len(found) >= n else []
