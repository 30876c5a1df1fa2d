"""`relevans demo`: three channels against a running `relevans up`.

1. The abandoned cart (story 1), by email and as an on-site banner: a customer with a first
   name and consent puts a product in the cart and leaves; the deadline passes (a few real
   seconds here); the reminder must arrive in the SMTP sink, greet them by name and name the
   product, and `GetBanner` must show the cart banner on their next visit.
2. A lead handed to the CRM (story 6): the customer asks for a demo, and a signed webhook must
   reach `up`'s webhook receiver with a signature that verifies.
3. The purchase that ends the cart withdraws its banner: `GetBanner` shows none.

Exits non-zero when any of it does not happen.
"""

from __future__ import annotations

import asyncio
import sys
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import timedelta
from email.message import EmailMessage
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import grpc
from google.protobuf import duration_pb2

from relevans.cli.console import fail
from relevans.cli.stack import STATE_FILE, Stack
from relevans.common.v1 import common_pb2
from relevans.delivery.v1 import delivery_pb2, delivery_pb2_grpc
from relevans.kit.grpc_client import open_channel
from relevans.local.smtp_sink import read_mail_dir
from relevans.local.webhook_receiver import read_deliveries, write_secret
from relevans.profile.v1 import profile_pb2, profile_pb2_grpc
from relevans.trigger.v1 import trigger_pb2, trigger_pb2_grpc

if TYPE_CHECKING:  # the async stub types exist only in the generated .pyi
    from relevans.delivery.v1.delivery_pb2_grpc import DeliveryServiceAsyncStub
    from relevans.profile.v1.profile_pb2_grpc import ProfileServiceAsyncStub
    from relevans.trigger.v1.trigger_pb2_grpc import TriggerServiceAsyncStub

T = TypeVar("T")

TEMPLATE_ID = "abandoned-cart"
SUBJECT = "{{ first_name | fallback('Hi there') }}, you left something in your cart"
BODY = """Hi {{ first_name | fallback('there') }},

you left {{ event.product_name }} in your cart. It is still waiting for you.

— The demo shop
"""
BANNER_TEMPLATE_ID = "cart-banner"
PLACEMENT = "cart-reminder"
BANNER_TITLE = "Still thinking about it?"
BANNER_BODY = "{{ event.product_name }} is waiting in your cart."
CART_URL = "https://shop.example/cart"
LEAD_TEMPLATE_ID = "lead-to-crm"
LEAD_BODY = "{{ first_name | fallback('Someone') }} asked for a demo of {{ event.product }}."
ENDPOINT_ID = "demo-crm"
PRODUCT = "Blue running shoes"


@dataclass(frozen=True)
class Clients:
    profiles: ProfileServiceAsyncStub
    triggers: TriggerServiceAsyncStub
    delivery: DeliveryServiceAsyncStub


async def run_demo(stack: Stack, delay: timedelta, timeout: float) -> int:
    if not stack.running:
        fail("demo", f"no {STATE_FILE} in {stack.data_dir}: is `relevans up` running there?")
    state = stack.state
    token = state["token"]
    channels = [
        open_channel(state[s], deadline_s=5, token=lambda: token) for s in ("profile", "trigger", "delivery")
    ]
    clients = Clients(
        profile_pb2_grpc.ProfileServiceStub(channels[0]),
        trigger_pb2_grpc.TriggerServiceStub(channels[1]),
        delivery_pb2_grpc.DeliveryServiceStub(channels[2]),
    )
    try:
        return await _play(clients, state, delay, timeout)
    except grpc.aio.AioRpcError as err:
        print(f"relevans demo: {err.code().name}: {err.details()}", file=sys.stderr)
        return 1
    finally:
        for ch in channels:
            await ch.close(None)


