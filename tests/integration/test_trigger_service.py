"""The trigger service on real PostgreSQL, NATS JetStream and gRPC: definitions, timers, firing once."""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import timedelta
from typing import Any

import grpc
import pytest_asyncio
import sqlalchemy as sa

from relevans.common.v1 import common_pb2
from relevans.delivery.v1 import bus_pb2 as delivery_bus_pb2
from relevans.kit.clock import ManualClock
from relevans.kit.db import create_engine
from relevans.kit.proto import from_struct
from relevans.kit.settings import Settings
from relevans.profile.v1 import bus_pb2 as profile_bus_pb2
from relevans.trigger.v1 import trigger_pb2
from services.trigger.store import TriggerStore
from services.trigger.timers import TimerWorker
from tests.helpers import eventually, field_violations, rpc_error, stays
from tests.helpers.cart import DELAY, TRIGGER_ID, cart_trigger
from tests.helpers.trigger import TENANT, Harness, token


@pytest_asyncio.fixture
async def harness(settings: Settings, clock: ManualClock, nats_url: str) -> AsyncIterator[Harness]:
    async with Harness.running(settings, clock, nats_url) as h:
        yield h


# ---- the abandoned cart -----------------------------------------------------------------------


async def test_abandoned_cart_fires_exactly_one_delivery_request_after_the_deadline(harness: Harness) -> None:
    created = await harness.create()
    assert created.trigger_id == TRIGGER_ID
    assert created.create_time.ToDatetime().replace(tzinfo=harness.clock.now().tzinfo) == harness.clock.now()
    cart = harness.enriched("add_to_cart", product_name="Blue running shoes", price=89.0)
    await harness.publish(cart)
    [timer] = await eventually(harness.pending)
    assert timer.due_at == harness.clock.now() + DELAY
    assert timer.occurrence == cart.event_id

    await harness.clock.advance(DELAY / 2)
    await stays(harness.requests, duration=0.4)

    await harness.clock.advance(DELAY / 2)
    [request] = await eventually(harness.requests)
    assert request.idempotency_key == f"{TRIGGER_ID}:p1:{cart.event_id}"
    assert (request.tenant_id, request.profile_id, request.trigger_id) == (TENANT, "p1", TRIGGER_ID)
    assert request.channel == common_pb2.CHANNEL_EMAIL
    assert request.purpose == common_pb2.PURPOSE_MARKETING
    assert request.template_id == "cart-reminder"
    assert request.request_time.ToDatetime().replace(tzinfo=harness.clock.now().tzinfo) == harness.clock.now()
    variables = from_struct(request.variables)
    assert variables["event"] == {"product_name": "Blue running shoes", "price": 89.0}
    assert variables["event_type"] == "add_to_cart"
    assert variables["event_id"] == cart.event_id
    assert variables["event_time"] == (harness.clock.now() - DELAY).isoformat()

    await harness.clock.advance(DELAY * 3)
    await stays(harness.more_than_one_request, duration=0.5)
    assert [t.status for t in await harness.timers()] == ["fired"]


async def test_purchase_before_the_deadline_cancels_the_request(harness: Harness) -> None:
    await harness.create()
    await harness.publish(harness.enriched("add_to_cart", product_name="Shoes"))
    await eventually(harness.pending)
    await harness.clock.advance(DELAY / 4)
    await harness.publish(harness.enriched("purchase", order_id="o-1"))
    await eventually(harness.no_pending)
    [timer] = await harness.timers()
    assert timer.status == "cancelled" and "purchase" in timer.reason
    await harness.clock.advance(DELAY * 2)
    await stays(harness.requests, duration=0.5)


async def test_a_purchase_delivered_before_an_earlier_add_to_cart_still_cancels_it(harness: Harness) -> None:
    await harness.create()
    await harness.clock.advance(timedelta(hours=1))
    late_cart = harness.enriched("add_to_cart", at_offset=-timedelta(minutes=30))
    await harness.publish(harness.enriched("purchase"))
    await harness.publish(late_cart)
    await eventually(harness.consumed)
    assert await harness.timers() == []
    # A new cart after the purchase is a new occasion.
    await harness.clock.advance(timedelta(minutes=1))
    await harness.publish(harness.enriched("add_to_cart"))
    await eventually(harness.pending)


