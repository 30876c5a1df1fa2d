"""Story 3 meets story 1: an anonymous visitor's cart follows them into their known profile."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import sqlalchemy as sa

from relevans.delivery.v1 import delivery_pb2
from relevans.profile.v1 import profile_pb2
from tests.helpers import eventually, stays
from tests.helpers.cart import DELAY
from tests.helpers.system import System

TENANT = "shop"
EMAIL = "ada@example.com"
COOKIE = "cookie-7f3a"


async def timers(system: System) -> list[sa.Row[Any]]:
    return await system.rows(
        "trigger", "SELECT profile_id, occurrence, status FROM timers ORDER BY started_at"
    )


async def anonymous_cart(system: System, product_name: str) -> profile_pb2.TrackResponse:
    event = profile_pb2.Event(type="add_to_cart", anonymous_id=COOKIE)
    event.timestamp.FromDatetime(system.clock.now())
    event.properties.update({"product_name": product_name})
    return await system.profiles.Track(
        profile_pb2.TrackRequest(event=event), metadata=system.token(TENANT, "ingest")
    )


async def log_in(system: System) -> None:
    await system.profiles.Identify(
        profile_pb2.IdentifyRequest(email=EMAIL, anonymous_id=COOKIE), metadata=system.token(TENANT, "ingest")
    )


async def the_timers_are(system: System, expected: list[tuple[str, str, str]]) -> bool:
    return [tuple(t) for t in await timers(system)] == expected


async def mails(system: System) -> list[Any]:
    return system.mails_to(EMAIL)


async def more_than_one_mail(system: System) -> bool:
    return len(system.sink.messages()) > 1


async def test_an_anonymous_cart_is_reminded_once_to_the_known_customer_after_login(system: System) -> None:
    await system.setup_abandoned_cart(TENANT)
    known = await system.customer(TENANT, EMAIL, first_name="Ada")
    cart = await anonymous_cart(system, "Blue running shoes")
    assert cart.profile_id != known  # a shadow profile
    await eventually(lambda: the_timers_are(system, [(cart.profile_id, cart.event_id, "pending")]))

    await log_in(system)  # the shadow is merged into Ada's profile
    await eventually(lambda: the_timers_are(system, [(known, cart.event_id, "pending")]))

    await system.clock.advance(DELAY)
    [mail] = await eventually(lambda: mails(system))
    assert mail["Subject"] == "Ada, your cart is waiting"
    assert "Blue running shoes" in mail.get_body(preferencelist=("plain",)).get_content()
    await system.clock.advance(DELAY * 2)
    await stays(lambda: more_than_one_mail(system), duration=0.6)
    reply = await system.delivery.ListMessages(
        delivery_pb2.ListMessagesRequest(profile_id=known), metadata=system.token(TENANT, "read")
    )
    [message] = reply.messages
    assert (message.status, message.recipient, message.profile_id) == (
        delivery_pb2.MESSAGE_STATUS_SENT,
        EMAIL,
        known,
    )


async def test_the_known_customers_older_cart_and_the_anonymous_newer_cart_make_one_reminder(
    system: System,
) -> None:
    await system.setup_abandoned_cart(TENANT)
    known = await system.customer(TENANT, EMAIL, first_name="Ada")
    await system.track(TENANT, EMAIL, "add_to_cart", product_name="Red socks")
    [first] = await eventually(lambda: timers(system))
    older = first.occurrence
    await system.clock.advance(timedelta(hours=1))
    cart = await anonymous_cart(system, "Blue running shoes")
    await eventually(lambda: _count(system, 2))

    await log_in(system)
    await eventually(
        lambda: the_timers_are(system, [(known, older, "superseded"), (known, cart.event_id, "pending")])
    )

    await system.clock.advance(DELAY)
    [mail] = await eventually(lambda: mails(system))
    assert "Blue running shoes" in mail.get_body(preferencelist=("plain",)).get_content()
    await system.clock.advance(DELAY * 2)
    await stays(lambda: more_than_one_mail(system), duration=0.6)


async def _count(system: System, n: int) -> bool:
    return len(await timers(system)) == n
