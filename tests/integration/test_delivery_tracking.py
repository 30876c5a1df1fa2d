"""Delivery's HTTP endpoint end to end: real profile and delivery services, PostgreSQL, NATS, an
SMTP sink, and real HTTP on loopback to the links in the mail that arrived."""

from __future__ import annotations

import base64
import re
from collections.abc import AsyncIterator
from dataclasses import replace
from email.message import EmailMessage
from pathlib import Path

import aiohttp
import grpc
import pytest_asyncio
import sqlalchemy as sa

from relevans.common.v1 import common_pb2
from relevans.delivery.v1 import delivery_pb2
from relevans.kit.clock import ManualClock
from relevans.kit.settings import Settings
from relevans.profile.v1 import bus_pb2 as profile_bus_pb2
from relevans.profile.v1 import profile_pb2
from services.delivery.domain.tracking import PIXEL_GIF
from services.delivery.engagements import MAX_RETRY_S
from services.profile.app import build as build_profile
from tests.helpers import eventually, stays
from tests.helpers.cart import SUBJECT
from tests.helpers.delivery import TENANT, Harness, token

SHOP_URL = "https://shop.example/cart?p=1&q=2"
BODY = "Hi {{ first_name | fallback('there') }},\nyour cart is waiting: " + SHOP_URL + "\n"
TEMPLATE = "cart-link"
ONE_CLICK = {"List-Unsubscribe": "One-Click"}
MARKETING_EMAIL = (common_pb2.PURPOSE_MARKETING, common_pb2.CHANNEL_EMAIL)


@pytest_asyncio.fixture
async def harness(
    settings: Settings, clock: ManualClock, nats_url: str, tmp_path: Path
) -> AsyncIterator[Harness]:
    h = Harness(settings, clock, nats_url, tmp_path / "mail")
    try:
        await h.start()
        await h.put_template(TEMPLATE, SUBJECT, BODY)
        yield h
    finally:
        await h.close()


@pytest_asyncio.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


# ---- what the mail carries ----------------------------------------------------------------------


def unsubscribe_link(mail: EmailMessage) -> str:
    [link] = [p.strip(" <>") for p in str(mail["List-Unsubscribe"]).split(",") if "/u/" in p]
    assert link.startswith("http://127.0.0.1:")
    return link


def pixel_link(mail: EmailMessage) -> str:
    html = mail.get_body(preferencelist=("html",))
    assert html is not None
    [link] = re.findall(r'<img src="([^"]+/o/[^"]+)"', str(html.get_content()))
    return str(link)


def click_links(mail: EmailMessage) -> list[str]:
    text = mail.get_body(preferencelist=("plain",))
    assert text is not None
    return re.findall(r"http://127\.0\.0\.1:\d+/c/[A-Za-z0-9_.-]+", str(text.get_content()))


def with_token(link: str, new_token: str) -> str:
    return link.rsplit("/", 1)[0] + "/" + new_token


def tampered(link: str, old: bytes, new: bytes) -> str:
    """The link with `old` replaced by `new` inside its signed payload, the signature kept."""
    body, tag = link.rsplit("/", 1)[1].split(".")
    payload = base64.urlsafe_b64decode(body + "=" * (-len(body) % 4)).replace(old, new)
    return with_token(link, base64.urlsafe_b64encode(payload).rstrip(b"=").decode() + "." + tag)


# ---- what the services recorded -----------------------------------------------------------------


async def mail_to(harness: Harness, email: str) -> EmailMessage:
    async def arrived() -> list[EmailMessage]:
        return [m for m in harness.mails() if email in str(m["To"])]

    [mail] = await eventually(arrived)
    return mail


async def consent(harness: Harness, profile_id: str) -> list[profile_pb2.Consent]:
    reply = await harness.profiles.GetProfile(
        profile_pb2.GetProfileRequest(profile_id=profile_id), metadata=token(TENANT, "read")
    )
    return [c for c in reply.profile.consents if (c.purpose, c.channel) == MARKETING_EMAIL]


async def consent_status(harness: Harness, profile_id: str) -> int:
    [c] = await consent(harness, profile_id)
    return c.status