async def test_the_same_event_delivered_twice_makes_one_timer_and_one_request(harness: Harness) -> None:
    await harness.create()
    cart = harness.enriched("add_to_cart", product_name="Shoes")
    await harness.publish(cart)
    await eventually(harness.pending)
    await harness.publish(cart)  # no Nats-Msg-Id: JetStream keeps both copies
    await eventually(harness.consumed)
    assert len(await harness.timers()) == 1
    await harness.clock.advance(DELAY * 2)
    await eventually(harness.requests)
    await harness.publish(cart)  # and once more after it fired
    await eventually(harness.consumed)
    await harness.clock.advance(DELAY * 2)
    await stays(harness.more_than_one_request, duration=0.5)
    assert [t.status for t in await harness.timers()] == ["fired"]


async def test_a_newer_cart_supersedes_the_pending_reminder(harness: Harness) -> None:
    await harness.create()
    await harness.publish(harness.enriched("add_to_cart", product_name="Shoes"))
    await eventually(harness.pending)
    await harness.clock.advance(timedelta(hours=1))
    newer = harness.enriched("add_to_cart", product_name="Socks")
    await harness.publish(newer)
    await eventually(lambda: _statuses(harness, ["superseded", "pending"]))
    await harness.clock.advance(DELAY)
    [request] = await eventually(harness.requests)
    assert request.idempotency_key.endswith(newer.event_id)
    assert from_struct(request.variables)["event"] == {"product_name": "Socks"}


async def _statuses(harness: Harness, expected: list[str]) -> bool:
    return [t.status for t in await harness.timers()] == expected


async def test_a_restarted_service_fires_the_waiting_timer_exactly_once(harness: Harness) -> None:
    await harness.create()
    cart = harness.enriched("add_to_cart", product_name="Shoes")
    await harness.publish(cart)
    await eventually(harness.pending)

    await harness.stop(harness.hosts[0])
    await harness.clock.advance(DELAY / 2)
    # Two instances now share the timers table; SKIP LOCKED and the firings key keep it to one.
    await harness.start()
    await harness.start()
    await harness.clock.advance(DELAY / 2)

    [request] = await eventually(harness.requests)
    assert request.idempotency_key == f"{TRIGGER_ID}:p1:{cart.event_id}"
    await harness.clock.advance(DELAY)
    await stays(harness.more_than_one_request, duration=0.6)


async def test_two_instances_fire_many_timers_once_each(harness: Harness) -> None:
    await harness.create()
    await harness.start()
    for i in range(60):
        await harness.publish(harness.enriched("add_to_cart", profile_id=f"p{i}"))
    await eventually(lambda: _count_pending(harness, 60))
    await harness.clock.advance(DELAY)
    got = await eventually(lambda: _at_least(harness, 60))
    await stays(lambda: _at_least(harness, 61), duration=0.5)
    assert len({r.idempotency_key for r in got}) == 60
    assert {r.profile_id for r in got} == {f"p{i}" for i in range(60)}


async def _count_pending(harness: Harness, n: int) -> bool:
    return len(await harness.pending()) == n


async def _at_least(harness: Harness, n: int) -> list[delivery_bus_pb2.DeliveryRequest]:
    got = await harness.requests()
    return got if len(got) >= n else []


async def test_fire_due_fires_one_round_and_the_relay_publishes_it_after_a_restart(harness: Harness) -> None:
    await harness.create()
    await harness.publish(harness.enriched("add_to_cart"))
    await eventually(harness.pending)
    await harness.stop(harness.hosts[0])

    engine = create_engine(harness.settings.database_url("trigger"), pool_size=1)
    try:
        worker = TimerWorker(TriggerStore(engine), harness.clock, notify=lambda: None, poll_interval=0.01)
        assert await worker.fire_due() == 0  # not due yet
        await harness.clock.advance(DELAY)
        assert await worker.fire_due() == 1
        assert await worker.fire_due() == 0
    finally:
        await engine.dispose()
    assert await harness.requests() == []  # in the outbox, not yet on the bus

    await harness.start()
    await eventually(harness.requests)
    await stays(harness.more_than_one_request, duration=0.4)


async def test_delete_cancels_pending_timers(harness: Harness) -> None:
    await harness.create()
    await harness.publish(harness.enriched("add_to_cart"))
    await eventually(harness.pending)
    await harness.stub.DeleteTrigger(
        trigger_pb2.DeleteTriggerRequest(trigger_id=TRIGGER_ID), metadata=token()
    )
    [timer] = await harness.timers()
    assert (timer.status, timer.reason) == ("cancelled", "trigger deleted")
    err = await rpc_error(
        harness.stub.GetTrigger(trigger_pb2.GetTriggerRequest(trigger_id=TRIGGER_ID), metadata=token())
    )
    assert err.code() == grpc.StatusCode.NOT_FOUND
    await harness.clock.advance(DELAY * 2)
    await stays(harness.requests, duration=0.4)
    err = await rpc_error(
        harness.stub.DeleteTrigger(trigger_pb2.DeleteTriggerRequest(trigger_id=TRIGGER_ID), metadata=token())
    )
    assert err.code() == grpc.StatusCode.NOT_FOUND