async def _play(c: Clients, state: dict[str, Any], delay: timedelta, timeout: float) -> int:
    run = uuid.uuid4().hex[:8]
    email = f"ada.{run}@example.com"
    webhook_dir = Path(state["webhook_dir"])
    await _put_templates(c.delivery, state["webhook_receiver"], webhook_dir)
    await _create_triggers(c.triggers, delay)
    profile_id = await _customer(c.profiles, email)
    await _track(c.profiles, email, "add_to_cart", f"demo-{run}-cart", product_name=PRODUCT, price=89.0)
    print(f"{email} put {PRODUCT!r} in the cart and left; waiting for the reminder …", flush=True)

    wait_s = delay.total_seconds() + timeout
    mails = await _until(lambda: _mails(Path(state["mail_dir"]), email), wait_s)
    if mails is None:
        return _failed(f"no email for {email} arrived in {state['mail_dir']}")
    problems = _check_mail(mails)
    banner = await _until(lambda: _banner(c.delivery, profile_id), timeout)
    problems += _check_banner(banner)

    await _track(c.profiles, email, "demo_requested", f"demo-{run}-lead", product="relevans")
    print(f"\n{email} asked for a demo; waiting for the CRM hand-over …", flush=True)
    hooks = await _until(lambda: _deliveries(webhook_dir, profile_id), timeout)
    problems += _check_webhook(hooks)

    await _track(c.profiles, email, "purchase", f"demo-{run}-purchase", product_name=PRODUCT, price=89.0)
    print(f"\n{email} bought {PRODUCT!r}; the cart banner must go …", flush=True)
    gone = await _until(lambda: _no_banner(c.delivery, profile_id), timeout)
    if gone is None:
        problems.append("the purchase did not withdraw the cart banner")
    else:
        print("GetBanner: no banner — withdrawn by the purchase")

    if problems:
        return _failed("; ".join(problems))
    print("\n--- demo passed: email, banner and signed webhook, each once, right person, right product ---")
    return 0


# ---- what the demo asks of the services --------------------------------------------------------


async def _put_templates(delivery: DeliveryServiceAsyncStub, receiver: str, webhook_dir: Path) -> None:
    """The reminder's email and banner templates, and the CRM endpoint (its secret handed to `up`'s
    receiver) with the lead's webhook template."""
    lifetime = duration_pb2.Duration()
    lifetime.FromTimedelta(timedelta(days=7))
    for template in (
        delivery_pb2.Template(
            template_id=TEMPLATE_ID, channel=common_pb2.CHANNEL_EMAIL, subject=SUBJECT, body_text=BODY
        ),
        delivery_pb2.Template(
            template_id=BANNER_TEMPLATE_ID,
            channel=common_pb2.CHANNEL_WEB,
            subject=BANNER_TITLE,
            body_text=BANNER_BODY,
            placement=PLACEMENT,
            banner_lifetime=lifetime,
            link_url=CART_URL,
        ),
    ):
        await delivery.PutTemplate(delivery_pb2.PutTemplateRequest(template=template))
    endpoint = await delivery.PutWebhookEndpoint(
        delivery_pb2.PutWebhookEndpointRequest(
            endpoint=delivery_pb2.WebhookEndpoint(endpoint_id=ENDPOINT_ID, url=receiver + ENDPOINT_ID),
            rotate_secret=True,
        )
    )
    write_secret(webhook_dir, ENDPOINT_ID, endpoint.endpoint.secret)
    await delivery.PutTemplate(
        delivery_pb2.PutTemplateRequest(
            template=delivery_pb2.Template(
                template_id=LEAD_TEMPLATE_ID,
                channel=common_pb2.CHANNEL_WEBHOOK,
                subject="New lead",
                body_text=LEAD_BODY,
                webhook_endpoint_id=ENDPOINT_ID,
            )
        )
    )


async def _create_triggers(triggers: TriggerServiceAsyncStub, delay: timedelta) -> None:
    """add_to_cart without a purchase within `delay` sends the email and places the banner; a demo
    request hands the lead to the CRM. Ids name the delay, so demos with other delays do not collide;
    a trigger that exists already is kept."""
    seconds = int(delay.total_seconds())
    cart = trigger_pb2.AbsenceCondition(
        start_event_type="add_to_cart",
        cancel_event_type="purchase",
        delay=duration_pb2.Duration(seconds=seconds),
    )
    wanted = (
        (f"demo-cart-{seconds}s", common_pb2.CHANNEL_EMAIL, TEMPLATE_ID, {"absence": cart}),
        (f"demo-cart-banner-{seconds}s", common_pb2.CHANNEL_WEB, BANNER_TEMPLATE_ID, {"absence": cart}),
        (
            "demo-lead-to-crm",
            common_pb2.CHANNEL_WEBHOOK,
            LEAD_TEMPLATE_ID,
            {"event": trigger_pb2.EventCondition(event_type="demo_requested")},
        ),
    )
    for trigger_id, channel, template_id, condition in wanted:
        # The lead asked to be contacted: handing them to sales is what they asked for, not marketing.
        purpose = (
            common_pb2.PURPOSE_TRANSACTIONAL
            if channel == common_pb2.CHANNEL_WEBHOOK
            else common_pb2.PURPOSE_MARKETING
        )
        trigger = trigger_pb2.Trigger(
            trigger_id=trigger_id,
            display_name=trigger_id.replace("-", " "),
            channel=channel,
            purpose=purpose,
            template_id=template_id,
            **condition,
        )
        try:
            await triggers.CreateTrigger(trigger_pb2.CreateTriggerRequest(trigger=trigger))
        except grpc.aio.AioRpcError as err:
            if err.code() != grpc.StatusCode.ALREADY_EXISTS:
                raise
    print(
        f"triggers: add_to_cart without purchase within {seconds}s -> email + banner; demo_requested -> CRM"
    )