async def history(harness: Harness, message_id: str) -> list[tuple[int, str]]:
    reply = await harness.delivery.GetMessage(
        delivery_pb2.GetMessageRequest(message_id=message_id), metadata=token(TENANT, "read")
    )
    return [(c.status, c.reason) for c in reply.message.history]


async def status_subjects(harness: Harness, message_id: str) -> list[str]:
    return [str(s) for s, e in await harness.status_events() if e.message_id == message_id]


async def profile_events(harness: Harness, event_type: str) -> list[profile_bus_pb2.EnrichedEvent]:
    """The events of `event_type` profile stored and published (rv.events.*)."""
    info = await harness.js.stream_info("RV_EVENTS")
    out = []
    if info.state.messages:
        for seq in range(info.state.first_seq, info.state.last_seq + 1):
            raw = await harness.js.get_msg("RV_EVENTS", seq)
            event = profile_bus_pb2.EnrichedEvent.FromString(raw.data or b"")
            if event.event.type == event_type:
                out.append(event)
    return out


async def sent_message(harness: Harness, profile_id: str, purpose: int = common_pb2.PURPOSE_MARKETING) -> str:
    key = await harness.request(profile_id, template_id=TEMPLATE, purpose=purpose)
    message = await harness.final(key)
    assert message.status == delivery_pb2.MESSAGE_STATUS_SENT, message.reason
    return str(message.message_id)


# ---- one-click unsubscribe ----------------------------------------------------------------------


async def test_one_click_post_unsubscribes_at_once_and_only_once(
    harness: Harness, http: aiohttp.ClientSession
) -> None:
    ada = await harness.customer()
    message_id = await sent_message(harness, ada)
    link = unsubscribe_link(await mail_to(harness, "ada@example.com"))
    granted = await consent(harness, ada)
    assert [c.status for c in granted] == [common_pb2.CONSENT_STATUS_GRANTED]

    # a GET (a mail scanner, or the person's browser) only shows the button
    async with http.get(link) as page:
        assert page.status == 200
        html = await page.text()
    assert '<form method="post">' in html and 'name="List-Unsubscribe" value="One-Click"' in html
    # a forged or altered token, or a POST without the one-click body, changes nothing
    async with http.post(tampered(link, b"shop", b"shoq"), data=ONE_CLICK) as forged:
        assert forged.status == 400
        assert "not valid" in await forged.text()
    async with http.post(with_token(link, "x" + link.rsplit("/", 1)[1]), data=ONE_CLICK) as forged:
        assert forged.status == 400
    async with http.post(link, data={"something": "else"}) as no_body:
        assert no_body.status == 400
    assert await consent(harness, ada) == granted
    assert [s for s, _ in await history(harness, message_id)] == [
        delivery_pb2.MESSAGE_STATUS_PENDING,
        delivery_pb2.MESSAGE_STATUS_SENT,
    ]

    async with http.post(link, data=ONE_CLICK) as done:
        assert done.status == 200
        assert "You are unsubscribed" in await done.text()
    # withdrawn before the answer came
    [withdrawn] = await consent(harness, ada)
    assert withdrawn.status == common_pb2.CONSENT_STATUS_WITHDRAWN
    assert withdrawn.source == "one_click_unsubscribe"
    assert (await history(harness, message_id))[-1] == (
        delivery_pb2.MESSAGE_STATUS_UNSUBSCRIBED,
        "one_click: marketing consent on email withdrawn",
    )
    assert await eventually(
        lambda: status_subjects_with(harness, message_id, "rv.delivery.status.unsubscribed")
    )
    [event] = await eventually(lambda: profile_events(harness, "email_unsubscribed"))
    assert event.profile_id == ada
    assert dict(event.event.properties) == {"message_id": message_id, "trigger_id": "abandoned-cart"}

    # the second POST changes nothing
    entries = await history(harness, message_id)
    async with http.post(link, data=ONE_CLICK) as again:
        assert again.status == 200
    await stays(lambda: repeated(harness, "email_unsubscribed"), duration=0.3)
    assert await history(harness, message_id) == entries
    assert await consent(harness, ada) == [withdrawn]
    assert (await status_subjects(harness, message_id)).count("rv.delivery.status.unsubscribed") == 1

    # the next marketing message is suppressed; a transactional one still goes
    marketing = await harness.final(await harness.request(ada, template_id=TEMPLATE))
    assert (marketing.status, marketing.reason) == (
        delivery_pb2.MESSAGE_STATUS_SUPPRESSED,
        "consent_withdrawn",
    )
    await sent_message(harness, ada, purpose=common_pb2.PURPOSE_TRANSACTIONAL)


