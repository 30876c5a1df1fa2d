"""Story 1, end to end: add_to_cart, no purchase, the deadline passes -> one email."""

from __future__ import annotations

from relevans.delivery.v1 import delivery_pb2
from relevans.profile.v1 import profile_pb2
from tests.helpers import eventually, stays
from tests.helpers.cart import DELAY
from tests.helpers.system import System

TENANT = "shop"
EMAIL = "ada@example.com"


async def messages(system: System, tenant: str = TENANT) -> list[delivery_pb2.Message]:
    reply = await system.delivery.ListMessages(
        delivery_pb2.ListMessagesRequest(), metadata=system.token(tenant, "read")
    )
    return list(reply.messages)


async def sent(system: System) -> list[delivery_pb2.Message]:
    return [m for m in await messages(system) if m.status == delivery_pb2.MESSAGE_STATUS_SENT]


async def pending_timers(system: System) -> int:
    return await system.scalar("trigger", "SELECT count(*) FROM timers WHERE status = 'pending'")


async def test_abandoned_cart_sends_exactly_one_email_with_product_and_name(system: System) -> None:
    await system.setup_abandoned_cart(TENANT)
    await system.customer(TENANT, EMAIL, first_name="Ada")
    await system.track(TENANT, EMAIL, "add_to_cart", product_name="Blue running shoes", price=89.0)
    await eventually(lambda: pending_timers(system))

    await system.clock.advance(DELAY / 2)
    await stays(lambda: _mails(system), duration=0.3)

    await system.clock.advance(DELAY / 2)
    [mail] = await eventually(lambda: _mails(system))
    body = mail.get_body(preferencelist=("plain",)).get_content()
    assert "Hi Ada," in body
    assert "Blue running shoes" in body
    assert mail["Subject"] == "Ada, your cart is waiting"
    assert mail["List-Unsubscribe"] and mail["List-Unsubscribe-Post"] == "List-Unsubscribe=One-Click"

    [message] = await eventually(lambda: sent(system))
    assert message.recipient == EMAIL
    await system.clock.advance(DELAY)
    await stays(lambda: _more_than_one(system), duration=0.5)


async def _mails(system: System) -> list:  # type: ignore[type-arg]
    return system.mails_to(EMAIL)


async def _more_than_one(system: System) -> bool:
    return len(system.mails_to(EMAIL)) > 1


async def test_purchase_before_deadline_cancels_the_email(system: System) -> None:
    await system.setup_abandoned_cart(TENANT)
    await system.customer(TENANT, EMAIL, first_name="Ada")
    await system.track(TENANT, EMAIL, "add_to_cart", product_name="Blue running shoes")
    await eventually(lambda: pending_timers(system))
    await system.clock.advance(DELAY / 4)
    await system.track(TENANT, EMAIL, "purchase", order_id="o-1", value=89.0)
    await eventually(lambda: _no_pending(system))
    await system.clock.advance(DELAY * 2)
    await stays(lambda: _mails(system), duration=0.6)
    assert await messages(system) == []


async def _no_pending(system: System) -> bool:
    return await pending_timers(system) == 0


async def test_trigger_service_killed_while_timer_waits_still_sends_once(system: System) -> None:
    await system.setup_abandoned_cart(TENANT)
    await system.customer(TENANT, EMAIL, first_name="Ada")
    await system.track(TENANT, EMAIL, "add_to_cart", product_name="Blue running shoes")
    await eventually(lambda: pending_timers(system))

    await system.kill("trigger")
    await system.clock.advance(DELAY / 2)
    await system.start("trigger")
    await system.clock.advance(DELAY)

    await eventually(lambda: _mails(system))
    await stays(lambda: _more_than_one(system), duration=0.6)
    assert len(await messages(system)) == 1


async def test_same_message_id_twice_is_stored_once_and_fires_once(system: System) -> None:
    await system.setup_abandoned_cart(TENANT)
    await system.customer(TENANT, EMAIL, first_name="Ada")
    for _ in range(2):
        await system.track(TENANT, EMAIL, "add_to_cart", message_id="cart-1", product_name="Shoes")
    event = profile_pb2.Event(type="add_to_cart", email=EMAIL, message_id="cart-1")
    reply = await system.profiles.Track(
        profile_pb2.TrackRequest(event=event), metadata=system.token(TENANT, "ingest")
    )
    assert reply.duplicate
    await eventually(lambda: pending_timers(system))
    await system.clock.advance(DELAY * 2)
    await eventually(lambda: _mails(system))
    await stays(lambda: _more_than_one(system), duration=0.6)
    assert await pending_timers(system) == 0


async def test_consent_withdrawn_after_firing_stops_the_send(system: System) -> None:
    await system.setup_abandoned_cart(TENANT)
    profile_id = await system.customer(TENANT, EMAIL, first_name="Ada")
    await system.track(TENANT, EMAIL, "add_to_cart", product_name="Shoes")
    await eventually(lambda: pending_timers(system))

    # The delivery service is down when the trigger fires, so the request waits on the bus.
    await system.kill("delivery")
    await system.clock.advance(DELAY * 2)
    await eventually(lambda: _no_pending(system))
    await system.profiles.SetConsent(
        profile_pb2.SetConsentRequest(
            profile_id=profile_id,
            consent=profile_pb2.ConsentInput(purpose=1, channel=1, status=3, source="unsubscribe_link"),
        ),
        metadata=system.token(TENANT, "ingest"),
    )
    await system.start("delivery")
    [message] = await eventually(lambda: messages(system))
    assert message.status == delivery_pb2.MESSAGE_STATUS_SUPPRESSED
    assert message.reason.startswith("consent_withdrawn")
    assert system.mails_to(EMAIL) == []


async def test_missing_first_name_falls_back_to_a_plain_greeting(system: System) -> None:
    await system.setup_abandoned_cart(TENANT)
    await system.customer(TENANT, EMAIL)
    await system.track(TENANT, EMAIL, "add_to_cart", product_name="Shoes")
    await eventually(lambda: pending_timers(system))
    await system.clock.advance(DELAY * 2)
    [mail] = await eventually(lambda: _mails(system))
    body = mail.get_body(preferencelist=("plain",)).get_content()
    assert body.startswith("Hi there,")
    assert mail["Subject"] == "Hello, your cart is waiting"
    for bad in ("None", "{{", "first_name", "Hi ,"):
        assert bad not in body and bad not in mail["Subject"]
