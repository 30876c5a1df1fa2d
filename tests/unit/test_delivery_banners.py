"""The banner domain: which banner a page is shown, the inbox of every person's banners, the web
channel's rules and templates, and the banner a web message carries."""

from __future__ import annotations

from dataclasses import replace
from datetime import UTC, datetime, timedelta
from typing import cast

import pytest

from relevans.delivery.v1 import delivery_pb2
from relevans.kit.bus import Bus
from relevans.kit.clock import ManualClock
from relevans.kit.errors import InvalidArgument
from relevans.kit.proto import to_timestamp
from services.delivery.banner_inbox import NO_BANNER, BannerBoard
from services.delivery.banner_rows import BannerRows, Placement
from services.delivery.channels.base import Outgoing, Refused
from services.delivery.channels.web import PLACEMENT_CHUNK, BannerOutgoing, WebTransport
from services.delivery.domain import (
    DeliveryRequest,
    Final,
    ProfileView,
    RawTemplate,
    Renderer,
    Send,
    SendOutcome,
    decide,
    validate_template,
)
from services.delivery.domain.banners import (
    BannerContent,
    BannerInbox,
    InboxEntry,
    PlacedBanner,
    check_banner_request,
    choose,
)
from services.delivery.domain.channels.web import BANNER_EXPIRED, WebChannel
from services.delivery.domain.templates import Template

NOW = datetime(2026, 1, 5, 9, 0, tzinfo=UTC)
WEB = WebChannel()


def banner(message_id: str = "m1", **fields: object) -> PlacedBanner:
    values: dict[str, object] = {
        "tenant_id": "shop",
        "message_id": message_id,
        "profile_id": "p1",
        "trigger_id": "cart",
        "placement": "cart-reminder",
        "title": "Your cart",
        "body_text": "is waiting",
        "link_url": "",
        "priority": 0,
        "placed_at": NOW,
        "expire_at": NOW + timedelta(hours=1),
        "anonymous_ids": ("cookie-1",),
    }
    values.update(fields)
    return PlacedBanner(**values)  # type: ignore[arg-type]


# ---- choosing ------------------------------------------------------------------------------------------


def entry(b: PlacedBanner) -> InboxEntry:
    return InboxEntry(
        message_id=b.message_id,
        placement=b.placement,
        priority=b.priority,
        placed_at=b.placed_at.timestamp(),
        expire_at=b.expire_at.timestamp(),
        anonymous=b.anonymous_ids,
        payload=b.message_id.encode(),
    )


def test_the_highest_priority_wins_then_the_newest() -> None:
    low_new = entry(banner("a", priority=1, placed_at=NOW + timedelta(minutes=5)))
    high_old = entry(banner("b", priority=5))
    high_new = entry(banner("c", priority=5, placed_at=NOW + timedelta(minutes=1)))
    assert choose([low_new, high_old, high_new], "cart-reminder", NOW + timedelta(minutes=6)) == high_new
    assert choose([low_new, high_old], "cart-reminder", NOW + timedelta(minutes=6)) == high_old


def test_only_the_asking_placement_is_considered() -> None:
    footer = entry(banner("a", placement="footer", priority=9))
    cart = entry(banner("b"))
    assert choose([footer, cart], "cart-reminder", NOW) == cart
    assert choose([cart], "footer", NOW) is None


def test_an_expired_banner_is_not_shown_from_its_expiry_on() -> None:
    b = entry(banner(expire_at=NOW + timedelta(minutes=10)))
    assert choose([b], "cart-reminder", NOW + timedelta(minutes=9, seconds=59)) == b
    assert choose([b], "cart-reminder", NOW + timedelta(minutes=10)) is None


def test_a_withdrawn_banner_never_enters_the_inbox() -> None:
    inbox = BannerInbox()
    put(inbox, banner(withdrawn=True))
    assert inbox.best("shop", "p1", "cart-reminder", NOW) is None
    assert len(inbox) == 0