async def test_a_backfilled_event_counts_within_the_late_window_and_fires_nothing_beyond(
    harness: Harness,
) -> None:
    await harness.clock.advance(timedelta(minutes=5))
    await harness.create()
    recent = harness.enriched("add_to_cart", profile_id="recent", at_offset=-timedelta(minutes=1))
    await harness.publish(recent)  # happened before the trigger was created: still its cart
    await harness.publish(harness.enriched("add_to_cart", profile_id="old", at_offset=-timedelta(days=3)))
    await eventually(harness.consumed)
    [timer] = await harness.timers()
    assert (timer.profile_id, timer.occurrence) == ("recent", recent.event_id)
    assert await harness.outcomes("old") == [(TRIGGER_ID, "not_fired", "late_event")]


# ---- definitions --------------------------------------------------------------------------------


async def test_create_is_idempotent_and_a_different_definition_already_exists(harness: Harness) -> None:
    first = await harness.create()
    await harness.clock.advance(timedelta(minutes=1))
    again = await harness.create()
    assert again == first
    err = await rpc_error(harness.create(trigger=cart_trigger(delay=DELAY * 2)))
    assert err.code() == grpc.StatusCode.ALREADY_EXISTS
    got = await harness.stub.GetTrigger(
        trigger_pb2.GetTriggerRequest(trigger_id=TRIGGER_ID), metadata=token(TENANT, "read")
    )
    assert got.trigger == first
    assert got.trigger.absence.delay.seconds == int(DELAY.total_seconds())


async def test_invalid_triggers_name_the_fields(harness: Harness) -> None:
    bad = cart_trigger()
    bad.absence.delay.seconds = 0
    bad.channel = 99  # type: ignore[assignment]  # a channel this service does not know
    bad.template_id = ""
    err = await rpc_error(harness.create(trigger=bad))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert set(field_violations(err)) == {"trigger.absence.delay", "trigger.channel", "trigger.template_id"}

    no_condition = trigger_pb2.Trigger(
        trigger_id="x",
        channel=common_pb2.CHANNEL_EMAIL,
        purpose=common_pb2.PURPOSE_MARKETING,
        template_id="t",
    )
    err = await rpc_error(harness.create(trigger=no_condition))
    assert set(field_violations(err)) == {"trigger.condition"}

    same_types = cart_trigger()
    same_types.absence.cancel_event_type = "add_to_cart"
    same_types.trigger_id = "Not Valid"
    same_types.absence.delay.seconds = 366 * 24 * 3600
    err = await rpc_error(harness.create(trigger=same_types))
    assert set(field_violations(err)) == {
        "trigger.trigger_id",
        "trigger.absence.cancel_event_type",
        "trigger.absence.delay",
    }

    err = await rpc_error(harness.stub.CreateTrigger(trigger_pb2.CreateTriggerRequest(), metadata=token()))
    assert set(field_violations(err)) == {"trigger"}

    err = await rpc_error(
        harness.stub.ListTriggers(trigger_pb2.ListTriggersRequest(page_token="garbage"), metadata=token())
    )
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert set(field_violations(err)) == {"page_token"}
    listed = await harness.stub.ListTriggers(trigger_pb2.ListTriggersRequest(), metadata=token())
    assert list(listed.triggers) == []  # nothing half-written


async def test_list_pages_through_the_tenants_triggers(harness: Harness) -> None:
    for i in range(5):
        await harness.create(trigger=cart_trigger(f"cart-{i}"))
    seen: list[str] = []
    page_token = ""
    pages = 0
    while True:
        reply = await harness.stub.ListTriggers(
            trigger_pb2.ListTriggersRequest(page_size=2, page_token=page_token),
            metadata=token(TENANT, "read"),
        )
        seen += [t.trigger_id for t in reply.triggers]
        pages += 1
        page_token = reply.next_page_token
        if not page_token:
            break
    assert seen == [f"cart-{i}" for i in range(5)]
    assert pages == 3


