"""The on-site banner on real PostgreSQL, NATS JetStream and gRPC, with the real profile service:
a web message places a banner that GetBanner answers from memory, in every delivery process and
after a restart; withdrawals, consent withdrawals and the clock take it away."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Sized
from datetime import datetime, timedelta
from pathlib import Path

import grpc
import pytest_asyncio
import sqlalchemy as sa
from google.protobuf import duration_pb2

from relevans.common.v1 import common_pb2
from relevans.delivery.v1 import bus_pb2, delivery_pb2, delivery_pb2_grpc
from relevans.kit.clock import ManualClock
from relevans.kit.proto import to_struct, to_timestamp
from relevans.kit.server import ServiceHost
from relevans.kit.settings import Settings
from relevans.profile.v1 import profile_pb2
from relevans.trigger.v1 import trigger_pb2
from services.delivery.app import build
from tests.helpers import eventually, field_violations, rpc_error, stays
from tests.helpers.cart import DELAY, cart_trigger
from tests.helpers.delivery import TENANT, Harness, token
from tests.helpers.system import System

PLACEMENT = "cart-reminder"
TEMPLATE = "cart-banner"
COOKIE = "cookie-7f3a"
LIFETIME = timedelta(hours=24)


@pytest_asyncio.fixture
async def harness(
    settings: Settings, clock: ManualClock, nats_url: str, tmp_path: Path
) -> AsyncIterator[Harness]:
    h = Harness(settings, clock, nats_url, tmp_path / "mail")
    try:
        await h.start()
        yield h
    finally:
        await h.close()


def web_template(lifetime: timedelta = LIFETIME, **fields: object) -> delivery_pb2.Template:
    values: dict[str, object] = {
        "template_id": TEMPLATE,
        "channel": common_pb2.CHANNEL_WEB,
        "subject": "{{ first_name | fallback('Hello') }}, your cart is waiting",
        "body_text": "You left {{ event.product_name }} in your cart.",
        "placement": PLACEMENT,
        "banner_lifetime": duration_pb2.Duration(seconds=int(lifetime.total_seconds())),
        "link_url": "https://shop.example/cart?p={{ event.product_id }}",
    }
    values.update(fields)
    return delivery_pb2.Template(**values)  # type: ignore[arg-type]


async def put_web_template(h: Harness | System, template: delivery_pb2.Template | None = None) -> None:
    stub = h.delivery
    await stub.PutTemplate(
        delivery_pb2.PutTemplateRequest(template=template or web_template()), metadata=token(TENANT, "admin")
    )


async def web_customer(h: Harness, email: str = "ada@example.com", anonymous_id: str = COOKIE) -> str:
    reply = await h.profiles.Identify(
        profile_pb2.IdentifyRequest(
            email=email,
            first_name="Ada",
            anonymous_id=anonymous_id,
            consents=[
                profile_pb2.ConsentInput(
                    purpose=common_pb2.PURPOSE_MARKETING,
                    channel=common_pb2.CHANNEL_WEB,
                    status=common_pb2.CONSENT_STATUS_GRANTED,
                    source="signup_form",
                )
            ],
        ),
        metadata=token(TENANT, "ingest"),
    )
    return str(reply.profile.profile_id)


async def web_request(
    h: Harness,
    profile_id: str,
    *,
    priority: int = 0,
    expire_in: timedelta | None = None,
    trigger: str = "cart",
    requested: datetime | None = None,
) -> str:
    key = f"{trigger}:{profile_id}:{uuid.uuid4().hex}"
    msg = bus_pb2.DeliveryRequest(
        idempotency_key=key,
        tenant_id=TENANT,
        profile_id=profile_id,
        trigger_id=trigger,
        channel=common_pb2.CHANNEL_WEB,
        purpose=common_pb2.PURPOSE_MARKETING,
        template_id=TEMPLATE,
        variables=to_struct({"event": {"product_name": "Blue running shoes", "product_id": "sku-1"}}),
        priority=priority,
        expire_time=to_timestamp(h.clock.now() + expire_in) if expire_in else None,
        request_time=to_timestamp(requested or h.clock.now()),
    )
    await h.js.publish("rv.delivery.requests", msg.SerializeToString())
    return key


async def get_banner(
    stub: delivery_pb2_grpc.DeliveryServiceStub,
    *,
    profile_id: str = "",
    anonymous_id: str = "",
    placement: str = PLACEMENT,
) -> delivery_pb2.Banner | None:
    reply = await stub.GetBanner(
        delivery_pb2.GetBannerRequest(profile_id=profile_id, anonymous_id=anonymous_id, placement=placement),
        metadata=token(TENANT, "read"),
    )
    return reply.banner if reply.HasField("banner") else None


async def placed(h: Harness, profile_id: str) -> str:
    """Wait for a web message's banner to be shown to the person; its message id."""
    banner = await eventually(lambda: get_banner(h.delivery, profile_id=profile_id))
    return banner.message_id


