"""Story 1 by SMS, end to end: add_to_cart, no purchase, the deadline passes -> one text message at the
SMS sink, its segments recorded (GSM-7, and UCS-2 once an emoji is in it)."""

from __future__ import annotations

from relevans.common.v1 import common_pb2
from relevans.delivery.v1 import delivery_pb2
from relevans.local.sms_sink import StoredSms
from relevans.profile.v1 import profile_pb2
from relevans.trigger.v1 import trigger_pb2
from tests.helpers import eventually, stays
from tests.helpers.cart import DELAY, cart_trigger
from tests.helpers.system import System

TENANT = "shop"
EMAIL = "ada@example.com"
PHONE = "+46 70 123 45 67"
E164 = "+46701234567"
BODY = "Hi {{ first_name | fallback('there') }}, you left {{ event.product_name }} in your cart."


async def _cart_by_sms(system: System) -> None:
    md = system.token(TENANT, "admin")
    await system.delivery.PutTemplate(
        delivery_pb2.PutTemplateRequest(
            template=delivery_pb2.Template(
                template_id="cart-sms", channel=common_pb2.CHANNEL_SMS, body_text=BODY
            )
        ),
        metadata=md,
    )
    trigger = cart_trigger("cart-sms")
    trigger.channel = common_pb2.CHANNEL_SMS
    trigger.template_id = "cart-sms"
    await system.triggers.CreateTrigger(trigger_pb2.CreateTriggerRequest(trigger=trigger), metadata=md)
    identify = profile_pb2.IdentifyRequest(
        email=EMAIL,
        first_name="Ada",
        consents=[
            profile_pb2.ConsentInput(
                purpose=common_pb2.PURPOSE_MARKETING,
                channel=common_pb2.CHANNEL_SMS,
                status=common_pb2.CONSENT_STATUS_GRANTED,
                source="signup_form",
            )
        ],
    )
    identify.traits.update({"phone": PHONE})
    await system.profiles.Identify(identify, metadata=system.token(TENANT, "ingest"))


async def _pending_timers(system: System) -> int:
    return await system.scalar("trigger", "SELECT count(*) FROM timers WHERE status = 'pending'")


async def _texts(system: System) -> list[StoredSms]:
    return system.texts_to(E164)


async def _more_than_one(system: System) -> bool:
    return len(system.texts_to(E164)) > 1


async def _sent(system: System) -> list[delivery_pb2.Message]:
    reply = await system.delivery.ListMessages(
        delivery_pb2.ListMessagesRequest(), metadata=system.token(TENANT, "read")
    )
    return [m for m in reply.messages if m.status == delivery_pb2.MESSAGE_STATUS_SENT]


async def _abandon_cart(system: System, product_name: str) -> None:
    await system.track(TENANT, EMAIL, "add_to_cart", product_name=product_name)
    await eventually(lambda: _pending_timers(system))
    await system.clock.advance(DELAY / 2)
    await stays(lambda: _texts(system), duration=0.3)
    await system.clock.advance(DELAY / 2)


async def test_an_abandoned_cart_sends_one_gsm7_sms_of_one_segment(system: System) -> None:
    await _cart_by_sms(system)
    await _abandon_cart(system, "Blue running shoes")

    [text] = await eventually(lambda: _texts(system))
    assert text.body == "Hi Ada, you left Blue running shoes in your cart."
    [message] = await eventually(lambda: _sent(system))
    assert message.channel == common_pb2.CHANNEL_SMS
    assert message.recipient == E164
    assert message.sms_segments == 1
    await system.clock.advance(DELAY)
    await stays(lambda: _more_than_one(system), duration=0.5)
    assert system.mails_to(EMAIL) == []


async def test_an_emoji_makes_the_sms_ucs2_and_counts_two_segments(system: System) -> None:
    await _cart_by_sms(system)
    # 74 UTF-16 code units with the emoji (2): over UCS-2's 70, where the same text without it
    # would be one GSM-7 message of 71 septets.
    await _abandon_cart(system, "Blue running shoes with reflective laces 👟")

    [text] = await eventually(lambda: _texts(system))
    assert text.body == "Hi Ada, you left Blue running shoes with reflective laces 👟 in your cart."
    [message] = await eventually(lambda: _sent(system))
    assert message.sms_segments == 2
