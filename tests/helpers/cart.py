"""The abandoned cart, the example the tests of every service use: its trigger and its template."""

from __future__ import annotations

from datetime import timedelta

from google.protobuf import duration_pb2

from relevans.common.v1 import common_pb2
from relevans.trigger.v1 import trigger_pb2

DELAY = timedelta(hours=4)
TRIGGER_ID = "abandoned-cart"
TEMPLATE_ID = "cart-reminder"
SUBJECT = "{{ first_name | fallback('Hello') }}, your cart is waiting"
BODY = "Hi {{ first_name | fallback('there') }},\nyou left {{ event.product_name }} in your cart.\n"


def cart_trigger(trigger_id: str = TRIGGER_ID, delay: timedelta = DELAY) -> trigger_pb2.Trigger:
    return trigger_pb2.Trigger(
        trigger_id=trigger_id,
        display_name="Abandoned cart",
        absence=trigger_pb2.AbsenceCondition(
            start_event_type="add_to_cart",
            cancel_event_type="purchase",
            delay=duration_pb2.Duration(seconds=int(delay.total_seconds())),
        ),
        channel=common_pb2.CHANNEL_EMAIL,
        purpose=common_pb2.PURPOSE_MARKETING,
        template_id=TEMPLATE_ID,
    )