async def statuses(h: Harness, kind: str) -> list[bus_pb2.DeliveryStatusChanged]:
    return [e for subject, e in await h.status_events() if subject == f"rv.delivery.status.{kind}"]


# ---- placing and showing ----------------------------------------


async def test_a_web_message_places_a_banner_shown_by_profile_id_and_by_anonymous_id(
    harness: Harness,
) -> None:
    profile_id = await web_customer(harness)
    await put_web_template(harness)
    key = await web_request(harness, profile_id, priority=5)

    message = await harness.final(key)
    assert message.status == delivery_pb2.MESSAGE_STATUS_SENT
    assert message.channel == common_pb2.CHANNEL_WEB
    assert message.recipient == profile_id

    banner = await eventually(lambda: get_banner(harness.delivery, profile_id=profile_id))
    assert banner.message_id == message.message_id
    assert (banner.title, banner.body_text) == (
        "Ada, your cart is waiting",
        "You left Blue running shoes in your cart.",
    )
    assert banner.link_url == "https://shop.example/cart?p=sku-1"
    assert (banner.placement, banner.trigger_id, banner.priority) == (PLACEMENT, "cart", 5)
    assert (
        banner.expire_time.ToDatetime().replace(tzinfo=harness.clock.now().tzinfo)
        == harness.clock.now() + LIFETIME
    )

    assert await get_banner(harness.delivery, anonymous_id=COOKIE) == banner
    assert await get_banner(harness.delivery, profile_id=profile_id, placement="footer") is None
    assert await get_banner(harness.delivery, anonymous_id="someone-else") is None
    other = await harness.delivery.GetBanner(
        delivery_pb2.GetBannerRequest(profile_id=profile_id, placement=PLACEMENT),
        metadata=token("other", "read"),
    )
    assert not other.HasField("banner")


async def test_the_first_show_is_recorded_once_as_opened_and_every_show_is_counted(harness: Harness) -> None:
    profile_id = await web_customer(harness)
    await put_web_template(harness)
    key = await web_request(harness, profile_id)
    message_id = await placed(harness, profile_id)
    for _ in range(3):
        await get_banner(harness.delivery, anonymous_id=COOKIE)

    [opened] = await eventually(lambda: statuses(harness, "opened"))
    assert (opened.message_id, opened.idempotency_key, opened.status) == (
        message_id,
        key,
        delivery_pb2.MESSAGE_STATUS_OPENED,
    )

    async def shown() -> int:
        async with harness.engine.connect() as conn:
            return int(await conn.scalar(sa.text("SELECT shown_count FROM banners")) or 0)

    await eventually(lambda: _equals(shown, 4))
    await get_banner(harness.delivery, profile_id=profile_id)
    await eventually(lambda: _equals(shown, 5))
    assert len(await statuses(harness, "opened")) == 1
    message = await harness.final(key)
    assert [c.status for c in message.history] == [
        delivery_pb2.MESSAGE_STATUS_PENDING,
        delivery_pb2.MESSAGE_STATUS_SENT,
        delivery_pb2.MESSAGE_STATUS_OPENED,
    ]