async def test_scopes_are_enforced(harness: Harness) -> None:
    err = await rpc_error(
        harness.stub.CreateTrigger(
            trigger_pb2.CreateTriggerRequest(trigger=cart_trigger()), metadata=token(TENANT, "read")
        )
    )
    assert err.code() == grpc.StatusCode.PERMISSION_DENIED
    err = await rpc_error(
        harness.stub.ListTriggers(trigger_pb2.ListTriggersRequest(), metadata=token(TENANT, "ingest"))
    )
    assert err.code() == grpc.StatusCode.PERMISSION_DENIED
    err = await rpc_error(harness.stub.ListTriggers(trigger_pb2.ListTriggersRequest()))
    assert err.code() == grpc.StatusCode.UNAUTHENTICATED


async def test_tenant_b_cannot_see_or_touch_tenant_a(harness: Harness) -> None:
    await harness.create("tenant-a")
    b = token("tenant-b")
    err = await rpc_error(
        harness.stub.GetTrigger(trigger_pb2.GetTriggerRequest(trigger_id=TRIGGER_ID), metadata=b)
    )
    assert err.code() == grpc.StatusCode.NOT_FOUND
    assert (
        list((await harness.stub.ListTriggers(trigger_pb2.ListTriggersRequest(), metadata=b)).triggers) == []
    )
    err = await rpc_error(
        harness.stub.DeleteTrigger(trigger_pb2.DeleteTriggerRequest(trigger_id=TRIGGER_ID), metadata=b)
    )
    assert err.code() == grpc.StatusCode.NOT_FOUND
    # Tenant B's events never start tenant A's trigger.
    await harness.publish(harness.enriched("add_to_cart", tenant="tenant-b"))
    await eventually(harness.consumed)
    assert await harness.timers() == []
    # Tenant B may use the same trigger id for its own trigger.
    mine = await harness.create("tenant-b", cart_trigger(delay=DELAY * 2))
    assert mine.absence.delay.seconds == int(DELAY.total_seconds()) * 2
    got = await harness.stub.GetTrigger(
        trigger_pb2.GetTriggerRequest(trigger_id=TRIGGER_ID), metadata=token("tenant-a")
    )
    assert got.trigger.absence.delay.seconds == int(DELAY.total_seconds())


# ---- profile merges -----------------------------------------------------------------------------


def merged(survivor: str, gone: str, tenant: str = TENANT) -> profile_bus_pb2.ProfileMerged:
    msg = profile_bus_pb2.ProfileMerged(
        tenant_id=tenant, surviving_profile_id=survivor, merged_profile_id=gone, reason="anonymous_id"
    )
    msg.merge_time.GetCurrentTime()
    return msg


async def publish_merge(harness: Harness, msg: profile_bus_pb2.ProfileMerged) -> None:
    await harness.js.publish("rv.profile.merged", msg.SerializeToString())  # no Nats-Msg-Id: kept twice


async def merges_consumed(harness: Harness) -> bool:
    info = await harness.js.consumer_info("RV_PROFILE", "trigger-merges")
    return not info.num_pending and not info.num_ack_pending


async def rows(harness: Harness, table: str) -> list[tuple[Any, ...]]:
    async with harness.engine.connect() as conn:
        result = await conn.execute(sa.text(f"SELECT * FROM {table} ORDER BY 1, 2, 3, 4"))
        return [tuple(r) for r in result]


async def test_a_merge_moves_timers_state_and_firings_to_the_survivor(harness: Harness) -> None:
    await harness.create()
    # The known customer's cart was reminded already; the anonymous visitor's cart is pending.
    old_cart = harness.enriched("add_to_cart", profile_id="known", product_name="Socks")
    await harness.publish(old_cart)
    await eventually(harness.pending)
    await harness.clock.advance(DELAY)
    [first] = await eventually(harness.requests)
    assert first.idempotency_key == f"{TRIGGER_ID}:known:{old_cart.event_id}"
    cart = harness.enriched("add_to_cart", profile_id="anon", product_name="Shoes")
    await harness.publish(cart)
    await eventually(lambda: _pending_of(harness, "anon"))

    await publish_merge(harness, merged("known", "anon"))
    [timer] = await eventually(lambda: _pending_of(harness, "known"))
    assert timer.occurrence == cart.event_id
    assert {t.profile_id for t in await harness.timers()} == {"known"}
    [state] = await rows(harness, "trigger_states")
    assert state[2:4] == ("known", cart.event.timestamp.ToDatetime(tzinfo=harness.clock.now().tzinfo))
    assert {(f[2], f[3]) for f in await rows(harness, "firings")} == {("known", old_cart.event_id)}
    assert [(a[1], a[2]) for a in await rows(harness, "merged_profiles")] == [("anon", "known")]

    # Late copies of both carts, under either id, schedule nothing new and send nothing again.
    for late in (old_cart, cart):
        await harness.publish(late)
    await eventually(harness.consumed)
    assert len(await harness.timers()) == 2
    await harness.clock.advance(DELAY)
    got = await eventually(lambda: _at_least(harness, 2))
    assert got[1].idempotency_key == f"{TRIGGER_ID}:known:{cart.event_id}"
    assert got[1].profile_id == "known"
    assert from_struct(got[1].variables)["event"] == {"product_name": "Shoes"}
    await harness.clock.advance(DELAY * 2)
    await stays(lambda: _at_least(harness, 3), duration=0.5)