def test_a_banner_expires_at_the_moments_end_or_after_its_lifetime_whichever_is_first() -> None:
    content = BannerContent(
        tenant_id="shop",
        trigger_id="cart",
        placement="cart-reminder",
        link_url="",
        priority=0,
        purpose="marketing",
        lifetime=timedelta(hours=24),
        expire_time=None,
        anonymous_ids=(),
    )
    assert content.expire_at(NOW) == NOW + timedelta(hours=24)
    soon = replace(content, expire_time=NOW + timedelta(hours=12))
    assert soon.expire_at(NOW) == NOW + timedelta(hours=12)
    late = replace(content, expire_time=NOW + timedelta(days=3))
    assert late.expire_at(NOW) == NOW + timedelta(hours=24)


# ---- the inbox -------------------------------------------------------------------------------------------


def put(inbox: BannerInbox, b: PlacedBanner) -> None:
    inbox.put(b, b.message_id.encode(), NOW)


def shown(inbox: BannerInbox, tenant: str = "shop", profile_id: str = "p1") -> bytes | None:
    found = inbox.best(tenant, profile_id, "cart-reminder", NOW)
    return found.payload if found is not None else None


def test_the_inbox_answers_by_profile_and_by_anonymous_id_per_tenant() -> None:
    inbox = BannerInbox()
    put(inbox, banner("m1"))
    put(inbox, banner("m2", tenant_id="other", profile_id="p1", anonymous_ids=("cookie-9",)))
    assert shown(inbox) == b"m1"
    assert inbox.person_of("shop", "cookie-1") == "p1"
    assert inbox.person_of("other", "cookie-1") is None
    assert shown(inbox, "other") == b"m2"
    assert shown(inbox, "nobody") is None
    assert len(inbox) == 2


def test_a_withdrawn_or_expired_banner_leaves_the_inbox_with_its_anonymous_ids() -> None:
    inbox = BannerInbox()
    put(inbox, banner("m1"))
    put(inbox, banner("m1", withdrawn=True))
    assert len(inbox) == 0
    assert inbox.person_of("shop", "cookie-1") is None
    put(inbox, banner("m2", expire_at=NOW))
    assert len(inbox) == 0


def test_an_anonymous_id_stays_while_another_banner_of_the_person_carries_it() -> None:
    inbox = BannerInbox()
    put(inbox, banner("m1"))
    put(inbox, banner("m2", trigger_id="toys", priority=3))
    assert shown(inbox) == b"m2"
    inbox.drop("shop", "m2")
    assert shown(inbox) == b"m1"
    put(inbox, banner("m2", trigger_id="toys"))
    inbox.drop("shop", "m1")
    assert inbox.person_of("shop", "cookie-1") == "p1"
    inbox.drop("shop", "m2")
    assert inbox.person_of("shop", "cookie-1") is None
    inbox.drop("shop", "m2")  # dropping what is gone changes nothing


def test_a_banner_moved_to_the_survivor_of_a_merge_answers_for_the_survivor() -> None:
    inbox = BannerInbox()
    put(inbox, banner("m1", profile_id="anon-profile"))
    put(inbox, banner("m1", profile_id="p1", anonymous_ids=("cookie-1", "cookie-2")))
    assert shown(inbox, profile_id="anon-profile") is None
    assert shown(inbox) == b"m1"
    assert inbox.person_of("shop", "cookie-2") == "p1"
    assert len(inbox) == 1


def test_prune_drops_what_has_expired_by_now() -> None:
    inbox = BannerInbox()
    put(inbox, banner("m1", expire_at=NOW + timedelta(minutes=1)))
    put(inbox, banner("m2", expire_at=NOW + timedelta(hours=1)))
    assert inbox.prune(NOW + timedelta(minutes=1)) == 1
    assert [(t, e.message_id) for t, e in inbox] == [("shop", "m2")]


def test_prune_in_steps_looks_at_every_person_once_per_sweep() -> None:
    inbox = BannerInbox()
    for i in range(7):
        put(
            inbox,
            banner(
                f"m{i}",
                profile_id=f"p{i}",
                anonymous_ids=(f"c{i}",),
                expire_at=NOW + timedelta(minutes=i + 1),
            ),
        )
    put(inbox, banner("x1", tenant_id="other", expire_at=NOW + timedelta(seconds=1)))
    later = NOW + timedelta(minutes=4)
    dropped = 0
    steps = 0
    while True:
        dropped += inbox.prune(later, budget=3)
        steps += 1
        if not inbox.sweeping:
            break
        late = banner("late", profile_id="p-late", anonymous_ids=(), expire_at=NOW + timedelta(seconds=1))
        put(inbox, late)  # not in this sweep
    assert steps == 3  # eight people, three at a time
    assert dropped == 5  # m0..m3 and x1
    assert sorted(e.message_id for _, e in inbox) == ["late", "m4", "m5", "m6"]
    assert inbox.prune(later) == 1  # the next sweep finds the one put meanwhile
    assert inbox.person_of("shop", "c0") is None and inbox.person_of("shop", "c4") == "p4"