async def test_the_banner_of_highest_priority_shows_then_the_newest(harness: Harness) -> None:
    profile_id = await web_customer(harness)
    await put_web_template(harness)
    low = await harness.final(await web_request(harness, profile_id, priority=1, trigger="browse"))
    high = await harness.final(await web_request(harness, profile_id, priority=9, trigger="cart"))
    await harness.clock.advance(60)
    newer_low = await harness.final(await web_request(harness, profile_id, priority=1, trigger="toys"))

    async def shows(message_id: str) -> bool:
        banner = await get_banner(harness.delivery, profile_id=profile_id)
        return banner is not None and banner.message_id == message_id

    await eventually(lambda: shows(high.message_id))
    await _withdraw(harness, profile_id, "cart")
    await eventually(lambda: shows(newer_low.message_id))
    assert low.message_id != newer_low.message_id


async def test_without_web_consent_no_banner_is_placed(harness: Harness) -> None:
    profile_id = await harness.customer()  # email consent only
    await put_web_template(harness)
    message = await harness.final(await web_request(harness, profile_id))
    assert (message.status, message.reason) == (delivery_pb2.MESSAGE_STATUS_SUPPRESSED, "consent_missing")
    assert await get_banner(harness.delivery, profile_id=profile_id) is None


# ---- taking it away ----------------------------------------


async def _withdraw(h: Harness, profile_id: str, trigger: str) -> None:
    msg = bus_pb2.DeliveryWithdrawal(
        tenant_id=TENANT,
        profile_id=profile_id,
        trigger_id=trigger,
        reason="cancelled",
        withdraw_time=to_timestamp(h.clock.now()),
    )
    await h.js.publish("rv.delivery.withdrawals", msg.SerializeToString())


async def test_a_withdrawal_removes_the_banner_and_records_withdrawn(harness: Harness) -> None:
    profile_id = await web_customer(harness)
    await put_web_template(harness)
    key = await web_request(harness, profile_id)
    message_id = await placed(harness, profile_id)

    await _withdraw(harness, profile_id, "another-trigger")
    await _withdraw(harness, profile_id, "cart")
    await eventually(lambda: _none(get_banner(harness.delivery, profile_id=profile_id)))
    assert await get_banner(harness.delivery, anonymous_id=COOKIE) is None

    [withdrawn] = await eventually(lambda: statuses(harness, "withdrawn"))
    assert (withdrawn.message_id, withdrawn.reason) == (message_id, "cancelled")
    message = await harness.final(key)
    assert message.history[-1].status == delivery_pb2.MESSAGE_STATUS_WITHDRAWN
    assert message.history[-1].reason == "cancelled"

    await _withdraw(harness, profile_id, "cart")  # again: nothing left to withdraw
    await stays(lambda: _more_than(statuses(harness, "withdrawn"), 1), duration=0.3)


async def test_a_withdrawal_that_came_before_the_request_was_placed_still_withdraws_it(
    harness: Harness,
) -> None:
    profile_id = await web_customer(harness)
    await put_web_template(harness)
    fired = harness.clock.now()
    await harness.clock.advance(60)
    await _withdraw(harness, profile_id, "cart")  # the purchase, handled before the retried request
    await eventually(lambda: _tombstone(harness, profile_id))

    late = await harness.final(await web_request(harness, profile_id, requested=fired))
    assert late.status == delivery_pb2.MESSAGE_STATUS_SENT
    # withdrawn as it was placed (in the same transaction, so before the send's outcome is written)
    assert (delivery_pb2.MESSAGE_STATUS_WITHDRAWN, "cancelled") in [
        (c.status, c.reason) for c in late.history
    ]
    await stays(lambda: get_banner(harness.delivery, profile_id=profile_id), duration=0.3)

    await harness.clock.advance(60)  # a new moment of the same trigger, after the withdrawal
    key = await web_request(harness, profile_id)
    assert (await eventually(lambda: get_banner(harness.delivery, profile_id=profile_id))).message_id == (
        await harness.final(key)
    ).message_id