async def test_two_pending_timers_keep_the_newest_cart_and_a_redelivered_merge_changes_nothing(
    harness: Harness,
) -> None:
    await harness.create()
    await harness.publish(harness.enriched("add_to_cart", profile_id="known", product_name="Socks"))
    await eventually(lambda: _pending_of(harness, "known"))
    await harness.clock.advance(timedelta(hours=1))
    newer = harness.enriched("add_to_cart", profile_id="anon", product_name="Shoes")
    await harness.publish(newer)
    await eventually(lambda: _pending_of(harness, "anon"))

    merge = merged("known", "anon")
    await publish_merge(harness, merge)
    await eventually(lambda: _statuses(harness, ["superseded", "pending"]))
    [pending] = await harness.pending()
    assert (pending.profile_id, pending.occurrence) == ("known", newer.event_id)
    [superseded] = await harness.timers("superseded")
    assert superseded.reason == f"superseded by {newer.event_id} on merge of anon"
    before = {t: await rows(harness, t) for t in ("timers", "trigger_states", "firings", "merged_profiles")}

    await publish_merge(harness, merge)
    await eventually(lambda: merges_consumed(harness))
    assert {t: await rows(harness, t) for t in before} == before

    # A later cart under the merged-away id is the survivor's and supersedes its reminder.
    await harness.clock.advance(timedelta(minutes=5))
    latest = harness.enriched("add_to_cart", profile_id="anon", product_name="Hat")
    await harness.publish(latest)
    await eventually(lambda: _statuses(harness, ["superseded", "superseded", "pending"]))
    assert {t.profile_id for t in await harness.timers()} == {"known"}
    await harness.clock.advance(DELAY)
    [request] = await eventually(harness.requests)
    assert request.idempotency_key == f"{TRIGGER_ID}:known:{latest.event_id}"
    await harness.clock.advance(DELAY)
    await stays(harness.more_than_one_request, duration=0.5)


async def test_a_purchase_of_the_survivor_after_the_merged_cart_cancels_it(harness: Harness) -> None:
    await harness.create()
    await harness.publish(harness.enriched("add_to_cart", profile_id="anon"))
    await eventually(harness.pending)
    await harness.clock.advance(timedelta(minutes=10))
    await harness.publish(harness.enriched("purchase", profile_id="known"))
    await eventually(harness.consumed)
    # Merges chain: the survivor is merged once more; the first merge arrives after the second.
    await publish_merge(harness, merged("customer", "known"))
    await eventually(lambda: merges_consumed(harness))
    await publish_merge(harness, merged("known", "anon"))
    await eventually(harness.no_pending)
    [timer] = await harness.timers()
    assert (timer.profile_id, timer.status, timer.reason) == (
        "customer",
        "cancelled",
        "cancelled on merge of anon",
    )
    assert sorted((a[1], a[2]) for a in await rows(harness, "merged_profiles")) == [
        ("anon", "customer"),
        ("known", "customer"),
    ]
    await harness.clock.advance(DELAY * 2)
    await stays(harness.requests, duration=0.4)


async def _pending_of(harness: Harness, profile_id: str) -> list[sa.Row[Any]]:
    return [t for t in await harness.pending() if t.profile_id == profile_id]


async def test_create_trigger_refuses_a_template_id_that_is_not_an_id(harness: Harness) -> None:
    """A trigger's template_id follows the id rule delivery applies to the template it names
    (`relevans/kit/resource_ids.py`; issue 16, finding 6)."""
    for template_id in ["{{ ''.__class__.__mro__ }}", "Cart Reminder", "-cart", "c" * 64, "cart\nreminder"]:
        trigger = cart_trigger()
        trigger.template_id = template_id
        err = await rpc_error(harness.create(trigger=trigger))
        assert err.code() == grpc.StatusCode.INVALID_ARGUMENT, template_id
        assert list(field_violations(err)) == ["trigger.template_id"], template_id
    listed = await harness.stub.ListTriggers(trigger_pb2.ListTriggersRequest(), metadata=token())
    assert list(listed.triggers) == []