def test_a_person_gone_while_a_sweep_is_under_way_is_skipped() -> None:
    inbox = BannerInbox()
    put(inbox, banner("m1", profile_id="p1", expire_at=NOW + timedelta(minutes=1)))
    put(inbox, banner("m2", profile_id="p2", anonymous_ids=("cookie-2",)))
    assert inbox.prune(NOW, budget=1) == 0 and inbox.sweeping
    inbox.drop("shop", "m1")
    inbox.drop("shop", "m2")
    assert inbox.prune(NOW + timedelta(hours=2), budget=1) == 0
    assert not inbox.sweeping and len(inbox) == 0


# ---- the answer ----------------------------------------------------------------------------------------


def _board() -> BannerBoard:
    return BannerBoard(cast(BannerRows, None), cast(Bus, None), ManualClock(NOW))


def _expected(b: PlacedBanner) -> delivery_pb2.GetBannerResponse:
    return delivery_pb2.GetBannerResponse(
        banner=delivery_pb2.Banner(
            message_id=b.message_id,
            trigger_id=b.trigger_id,
            placement=b.placement,
            title=b.title,
            body_text=b.body_text,
            link_url=b.link_url,
            priority=b.priority,
            expire_time=to_timestamp(b.expire_at),
        )
    )


@pytest.mark.parametrize(
    ("message_id", "fields"),
    [
        ("m1", {}),
        ("m2", {"expire_at": NOW + timedelta(days=90, microseconds=123_457), "priority": -3}),
        ("mé-" + "9" * 200, {"body_text": "ü" * 1000, "link_url": "https://x.example/" + "a" * 1900}),
    ],
)
def test_the_answer_is_the_banner_as_getbanner_serialized_it(
    message_id: str, fields: dict[str, object]
) -> None:
    board = _board()
    b = banner(message_id, **fields)
    board.hold(b, NOW)
    answer = board.answer("shop", "cart-reminder", profile_id="p1")
    assert delivery_pb2.GetBannerResponse.FromString(answer) == _expected(b)
    assert board.answer("shop", "cart-reminder", anonymous_id="cookie-1") == answer


def test_banners_of_one_content_share_it_and_keep_their_own_id_and_expiry() -> None:
    board = _board()
    one = banner("m1")
    two = banner("m2", profile_id="p2", anonymous_ids=("cookie-2",), expire_at=NOW + timedelta(minutes=5))
    board.hold(one, NOW)
    board.hold(two, NOW)
    [(_, first), (_, second)] = sorted(board.inbox, key=lambda te: te[1].message_id)
    assert first.payload is second.payload
    assert delivery_pb2.GetBannerResponse.FromString(
        board.answer("shop", "cart-reminder", profile_id="p2")
    ) == (_expected(two))
    assert delivery_pb2.GetBannerResponse.FromString(
        board.answer("shop", "cart-reminder", profile_id="p1")
    ) == (_expected(one))


def test_no_banner_is_an_empty_answer_and_counts_no_show() -> None:
    board = _board()
    board.hold(banner("m1"), NOW)
    assert board.answer("shop", "cart-reminder", profile_id="nobody") == NO_BANNER
    assert board.answer("shop", "footer", profile_id="p1") == NO_BANNER
    assert board.answer("shop", "cart-reminder", anonymous_id="cookie-9") == NO_BANNER
    assert delivery_pb2.GetBannerResponse.FromString(NO_BANNER) == delivery_pb2.GetBannerResponse()
    assert board._shows == {}
    board.answer("shop", "cart-reminder", profile_id="p1")
    board.answer("shop", "cart-reminder", anonymous_id="cookie-1")
    assert board._shows == {("shop", "m1"): (2, NOW)}