async def _tombstone(h: Harness, profile_id: str) -> int:
    async with h.engine.connect() as conn:
        found = await conn.scalar(
            sa.text("SELECT count(*) FROM banner_withdrawals WHERE profile_id = :p"), {"p": profile_id}
        )
        return int(found or 0)


async def test_a_banner_expires_with_its_lifetime_or_the_moments_end_on_the_clock(harness: Harness) -> None:
    profile_id = await web_customer(harness)
    await put_web_template(harness, web_template(lifetime=timedelta(hours=2)))
    await web_request(harness, profile_id, trigger="cart")
    await placed(harness, profile_id)
    await web_request(harness, profile_id, trigger="flash-sale", priority=3, expire_in=timedelta(minutes=30))

    async def showing(trigger: str) -> bool:
        banner = await get_banner(harness.delivery, profile_id=profile_id)
        return banner is not None and banner.trigger_id == trigger

    await eventually(lambda: showing("flash-sale"))
    await harness.clock.advance(timedelta(minutes=30))
    assert await showing("cart")
    await harness.clock.advance(timedelta(minutes=90))
    assert await get_banner(harness.delivery, profile_id=profile_id) is None


async def test_a_banner_that_expires_unseen_is_recorded_withdrawn_expired(harness: Harness) -> None:
    profile_id = await web_customer(harness)
    await put_web_template(harness, web_template(lifetime=timedelta(hours=1)))
    key = await web_request(harness, profile_id)
    assert (await harness.final(key)).status == delivery_pb2.MESSAGE_STATUS_SENT

    await harness.clock.advance(timedelta(hours=1))
    [expired] = await eventually(lambda: statuses(harness, "withdrawn"))
    assert (expired.idempotency_key, expired.reason) == (key, "expired")
    message = await harness.final(key)
    assert (message.history[-1].status, message.history[-1].reason) == (
        delivery_pb2.MESSAGE_STATUS_WITHDRAWN,
        "expired",
    )
    assert await get_banner(harness.delivery, profile_id=profile_id) is None


async def test_a_banner_whose_moment_passed_before_it_was_placed_is_suppressed_not_failed(
    harness: Harness,
) -> None:
    profile_id = await web_customer(harness)
    await put_web_template(harness)
    key = await web_request(harness, profile_id, expire_in=timedelta(minutes=-1))
    message = await harness.final(key)
    assert (message.status, message.reason) == (delivery_pb2.MESSAGE_STATUS_SUPPRESSED, "banner_expired")
    assert await get_banner(harness.delivery, profile_id=profile_id) is None


async def test_a_consent_withdrawal_hides_the_banner(harness: Harness) -> None:
    profile_id = await web_customer(harness)
    await put_web_template(harness)
    key = await web_request(harness, profile_id)
    await placed(harness, profile_id)

    await harness.clock.advance(1)
    await harness.profiles.SetConsent(
        profile_pb2.SetConsentRequest(
            profile_id=profile_id,
            consent=profile_pb2.ConsentInput(
                purpose=common_pb2.PURPOSE_MARKETING,
                channel=common_pb2.CHANNEL_WEB,
                status=common_pb2.CONSENT_STATUS_WITHDRAWN,
                source="preferences",
            ),
        ),
        metadata=token(TENANT, "ingest"),
    )
    await eventually(lambda: _none(get_banner(harness.delivery, profile_id=profile_id)))
    message = await harness.final(key)
    assert (message.history[-1].status, message.history[-1].reason) == (
        delivery_pb2.MESSAGE_STATUS_WITHDRAWN,
        "consent_withdrawn",
    )