async def status_subjects_with(harness: Harness, message_id: str, subject: str) -> bool:
    return subject in await status_subjects(harness, message_id)


async def repeated(harness: Harness, event_type: str) -> bool:
    return len(await profile_events(harness, event_type)) > 1


async def test_an_unsubscribe_while_profile_is_away_holds_at_once_and_reaches_profile_when_it_is_back(
    harness: Harness, http: aiohttp.ClientSession
) -> None:
    ada = await harness.customer()
    await sent_message(harness, ada)
    link = unsubscribe_link(await mail_to(harness, "ada@example.com"))
    profile_host = harness.hosts[0]
    await profile_host.stop()

    # as multipart/form-data this time, which RFC 8058 allows too
    with aiohttp.MultipartWriter("form-data") as body:
        body.append("One-Click").set_content_disposition("form-data", name="List-Unsubscribe")
    async with http.post(link, data=body) as recorded:
        assert recorded.status == 200
        assert "You are unsubscribed" in await recorded.text()

    restarted = await build_profile(
        replace(harness.settings, profile_listen=f"127.0.0.1:{profile_host.port}"), harness.clock
    )
    await restarted.start()
    harness.hosts.append(restarted)
    # profile does not know of the unsubscribe yet, and still no marketing message goes
    assert await eventually(lambda: reachable_status(harness, ada)) == common_pb2.CONSENT_STATUS_GRANTED
    marketing = await harness.final(await harness.request(ada, template_id=TEMPLATE))
    assert (marketing.status, marketing.reason) == (
        delivery_pb2.MESSAGE_STATUS_SUPPRESSED,
        "consent_withdrawn",
    )

    async def withdrawn_once_retried() -> bool:
        await harness.clock.advance(MAX_RETRY_S)  # past any back-off of the retries
        return await is_withdrawn(harness, ada)

    assert await eventually(withdrawn_once_retried, timeout=15, interval=0.2)
    [event] = await eventually(lambda: profile_events(harness, "email_unsubscribed"))
    assert event.profile_id == ada


async def reachable_status(harness: Harness, profile_id: str) -> int:
    """The consent's status, 0 while the test's channel reconnects to the restarted service."""
    try:
        return await consent_status(harness, profile_id)
    except grpc.aio.AioRpcError as exc:
        assert exc.code() == grpc.StatusCode.UNAVAILABLE
        return 0


async def is_withdrawn(harness: Harness, profile_id: str) -> bool:
    return await reachable_status(harness, profile_id) == common_pb2.CONSENT_STATUS_WITHDRAWN


# ---- opens and clicks ---------------------------------------------------------------------------


