"""`relevans demo`: the abandoned-cart story against a running `relevans up`.

A customer with a first name and email-marketing consent puts a product in the
cart and leaves; the deadline passes (a few real seconds here); the reminder
must arrive in the SMTP sink, greet them by name and name the product.
Exits non-zero when it does not.
"""

from __future__ import annotations

import asyncio
import sys
import uuid
from datetime import timedelta
from email.message import EmailMessage
from pathlib import Path
from typing import TYPE_CHECKING, Any

import grpc
from google.protobuf import duration_pb2

from relevans.cli.console import fail
from relevans.cli.stack import STATE_FILE, Stack
from relevans.common.v1 import common_pb2
from relevans.delivery.v1 import delivery_pb2, delivery_pb2_grpc
from relevans.kit.grpc_client import open_channel
from relevans.local.smtp_sink import read_mail_dir
from relevans.profile.v1 import profile_pb2, profile_pb2_grpc
from relevans.trigger.v1 import trigger_pb2, trigger_pb2_grpc

if TYPE_CHECKING:  # the async stub types exist only in the generated .pyi
    from relevans.delivery.v1.delivery_pb2_grpc import DeliveryServiceAsyncStub
    from relevans.profile.v1.profile_pb2_grpc import ProfileServiceAsyncStub
    from relevans.trigger.v1.trigger_pb2_grpc import TriggerServiceAsyncStub

TEMPLATE_ID = "abandoned-cart"
SUBJECT = "{{ first_name | fallback('Hi there') }}, you left something in your cart"
BODY = """Hi {{ first_name | fallback('there') }},

you left {{ event.product_name }} in your cart. It is still waiting for you.

— The demo shop
"""
PRODUCT = "Blue running shoes"


async def run_demo(stack: Stack, delay: timedelta, timeout: float) -> int:
    if not stack.running:
        fail("demo", f"no {STATE_FILE} in {stack.data_dir}: is `relevans up` running there?")
    state = stack.state
    run = uuid.uuid4().hex[:8]
    email = f"ada.{run}@example.com"
    if not await _start_story(state, email, run, delay):
        return 1
    mail_dir = Path(state["mail_dir"])
    mails = await _wait_for_mail(mail_dir, email, delay.total_seconds() + timeout)
    if mails is None:
        print(f"relevans demo: no email for {email} arrived in {mail_dir}", file=sys.stderr)
        return 1
    return _check_mail(mails)


async def _start_story(state: dict[str, Any], email: str, run: str, delay: timedelta) -> bool:
    """Everything the demo asks of the running services, over one channel each: the template, the
    trigger, a consenting customer and the abandoned cart. False (after saying why) on an RPC error."""
    token = state["token"]

    def tok() -> str:
        return token

    profile_ch = open_channel(state["profile"], deadline_s=5, token=tok)
    trigger_ch = open_channel(state["trigger"], deadline_s=5, token=tok)
    delivery_ch = open_channel(state["delivery"], deadline_s=5, token=tok)
    try:
        await _put_template(delivery_pb2_grpc.DeliveryServiceStub(delivery_ch))
        await _create_trigger(trigger_pb2_grpc.TriggerServiceStub(trigger_ch), delay)
        await _leave_cart(profile_pb2_grpc.ProfileServiceStub(profile_ch), email, run)
    except grpc.aio.AioRpcError as err:
        print(f"relevans demo: {err.code().name}: {err.details()}", file=sys.stderr)
        return False
    finally:
        for ch in (profile_ch, trigger_ch, delivery_ch):
            await ch.close(None)
    return True


async def _put_template(delivery: DeliveryServiceAsyncStub) -> None:
    """The reminder's email template (`SUBJECT`, `BODY`)."""
    await delivery.PutTemplate(
        delivery_pb2.PutTemplateRequest(
            template=delivery_pb2.Template(
                template_id=TEMPLATE_ID, channel=common_pb2.CHANNEL_EMAIL, subject=SUBJECT, body_text=BODY
            )
        )
    )


async def _create_trigger(triggers: TriggerServiceAsyncStub, delay: timedelta) -> None:
    """The abandoned-cart trigger: add_to_cart without a purchase within `delay` sends the template.
    Its id names the delay, so demos with other delays do not collide."""
    seconds = int(delay.total_seconds())
    trigger_id = f"demo-cart-{seconds}s"
    await triggers.CreateTrigger(
        trigger_pb2.CreateTriggerRequest(
            trigger=trigger_pb2.Trigger(
                trigger_id=trigger_id,
                display_name=f"Abandoned cart after {seconds}s (demo)",
                absence=trigger_pb2.AbsenceCondition(
                    start_event_type="add_to_cart",
                    cancel_event_type="purchase",
                    delay=duration_pb2.Duration(seconds=seconds),
                ),
                channel=common_pb2.CHANNEL_EMAIL,
                purpose=common_pb2.PURPOSE_MARKETING,
                template_id=TEMPLATE_ID,
            )
        )
    )
    print(f"trigger {trigger_id}: add_to_cart without purchase within {seconds}s sends {TEMPLATE_ID}")


async def _leave_cart(profiles: ProfileServiceAsyncStub, email: str, run: str) -> None:
    """A new customer (fresh address per run) with a first name and email-marketing consent puts the
    product in the cart and does not buy."""
    await profiles.Identify(
        profile_pb2.IdentifyRequest(
            email=email,
            first_name="Ada",
            consents=[
                profile_pb2.ConsentInput(
                    purpose=common_pb2.PURPOSE_MARKETING,
                    channel=common_pb2.CHANNEL_EMAIL,
                    status=common_pb2.CONSENT_STATUS_GRANTED,
                    source="demo",
                )
            ],
        )
    )
    event = profile_pb2.Event(type="add_to_cart", email=email, message_id=f"demo-{run}")
    event.properties.update({"product_id": "sku-42", "product_name": PRODUCT, "price": 89.0})
    await profiles.Track(profile_pb2.TrackRequest(event=event))
    print(f"{email} put {PRODUCT!r} in the cart and left; waiting for the reminder …", flush=True)


async def _wait_for_mail(mail_dir: Path, email: str, wait_s: float) -> list[EmailMessage] | None:
    """The mails to `email` in the sink's folder once at least one is there; None after `wait_s` without."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + wait_s
    while loop.time() < deadline:
        mails = [m for m in read_mail_dir(mail_dir) if email in str(m["To"])]
        if mails:
            return mails
        await asyncio.sleep(0.25)
    return None


def _check_mail(mails: list[EmailMessage]) -> int:
    """Shows the first mail and checks the story's promise: one reminder, by first name, naming the
    product. The exit code: 0 when it holds."""
    mail = mails[0]
    body_part = mail.get_body(preferencelist=("plain",))
    body = body_part.get_content() if body_part is not None else ""
    print("\n--- the email that arrived ---")
    print(f"To: {mail['To']}\nSubject: {mail['Subject']}\nList-Unsubscribe: {mail['List-Unsubscribe']}\n")
    print(body)
    problems = []
    if len(mails) != 1:
        problems.append(f"expected one email, got {len(mails)}")
    if "Ada" not in body:
        problems.append("the greeting does not use the first name")
    if PRODUCT not in body:
        problems.append("the product is missing")
    if problems:
        print("relevans demo: wrong email: " + "; ".join(problems), file=sys.stderr)
        return 1
    print("--- demo passed: one reminder, right name, right product ---")
    return 0