async def test_a_banner_placed_while_its_consent_withdrawal_was_handled_is_placed_withdrawn(
    harness: Harness,
) -> None:
    profile_id = await web_customer(harness)
    await put_web_template(harness)
    fired = harness.clock.now()
    await eventually(lambda: _consents_followed(harness, profile_id))  # the grant at signup
    # The withdrawal reached delivery (and was remembered) after profile answered the send-time
    # lookup: as if it happened between the lookup and the placement.
    async with harness.engine.begin() as conn:
        await conn.execute(
            sa.text("UPDATE banner_consents SET refused = true, changed_at = :at WHERE profile_id = :p"),
            {"p": profile_id, "at": fired},
        )
    key = await web_request(harness, profile_id, requested=fired)
    message = await harness.final(key)
    assert (delivery_pb2.MESSAGE_STATUS_WITHDRAWN, "consent_withdrawn") in [
        (c.status, c.reason) for c in message.history
    ]
    await stays(lambda: get_banner(harness.delivery, profile_id=profile_id), duration=0.3)


async def _consents_followed(h: Harness, profile_id: str) -> int:
    async with h.engine.connect() as conn:
        found = await conn.scalar(
            sa.text("SELECT count(*) FROM banner_consents WHERE profile_id = :p"), {"p": profile_id}
        )
        return int(found or 0)


# ---- people: merges and erasures ----------------------------------------


async def test_a_shadows_banner_moves_to_the_known_person_on_a_merge_and_goes_with_an_erasure(
    harness: Harness,
) -> None:
    known = await web_customer(harness, anonymous_id="cookie-known")
    shadow = (
        await harness.profiles.Track(
            profile_pb2.TrackRequest(event=profile_pb2.Event(type="page_view", anonymous_id="cookie-shadow")),
            metadata=token(TENANT, "ingest"),
        )
    ).profile_id
    await harness.profiles.SetConsent(
        profile_pb2.SetConsentRequest(
            profile_id=shadow,
            consent=profile_pb2.ConsentInput(
                purpose=common_pb2.PURPOSE_MARKETING,
                channel=common_pb2.CHANNEL_WEB,
                status=common_pb2.CONSENT_STATUS_GRANTED,
                source="cookie_banner",
            ),
        ),
        metadata=token(TENANT, "ingest"),
    )
    await put_web_template(harness)
    await web_request(harness, shadow)
    message_id = await placed(harness, shadow)

    # The visitor logs in: profile merges the shadow into the known person.
    await harness.profiles.Identify(
        profile_pb2.IdentifyRequest(email="ada@example.com", anonymous_id="cookie-shadow"),
        metadata=token(TENANT, "ingest"),
    )

    async def the_persons() -> bool:
        banner = await get_banner(harness.delivery, profile_id=known)
        return banner is not None and banner.message_id == message_id

    await eventually(the_persons)
    assert await get_banner(harness.delivery, profile_id=shadow) is None
    by_cookie = await get_banner(harness.delivery, anonymous_id="cookie-shadow")
    assert by_cookie is not None and by_cookie.message_id == message_id

    await harness.profiles.EraseProfile(
        profile_pb2.EraseProfileRequest(profile_id=known, request_id="erase-1"),
        metadata=token(TENANT, "admin"),
    )
    await eventually(lambda: _none(get_banner(harness.delivery, anonymous_id="cookie-shadow")))
    assert await get_banner(harness.delivery, profile_id=known) is None