async def _customer(profiles: ProfileServiceAsyncStub, email: str) -> str:
    """A new customer (fresh address per run) with a first name and consent to marketing by email
    and on the site."""
    granted = [
        (common_pb2.PURPOSE_MARKETING, common_pb2.CHANNEL_EMAIL),
        (common_pb2.PURPOSE_MARKETING, common_pb2.CHANNEL_WEB),
    ]
    reply = await profiles.Identify(
        profile_pb2.IdentifyRequest(
            email=email,
            first_name="Ada",
            consents=[
                profile_pb2.ConsentInput(
                    purpose=purpose, channel=channel, status=common_pb2.CONSENT_STATUS_GRANTED, source="demo"
                )
                for purpose, channel in granted
            ],
        )
    )
    return str(reply.profile.profile_id)


async def _track(
    profiles: ProfileServiceAsyncStub, email: str, event_type: str, event_id: str, **props: Any
) -> None:
    event = profile_pb2.Event(type=event_type, email=email, message_id=event_id)
    event.properties.update(props)
    await profiles.Track(profile_pb2.TrackRequest(event=event))


# ---- what arrived -------------------------------------------------------------------------------


async def _until(probe: Callable[[], Awaitable[T | None]], wait_s: float) -> T | None:
    """The probe's first answer that is not None, or None after `wait_s` seconds without one."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + wait_s
    while loop.time() < deadline:
        found = await probe()
        if found is not None:
            return found
        await asyncio.sleep(0.25)
    return None


async def _mails(mail_dir: Path, email: str) -> list[EmailMessage] | None:
    return [m for m in read_mail_dir(mail_dir) if email in str(m["To"])] or None


async def _banner(delivery: DeliveryServiceAsyncStub, profile_id: str) -> delivery_pb2.Banner | None:
    reply = await delivery.GetBanner(
        delivery_pb2.GetBannerRequest(profile_id=profile_id, placement=PLACEMENT)
    )
    return reply.banner if reply.HasField("banner") else None


async def _no_banner(delivery: DeliveryServiceAsyncStub, profile_id: str) -> bool | None:
    return True if await _banner(delivery, profile_id) is None else None


async def _deliveries(webhook_dir: Path, profile_id: str) -> list[dict[str, Any]] | None:
    found = [
        d
        for d in read_deliveries(webhook_dir, ENDPOINT_ID)
        if (d.get("payload") or {}).get("data", {}).get("profile_id") == profile_id
    ]
    return found or None


def _check_mail(mails: list[EmailMessage]) -> list[str]:
    """Shows the first mail; what is wrong with it (one reminder, by first name, naming the product)."""
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
        problems.append("the product is missing from the email")
    return problems


def _check_banner(banner: delivery_pb2.Banner | None) -> list[str]:
    if banner is None:
        return ["GetBanner showed no cart banner"]
    print(f"--- GetBanner({PLACEMENT!r}) on the next visit ---")
    print(f"{banner.title}\n{banner.body_text}\n-> {banner.link_url}")
    return [] if PRODUCT in banner.body_text else ["the banner does not name the product"]


def _check_webhook(hooks: list[dict[str, Any]] | None) -> list[str]:
    if hooks is None:
        return ["no webhook reached the CRM receiver"]
    hook = hooks[0]
    print("--- the webhook the CRM received ---")
    print(f"webhook-id: {hook['webhook_id']}\nwebhook-signature: {hook['webhook_signature']}")
    print(f"verified: {hook['verified']}\n{hook['body']}")
    problems = []
    if len(hooks) != 1:
        problems.append(f"expected one webhook, got {len(hooks)}")
    if not hook["verified"]:
        problems.append(f"the webhook's signature did not verify: {hook['problem']}")
    if "Ada asked for a demo" not in hook["body"]:
        problems.append("the webhook does not carry the lead")
    return problems


def _failed(why: str) -> int:
    print(f"relevans demo: {why}", file=sys.stderr)
    return 1