# ---- the question --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("profile_id", "anonymous_id", "placement", "fields"),
    [
        ("", "", "cart-reminder", {"profile_id"}),
        ("p1", "cookie-1", "cart-reminder", {"anonymous_id"}),
        ("p1", "", "", {"placement"}),
        ("p1", "", "Cart Reminder", {"placement"}),
        ("x" * 257, "", "cart-reminder", {"profile_id"}),
        ("", "", "", {"profile_id", "placement"}),
    ],
)
def test_a_banner_question_needs_exactly_one_person_and_a_placement(
    profile_id: str, anonymous_id: str, placement: str, fields: set[str]
) -> None:
    with pytest.raises(InvalidArgument) as caught:
        check_banner_request(profile_id, anonymous_id, placement)
    assert {v.field for v in caught.value.violations} == fields


def test_a_good_banner_question_passes() -> None:
    check_banner_request("p1", "", "cart-reminder")
    check_banner_request("", "cookie-1", "toys_2")


# ---- the channel and its templates ---------------------------------------------------------------------


def test_the_web_address_is_the_person_and_a_failed_placement_is_retried() -> None:
    assert WEB.address(ProfileView("p1")) == "p1"
    assert WEB.address_problem("") == "no_address"
    assert WEB.address_problem("p1") is None
    assert WEB.final(SendOutcome("sent", "cart-reminder"), 1).status == "sent"
    assert WEB.final(SendOutcome("transient", "db down"), 1).status == "pending"


def test_a_web_template_needs_a_placement_and_a_lifetime() -> None:
    raw = RawTemplate(template_id="t", channel="web", subject="Hi", body_text="Body")
    with pytest.raises(InvalidArgument) as caught:
        validate_template(raw, Renderer())
    assert {v.field for v in caught.value.violations} == {"template.placement", "template.banner_lifetime"}
    too_long = replace(raw, placement="cart", banner_lifetime=timedelta(days=91))
    with pytest.raises(InvalidArgument, match=r"template\.banner_lifetime"):
        validate_template(too_long, Renderer())
    ok = validate_template(replace(raw, placement="cart", banner_lifetime=timedelta(hours=1)), Renderer())
    assert (ok.placement, ok.banner_lifetime) == ("cart", timedelta(hours=1))


def test_an_email_template_keeps_no_banner_fields() -> None:
    raw = RawTemplate(
        template_id="t", channel="email", subject="Hi", body_text="Body", placement="cart", link_url="x"
    )
    t = validate_template(raw, Renderer())
    assert (t.placement, t.banner_lifetime, t.link_url) == ("", None, "")


def _web_template(**fields: object) -> Template:
    values: dict[str, object] = {
        "template_id": "cart-banner",
        "channel": "web",
        "locale": "en",
        "subject": "{{ first_name | fallback('Hello') }}, your cart",
        "body_text": "You left {{ event.product_name }}.",
        "placement": "cart-reminder",
        "banner_lifetime": timedelta(hours=24),
        "link_url": "https://shop.example/cart?p={{ event.product_id }}",
    }
    values.update(fields)
    return Template(**values)  # type: ignore[arg-type]


def _request(**fields: object) -> DeliveryRequest:
    values: dict[str, object] = {
        "idempotency_key": "k",
        "tenant_id": "shop",
        "profile_id": "p1",
        "trigger_id": "cart",
        "channel": "web",
        "purpose": "marketing",
        "template_id": "cart-banner",
        "variables": {"event": {"product_name": "shoes", "product_id": "sku 1"}},
        "priority": 4,
        "expire_at": NOW + timedelta(hours=2),
    }
    values.update(fields)
    return DeliveryRequest(**values)  # type: ignore[arg-type]


PERSON = ProfileView(
    "p1", first_name="Ada", consents={("marketing", "web"): "granted"}, anonymous_ids=("cookie-1",)
)