async def test_a_web_message_left_mid_send_is_sent_if_its_banner_was_placed_else_failed(
    harness: Harness,
) -> None:
    profile_id = await web_customer(harness)
    await put_web_template(harness)
    now = harness.clock.now()
    async with harness.engine.begin() as conn:
        for key in ("placed-then-crashed", "claimed-then-crashed"):
            await conn.execute(
                sa.text(
                    "INSERT INTO messages (tenant_id, message_id, idempotency_key, profile_id, trigger_id,"
                    " channel, purpose, template_id, variables, status, reason, recipient, subject, attempts,"
                    " created_at, updated_at) VALUES (:t, :m, :k, :p, 'cart', 'web', 'marketing', :tpl, '{}',"
                    " 'sending', '', :p, 'Your cart', 0, :now, :now)"
                ),
                {"t": TENANT, "m": f"m-{key}", "k": key, "p": profile_id, "tpl": TEMPLATE, "now": now},
            )
        await conn.execute(
            sa.text(
                "INSERT INTO banners (tenant_id, message_id, profile_id, anonymous_ids, trigger_id, purpose,"
                " placement, title, body_text, link_url, priority, placed_at, expire_at, requested_at)"
                " VALUES (:t, 'm-placed-then-crashed', :p, '{}', 'cart', 'marketing', :pl, 'Your cart',"
                " 'is waiting', '', 0, :now, :later, :now)"
            ),
            {"t": TENANT, "p": profile_id, "pl": PLACEMENT, "now": now, "later": now + LIFETIME},
        )
    for key in ("placed-then-crashed", "claimed-then-crashed"):
        msg = bus_pb2.DeliveryRequest(
            idempotency_key=key,
            tenant_id=TENANT,
            profile_id=profile_id,
            trigger_id="cart",
            channel=common_pb2.CHANNEL_WEB,
            purpose=common_pb2.PURPOSE_MARKETING,
            template_id=TEMPLATE,
        )
        await harness.js.publish("rv.delivery.requests", msg.SerializeToString())

    placed = await harness.final("placed-then-crashed")
    assert (placed.status, placed.reason) == (delivery_pb2.MESSAGE_STATUS_SENT, "went_out_before_a_restart")
    lost = await harness.final("claimed-then-crashed")
    assert (lost.status, lost.reason) == (delivery_pb2.MESSAGE_STATUS_FAILED, "outcome_unknown")


# ---- every process, restarts ----------------------------------------


async def _start_delivery(h: Harness) -> tuple[ServiceHost, delivery_pb2_grpc.DeliveryServiceStub]:
    host = await build(h.settings, h.clock)
    await host.start()
    h.hosts.append(host)
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{host.port}")
    h.channels.append(channel)
    return host, delivery_pb2_grpc.DeliveryServiceStub(channel)


async def test_every_delivery_process_answers_with_the_banner_and_a_restart_keeps_it(
    harness: Harness,
) -> None:
    profile_id = await web_customer(harness)
    await put_web_template(harness)
    await web_request(harness, profile_id, trigger="cart")
    first = await placed(harness, profile_id)

    # A process started later loads what was placed; one placed now reaches both.
    second_host, second = await _start_delivery(harness)
    assert (await get_banner(second, profile_id=profile_id)).message_id == first  # type: ignore[union-attr]
    await web_request(harness, profile_id, trigger="toys", priority=7)

    async def both_show_toys() -> bool:
        answers = [await get_banner(s, profile_id=profile_id) for s in (harness.delivery, second)]
        return all(a is not None and a.trigger_id == "toys" for a in answers)

    await eventually(both_show_toys)

    # Withdrawn in one, gone in both; a restarted process still has the rest.
    await _withdraw(harness, profile_id, "toys")

    async def both_show_cart() -> bool:
        answers = [await get_banner(s, profile_id=profile_id) for s in (harness.delivery, second)]
        return all(a is not None and a.message_id == first for a in answers)

    await eventually(both_show_cart)
    await second_host.stop()
    harness.hosts.remove(second_host)
    _, restarted = await _start_delivery(harness)
    assert (await get_banner(restarted, anonymous_id=COOKIE)).message_id == first  # type: ignore[union-attr]


# ---- bad requests ----------------------------------------


async def test_get_banner_refuses_a_question_without_exactly_one_person_or_without_placement(
    harness: Harness,
) -> None:
    cases = [
        (delivery_pb2.GetBannerRequest(placement=PLACEMENT), "profile_id"),
        (
            delivery_pb2.GetBannerRequest(profile_id="p", anonymous_id="a", placement=PLACEMENT),
            "anonymous_id",
        ),
        (delivery_pb2.GetBannerRequest(profile_id="p"), "placement"),
        (delivery_pb2.GetBannerRequest(profile_id="p", placement="Not A Slot"), "placement"),
        (delivery_pb2.GetBannerRequest(profile_id="p" * 300, placement=PLACEMENT), "profile_id"),
    ]
    for request, field in cases:
        err = await rpc_error(harness.delivery.GetBanner(request, metadata=token(TENANT, "read")))
        assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert field in field_violations(err), (request, field_violations(err))