async def test_an_open_and_a_click_arrive_in_profile_as_events_of_the_right_person(
    harness: Harness, http: aiohttp.ClientSession
) -> None:
    await harness.customer("bob@example.com", "Bob")
    ada = await harness.customer("ada@example.com", "Ada")
    message_id = await sent_message(harness, ada)
    mail = await mail_to(harness, "ada@example.com")

    for _ in range(2):
        async with http.get(pixel_link(mail)) as pixel:
            assert pixel.status == 200
            assert pixel.headers["Content-Type"] == "image/gif"
            assert await pixel.read() == PIXEL_GIF
    [click] = click_links(mail)
    async with http.get(click, allow_redirects=False) as redirect:
        assert redirect.status == 302
        assert redirect.headers["Location"] == SHOP_URL

    [opened] = await eventually(lambda: profile_events(harness, "email_opened"))
    [clicked] = await eventually(lambda: profile_events(harness, "link_clicked"))
    assert opened.profile_id == clicked.profile_id == ada
    assert dict(opened.event.properties) == {"message_id": message_id, "trigger_id": "abandoned-cart"}
    assert dict(clicked.event.properties) == {
        "message_id": message_id,
        "trigger_id": "abandoned-cart",
        "url": SHOP_URL,
    }
    # the open counted twice, recorded once
    statuses = [s for s, _ in await history(harness, message_id)]
    assert statuses.count(delivery_pb2.MESSAGE_STATUS_OPENED) == 1
    assert statuses.count(delivery_pb2.MESSAGE_STATUS_CLICKED) == 1
    rows = await harness_rows(harness, message_id)
    assert rows == [("click", SHOP_URL, 1), ("open", "", 2)]
    await stays(lambda: repeated(harness, "email_opened"), duration=0.3)
    subjects = await status_subjects(harness, message_id)
    assert subjects.count("rv.delivery.status.opened") == subjects.count("rv.delivery.status.clicked") == 1


async def harness_rows(harness: Harness, message_id: str) -> list[tuple[str, str, int]]:
    async with harness.engine.connect() as conn:
        result = await conn.exec_driver_sql(
            "SELECT kind, link, count FROM engagements WHERE message_id = $1 ORDER BY kind", (message_id,)
        )
        return [tuple(r) for r in result.all()]


async def test_a_click_redirects_only_to_the_url_in_the_message(
    harness: Harness, http: aiohttp.ClientSession
) -> None:
    ada = await harness.customer()
    message_id = await sent_message(harness, ada)
    mail = await mail_to(harness, "ada@example.com")
    [click] = click_links(mail)
    base = click.rsplit("/c/", 1)[0]
    unsigned = base64.urlsafe_b64encode(f"c\x1f{TENANT}\x1f{message_id}\x1fhttps://evil.example/".encode())

    refused = [
        tampered(click, b"shop.example", b"evil.example"),
        with_token(click, pixel_link(mail).rsplit("/", 1)[1]),  # an open token on the click route
        f"{base}/c/not-a-token",
        f"{base}/c/{unsigned.decode()}.AAAA",
    ]
    for link in refused:
        async with http.get(link, allow_redirects=False) as answer:
            assert answer.status == 400, link
            assert "Location" not in answer.headers
    assert delivery_pb2.MESSAGE_STATUS_CLICKED not in [s for s, _ in await history(harness, message_id)]
    async with http.get(click, allow_redirects=False) as redirect:
        assert redirect.headers["Location"] == SHOP_URL


async def test_an_erased_persons_engagements_go_with_their_messages(
    harness: Harness, http: aiohttp.ClientSession
) -> None:
    ada = await harness.customer()
    message_id = await sent_message(harness, ada)
    mail = await mail_to(harness, "ada@example.com")
    [click] = click_links(mail)
    async with http.get(click, allow_redirects=False) as redirect:
        assert redirect.status == 302
    await eventually(lambda: profile_events(harness, "link_clicked"))
    assert await harness_rows(harness, message_id) == [("click", SHOP_URL, 1)]

    await harness.profiles.EraseProfile(
        profile_pb2.EraseProfileRequest(profile_id=ada), metadata=token(TENANT, "admin")
    )

    async def gone() -> bool:
        return not await harness.messages(profile_id=ada)

    await eventually(gone)
    assert await harness_rows(harness, message_id) == []
    # the links still lead where they did, and record nothing
    async with http.get(click, allow_redirects=False) as redirect:
        assert redirect.headers["Location"] == SHOP_URL
    async with http.get(pixel_link(mail)) as pixel:
        assert pixel.status == 200
    async with http.post(unsubscribe_link(mail), data=ONE_CLICK) as answer:
        assert answer.status == 404
    assert await harness_rows(harness, message_id) == []
    async with harness.engine.connect() as conn:
        assert await conn.scalar(sa.text("SELECT count(*) FROM profile_reports")) == 0