def test_a_web_message_carries_its_banner() -> None:
    decision = decide(_request(), PERSON, _web_template(), Renderer())
    assert isinstance(decision, Send)
    assert (decision.recipient, decision.subject, decision.body_text) == (
        "p1",
        "Ada, your cart",
        "You left shoes.",
    )
    assert decision.banner == BannerContent(
        tenant_id="shop",
        trigger_id="cart",
        placement="cart-reminder",
        link_url="https://shop.example/cart?p=sku1",
        priority=4,
        purpose="marketing",
        lifetime=timedelta(hours=24),
        expire_time=NOW + timedelta(hours=2),
        anonymous_ids=("cookie-1",),
    )


def test_web_consent_is_checked_and_a_banner_too_long_is_not_placed() -> None:
    no_consent = replace(PERSON, consents={("marketing", "email"): "granted"})
    assert decide(_request(), no_consent, _web_template(), Renderer()) == Final(
        "suppressed", "consent_missing"
    )
    long_body = _web_template(body_text="x" * 1001)
    decision = decide(_request(), PERSON, long_body, Renderer())
    assert decision == Final("suppressed", "render_failed: body_text: longer than 1000 characters")
    long_title = _web_template(subject="t" * 201)
    decision = decide(_request(), PERSON, long_title, Renderer())
    assert isinstance(decision, Final) and "subject: longer than 200 characters" in decision.reason


# ---- the transport: claims, placing, outcomes -----------------------------------------------------------


class _Rows:
    """BannerRows' `place`, recording what was placed (or failing, like a database gone away)."""

    def __init__(self, fail: bool = False) -> None:
        self.fail = fail
        self.placed: list[list[str]] = []

    async def place(self, placements: list[Placement], now: datetime) -> None:
        if self.fail:
            raise ConnectionError("database unavailable")
        self.placed.append([p.banner.message_id for p in placements])


class _Handover:
    def __init__(self, refuse: frozenset[int] = frozenset()) -> None:
        self.refuse = refuse
        self.claimed: list[int] = []
        self.reports: dict[int, SendOutcome] = {}

    async def claim(self, index: int) -> bool:
        self.claimed.append(index)
        return index not in self.refuse

    def report(self, index: int, outcome: SendOutcome) -> None:
        self.reports[index] = outcome


def _outgoing(transport: WebTransport, n: int) -> list[Outgoing]:
    decision = decide(_request(), PERSON, _web_template(), Renderer())
    assert isinstance(decision, Send)
    return [transport.compose(f"m{i}", decision, NOW) for i in range(n)]


async def test_the_web_transport_places_what_it_claimed_in_chunks_and_reports_it_sent() -> None:
    rows = _Rows()
    transport = WebTransport(cast(BannerRows, rows), ManualClock(NOW))
    handover = _Handover(refuse=frozenset({3}))
    await transport.send_many(_outgoing(transport, PLACEMENT_CHUNK + 5), handover)
    assert len(rows.placed) == 2 and len(rows.placed[0]) == PLACEMENT_CHUNK - 1
    assert "m3" not in rows.placed[0]
    assert 3 not in handover.reports
    assert {o.kind for o in handover.reports.values()} == {"sent"}
    assert len(handover.reports) == PLACEMENT_CHUNK + 4


async def test_banners_that_could_not_be_written_are_reported_for_a_retry() -> None:
    transport = WebTransport(cast(BannerRows, _Rows(fail=True)), ManualClock(NOW))
    handover = _Handover()
    await transport.send_many(_outgoing(transport, 3), handover)
    assert [o.kind for o in handover.reports.values()] == ["transient"] * 3
    assert WEB.final(handover.reports[0], 1).status == "pending"


def test_a_banner_is_composed_with_its_expiry_and_a_passed_moment_is_refused_as_expired() -> None:
    transport = WebTransport(cast(BannerRows, _Rows()), ManualClock(NOW))
    [out] = _outgoing(transport, 1)
    assert isinstance(out, BannerOutgoing)
    assert out.placement.banner.expire_at == NOW + timedelta(hours=2)  # the moment's end comes first
    assert out.placement.banner.anonymous_ids == ("cookie-1",)
    passed = decide(_request(expire_at=NOW), PERSON, _web_template(), Renderer())
    assert isinstance(passed, Send)
    with pytest.raises(Refused) as refused:
        transport.compose("m9", passed, NOW)
    assert refused.value.reason == BANNER_EXPIRED