async def test_a_web_template_needs_its_placement_and_lifetime(harness: Harness) -> None:
    bad = web_template(placement="", banner_lifetime=None, link_url="{{ oops")
    err = await rpc_error(
        harness.delivery.PutTemplate(
            delivery_pb2.PutTemplateRequest(template=bad), metadata=token(TENANT, "admin")
        )
    )
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert set(field_violations(err)) == {
        "template.placement",
        "template.banner_lifetime",
        "template.link_url",
    }
    nothing = await rpc_error(
        harness.delivery.GetTemplate(
            delivery_pb2.GetTemplateRequest(template_id=TEMPLATE), metadata=token(TENANT, "read")
        )
    )
    assert nothing.code() == grpc.StatusCode.NOT_FOUND

    await put_web_template(harness)
    stored = await harness.delivery.GetTemplate(
        delivery_pb2.GetTemplateRequest(template_id=TEMPLATE), metadata=token(TENANT, "read")
    )
    assert (stored.template.placement, stored.template.banner_lifetime.seconds) == (PLACEMENT, 86_400)
    preview = await harness.delivery.PreviewTemplate(
        delivery_pb2.PreviewTemplateRequest(
            template_id=TEMPLATE,
            variables=to_struct(
                {"first_name": "Ada", "event": {"product_name": "shoes", "product_id": "sku-9"}}
            ),
        ),
        metadata=token(TENANT, "read"),
    )
    assert (preview.subject, preview.link_url) == (
        "Ada, your cart is waiting",
        "https://shop.example/cart?p=sku-9",
    )


# ---- from a trigger firing ----------------------------------------


async def test_an_abandoned_cart_trigger_on_the_web_channel_shows_its_banner_on_the_next_visit(
    system: System,
) -> None:
    md = system.token(TENANT, "admin")
    await put_web_template(system)
    trigger = cart_trigger()
    trigger.channel = common_pb2.CHANNEL_WEB
    trigger.template_id = TEMPLATE
    await system.triggers.CreateTrigger(trigger_pb2.CreateTriggerRequest(trigger=trigger), metadata=md)
    await system.profiles.Identify(
        profile_pb2.IdentifyRequest(
            email="ada@example.com",
            first_name="Ada",
            anonymous_id=COOKIE,
            consents=[
                profile_pb2.ConsentInput(
                    purpose=common_pb2.PURPOSE_MARKETING,
                    channel=common_pb2.CHANNEL_WEB,
                    status=common_pb2.CONSENT_STATUS_GRANTED,
                    source="signup_form",
                )
            ],
        ),
        metadata=system.token(TENANT, "ingest"),
    )
    await system.track(
        TENANT, "ada@example.com", "add_to_cart", product_name="Blue running shoes", product_id="sku-1"
    )
    await eventually(lambda: _pending_timers(system))
    await system.clock.advance(DELAY)

    banner = await eventually(lambda: get_banner(system.delivery, anonymous_id=COOKIE))
    assert banner.title == "Ada, your cart is waiting"
    assert banner.body_text == "You left Blue running shoes in your cart."
    assert banner.trigger_id == "abandoned-cart"


# ---- helpers ----------------------------------------


async def _pending_timers(system: System) -> int:
    return await system.scalar("trigger", "SELECT count(*) FROM timers WHERE status = 'pending'")


async def _equals(probe: Callable[[], Awaitable[int]], value: int) -> bool:
    return await probe() == value


async def _none(call: Awaitable[object]) -> bool:
    return await call is None


async def _more_than(call: Awaitable[Sized], n: int) -> bool:
    return len(await call) > n
