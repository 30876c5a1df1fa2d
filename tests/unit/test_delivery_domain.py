"""The delivery service's pure domain: names, safe rendering, templates and the send decision."""

from __future__ import annotations

import itertools
from datetime import UTC, datetime, timedelta

import pytest

from relevans.kit.errors import InvalidArgument
from relevans.kit.paging import encode_page_token
from relevans.kit.proto import from_struct
from services.delivery.consumers import decode_request
from services.delivery.domain import (
    FAILED,
    MAX_ATTEMPTS,
    MESSAGE_PAGES,
    PENDING,
    SENT,
    SUPPRESSED,
    DeliveryRequest,
    Final,
    ProfileView,
    RawTemplate,
    Renderer,
    RenderError,
    Send,
    SendOutcome,
    Template,
    after_transient,
    compose_email,
    decide,
    email_bytes,
    fallback,
    message_variables,
    page_before,
    recipient_check,
    redelivery,
    smtp_final,
    template_variables,
    unsafe_output,
    validate_template,
)
from tests.helpers.cart import BODY, SUBJECT

NOW = datetime(2026, 1, 5, 9, 0, tzinfo=UTC)
TEMPLATE = Template("cart-reminder", "email", "en", SUBJECT, BODY)
GRANTED = {("marketing", "email"): "granted"}


@pytest.fixture(scope="module")
def renderer() -> Renderer:
    return Renderer()


def request(**overrides: object) -> DeliveryRequest:
    base: dict[str, object] = {
        "idempotency_key": "abandoned-cart:p1:e1",
        "tenant_id": "shop",
        "profile_id": "p1",
        "trigger_id": "abandoned-cart",
        "channel": "email",
        "purpose": "marketing",
        "template_id": "cart-reminder",
        "variables": {"event": {"product_name": "Blue running shoes"}},
    }
    base.update(overrides)
    return DeliveryRequest(**base)  # type: ignore[arg-type]


def profile(**overrides: object) -> ProfileView:
    base: dict[str, object] = {
        "profile_id": "p1",
        "email": "ada@example.com",
        "first_name": "Ada",
        "consents": GRANTED,
    }
    base.update(overrides)
    return ProfileView(**base)  # type: ignore[arg-type]


# First names: tests/unit/test_delivery_names.py.


# ---- rendering ----------------------------------------------------------------------------------


def test_fallback_replaces_undefined_none_and_empty_values() -> None:
    from jinja2 import StrictUndefined

    assert fallback(StrictUndefined(name="x"), "there") == "there"
    assert fallback(None, "there") == "there"
    assert fallback("  ", "there") == "there"
    assert fallback([], "there") == "there"
    assert fallback("Ada", "there") == "Ada"
    assert fallback(0, "there") == 0


def test_renders_subject_and_body_with_the_name(renderer: Renderer) -> None:
    out = renderer.render(SUBJECT, BODY, {"first_name": "Ada", "event": {"product_name": "Shoes"}})
    assert out.subject == "Ada, your cart is waiting"
    assert out.body_text == "Hi Ada,\nyou left Shoes in your cart.\n"


def test_missing_name_falls_back(renderer: Renderer) -> None:
    out = renderer.render(SUBJECT, BODY, {"event": {"product_name": "Shoes"}})
    assert out.subject == "Hello, your cart is waiting"
    assert out.body_text.startswith("Hi there,")


def test_none_values_count_as_missing(renderer: Renderer) -> None:
    out = renderer.render(SUBJECT, BODY, {"first_name": None, "event": {"product_name": "Shoes"}})
    assert out.body_text.startswith("Hi there,")


@pytest.mark.parametrize(
    ("body", "why"),
    [
        ("Hi {{ first_name }},", "'first_name' is undefined"),
        ("Your code: {{ coupon }}", "'coupon' is undefined"),
        ("{{ event.missing }}", "has no attribute 'missing'"),
        ("{% for i in range(100000) %}{% endfor %}x", "range() may yield at most 10000"),
        ("{{ 'a' * 10000000 }}", "larger than"),
        ("{% set a = 'aaaaaaaaaaaaaaaa' %}" + "{% set a = a ~ a %}" * 30 + "{{ a }}", "larger than"),
        ("{{ 'x'.format(1) }}", "unsafe"),
        ("{{ ''.__class__ }}", "unsafe"),
        ("{{ 2 ** 10000000 }}", "too large"),
        ("{{ '%99999s' % 'a' }}", "format widths"),
        ("Hi {{ '' }},", "empty greeting"),
        ("Dear,\nthanks", "empty greeting"),
        ("{{ '{{' }} x", "'{{'"),
        ("Your name is {{ name }}", "'None'"),
        ("it is {{ state }}", "'undefined'"),
        ("{% macro m() %}{{ m() }}{% endmacro %}{{ m() }}", "recursion"),
    ],
)
def test_unsafe_renders_are_refused_with_a_reason(body: str, why: str) -> None:
    variables = {"event": {"product_name": "Shoes"}, "name": "None", "state": "undefined"}
    # Each refusal is for its own reason, not the CPU budget a busy machine may exhaust first
    # (the budget has its own test below).
    unhurried = Renderer(time_limit_s=60)
    with pytest.raises(RenderError) as caught:
        unhurried.render("Subject", body, variables)
    assert why in caught.value.why
    assert caught.value.reason.startswith("render_failed: body_text: ")


def test_a_render_over_its_time_budget_is_stopped() -> None:
    ticks = itertools.count()
    slow = Renderer(timer=lambda: next(ticks) * 0.01, time_limit_s=0.25)
    with pytest.raises(RenderError) as caught:
        slow.render(
            "s", "{% for i in range(10000) %}{% for j in range(10000) %}{% endfor %}{% endfor %}x", {}
        )
    assert "time limit" in caught.value.why


def test_output_size_is_limited() -> None:
    small = Renderer(max_output_bytes=1000)
    with pytest.raises(RenderError) as caught:
        small.render("s", "{% for i in range(500) %}{{ i }}-{% endfor %}", {})
    assert "larger than" in caught.value.why


def test_subject_runs_of_spaces_and_tabs_become_one_space(renderer: Renderer) -> None:
    out = renderer.render("Hello \t {{ x }}   there", "body", {"x": "you"})
    assert out.subject == "Hello you there"


@pytest.mark.parametrize("value", ["you\nBcc: everyone@example.com", "you\r\nX-Evil: 1", "you\r"])
def test_a_subject_a_variable_breaks_into_lines_is_refused_not_folded(renderer: Renderer, value: str) -> None:
    with pytest.raises(RenderError) as caught:
        renderer.render("Hello {{ x }}", "body", {"x": value})
    assert caught.value.why == "subject: contains a line break (CR or LF)"


@pytest.mark.parametrize(
    ("text", "ok"),
    [
        ("Hello, your cart is waiting", True),
        ("Hi there,", True),
        ("Nonetheless we wrote", True),
        ("Hi ,", False),
        ("Hello !", False),
        ("Dear ,", False),
        ("None", False),
        ("}}", False),
    ],
)
def test_output_checks(text: str, ok: bool) -> None:
    assert (unsafe_output(text) is None) is ok


def test_loops_filters_and_numbers_render(renderer: Renderer) -> None:
    out = renderer.render(
        "s",
        "{% for item in items %}{{ loop.index }}. {{ item | upper }}\n{% endfor %}"
        "{{ items | join(', ') }} for {{ price }} {{ 'a-b' | replace('-', '+') }}",
        {"items": ["shoes", "socks"], "price": 89},
    )
    assert out.body_text == "1. SHOES\n2. SOCKS\nshoes, socks for 89 a+b"


# ---- templates ----------------------------------------------------------------------------------


def raw_template(**overrides: str) -> RawTemplate:
    values = {"template_id": "cart-reminder", "channel": "email", "subject": SUBJECT, "body_text": BODY}
    values.update(overrides)
    return RawTemplate(**values)


def violations(raw: RawTemplate | None, renderer: Renderer) -> dict[str, str]:
    with pytest.raises(InvalidArgument) as caught:
        validate_template(raw, renderer)
    return {v.field: v.description for v in caught.value.violations}


def test_valid_template_defaults_the_locale(renderer: Renderer) -> None:
    t = validate_template(raw_template(), renderer)
    assert (t.template_id, t.channel, t.locale) == ("cart-reminder", "email", "en")


def test_syntax_error_names_the_field_and_line(renderer: Renderer) -> None:
    found = violations(raw_template(body_text="Hi,\n{{ first_name | fallback('x') }\n"), renderer)
    assert list(found) == ["template.body_text"]
    assert "line 2" in found["template.body_text"]


def test_every_bad_field_is_reported(renderer: Renderer) -> None:
    found = violations(
        raw_template(
            template_id="Bad Id", channel="fax", locale="english!", subject="x" * 1025, body_text=""
        ),
        renderer,
    )
    assert set(found) == {
        "template.template_id",
        "template.channel",
        "template.locale",
        "template.subject",
        "template.body_text",
    }
    assert violations(None, renderer) == {"template": "is required"}
    assert "template.channel" in violations(raw_template(channel="unspecified"), renderer)
    assert "template.body_text" in violations(raw_template(body_text="x" * (64 * 1024 + 1)), renderer)
    assert (
        "include" in violations(raw_template(body_text="{% include 'x' %}"), renderer)["template.body_text"]
    )
    assert "No filter" in violations(raw_template(subject="{{ x | nope }}"), renderer)["template.subject"]


# ---- the send decision --------------------------------------------------------------------------


def test_granted_marketing_consent_sends_the_rendered_message(renderer: Renderer) -> None:
    decision = decide(request(), profile(), TEMPLATE, renderer)
    assert decision == Send(
        recipient="ada@example.com",
        subject="Ada, your cart is waiting",
        body_text="Hi Ada,\nyou left Blue running shoes in your cart.\n",
        tenant_id=request().tenant_id,
    )


@pytest.mark.parametrize(
    ("who", "expected"),
    [
        (None, "profile_not_found"),
        (profile(email=""), "no_address"),
        (profile(email="not an address"), "invalid_address"),
        (profile(consents={}), "consent_missing"),
        (profile(consents={("marketing", "email"): "withdrawn"}), "consent_withdrawn"),
        (profile(consents={("marketing", "email"): "denied"}), "consent_withdrawn"),
        (profile(consents={("marketing", "sms"): "granted"}), "consent_missing"),
        (profile(consents={("transactional", "email"): "granted"}), "consent_missing"),
    ],
)
def test_marketing_needs_an_address_and_granted_email_consent(
    renderer: Renderer, who: ProfileView | None, expected: str
) -> None:
    assert recipient_check("marketing", "email", who) == Final(SUPPRESSED, expected)
    assert decide(request(), who, TEMPLATE, renderer) == Final(SUPPRESSED, expected)


def test_transactional_needs_no_marketing_consent(renderer: Renderer) -> None:
    withdrawn = profile(consents={("marketing", "email"): "withdrawn"})
    assert recipient_check("transactional", "email", withdrawn) is None
    assert isinstance(decide(request(purpose="transactional"), withdrawn, TEMPLATE, renderer), Send)
    assert recipient_check("transactional", "email", profile(email="")) == Final(SUPPRESSED, "no_address")


def test_missing_template_fails_and_unsafe_render_is_suppressed(renderer: Renderer) -> None:
    assert decide(request(), profile(), None, renderer) == Final(FAILED, "template_not_found")
    broken = Template("cart-reminder", "email", "en", "Hi", "Code {{ coupon }}")
    decision = decide(request(), profile(), broken, renderer)
    assert isinstance(decision, Final)
    assert decision.status == SUPPRESSED
    assert decision.reason == "render_failed: body_text: 'coupon' is undefined"


def test_bad_requests_fail(renderer: Renderer) -> None:
    for bad, reason in [
        (request(profile_id=""), "invalid_request: profile_id is required"),
        (request(template_id=""), "invalid_request: template_id is required"),
        (request(purpose="unspecified"), "invalid_request: purpose is required"),
        (request(channel="fax"), "channel_unsupported: fax"),
    ]:
        assert decide(bad, profile(), TEMPLATE, renderer) == Final(FAILED, reason)


def test_placeholder_name_on_the_profile_falls_back(renderer: Renderer) -> None:
    decision = decide(request(), profile(first_name="*|FNAME|*"), TEMPLATE, renderer)
    assert isinstance(decision, Send)
    assert decision.body_text.startswith("Hi there,")
    assert decision.subject == "Hello, your cart is waiting"


def test_variables_get_the_profiles_name_and_address_not_the_requests() -> None:
    got = message_variables({"first_name": "Mallory", "email": "x@evil.test", "coupon": "C1"}, profile())
    assert got == {"first_name": "Ada", "email": "ada@example.com", "coupon": "C1"}
    assert "first_name" not in message_variables({}, profile(first_name="test"))
    assert template_variables({"first_name": "ADA"}) == {"first_name": "ADA"}
    assert template_variables({"first_name": "n/a"}) == {}


def test_redelivery_sends_at_most_once_and_not_before_the_retry_is_due() -> None:
    later = NOW + timedelta(seconds=30)
    assert redelivery("pending", None, NOW) == "process"
    assert redelivery("pending", NOW, NOW) == "process"
    assert redelivery("pending", later, NOW) == "skip"
    assert redelivery("sending", None, NOW) == "outcome_unknown"
    assert redelivery("sending", NOW, later) == "outcome_unknown"
    for final in ("sent", "suppressed", "failed", "bounced"):
        assert redelivery(final, None, NOW) == "skip"


def test_transient_failures_retry_until_attempts_run_out() -> None:
    assert after_transient(1, "smtp: 421 busy") == Final(PENDING, "retrying: attempt 1: smtp: 421 busy")
    assert after_transient(MAX_ATTEMPTS, "smtp: 421 busy") == Final(
        FAILED, f"retries_exhausted: {MAX_ATTEMPTS} attempts: smtp: 421 busy"
    )
    assert smtp_final(SendOutcome("sent", "250 OK"), 1) == Final(SENT, "smtp: 250 OK")
    assert smtp_final(SendOutcome("permanent", "550 no such user"), 1) == Final(
        FAILED, "smtp_rejected: 550 no such user"
    )
    assert smtp_final(SendOutcome("unknown", "disconnected"), 1).reason.startswith("outcome_unknown")
    assert smtp_final(SendOutcome("transient", "421 busy"), 2).status == PENDING


# ---- messages, email, requests ------------------------------------------------------------------


def test_page_tokens_round_trip_and_are_bound_to_the_query() -> None:
    assert MESSAGE_PAGES.of(0) == 50 and MESSAGE_PAGES.of(500) == 100 and MESSAGE_PAGES.of(7) == 7
    with pytest.raises(InvalidArgument):
        MESSAGE_PAGES.of(-1)
    token = encode_page_token(before=41, profile="p1")
    assert page_before(token, "p1") == 41
    assert page_before("", "p1") is None
    for bad, profile_id in [
        (token, "p2"),
        ("garbage!", "p1"),
        (encode_page_token(before=-1, profile=""), ""),
    ]:
        with pytest.raises(InvalidArgument):
            page_before(bad, profile_id)


MAIL = {
    "message_id": "m-1",
    "sender": "relevans <no-reply@relevans.local>",
    "recipient": "ada@example.com",
    "subject": "Ada, your cart is waiting",
    "body_text": "Hi Ada,\n",
    "now": NOW,
}


def test_untracked_email_is_plain_text_with_the_mailto_unsubscribe() -> None:
    """Without the HTTP endpoint's links (tests/unit/test_delivery_tracking.py has them) there is
    no https unsubscribe, so no one-click header either (RFC 8058 wants https)."""
    mail = compose_email(**MAIL)  # type: ignore[arg-type]
    assert mail["From"] == "relevans <no-reply@relevans.local>"
    assert mail["To"] == "ada@example.com"
    assert mail["Subject"] == "Ada, your cart is waiting"
    assert mail["Message-ID"] == "<m-1@relevans.local>"
    assert mail["List-Unsubscribe"] == "<mailto:unsubscribe@relevans.local?subject=unsubscribe%20m-1>"
    assert mail["List-Unsubscribe-Post"] is None
    assert mail["Date"] == "Mon, 05 Jan 2026 09:00:00 +0000"
    assert mail.get_content() == "Hi Ada,\n"
    wire = email_bytes(**MAIL)  # type: ignore[arg-type]
    assert b"\n" not in wire.replace(b"\r\n", b"")


def test_email_encodes_non_ascii_subject_and_body() -> None:
    long_line = "x" * 1200
    mail = compose_email(
        **{  # type: ignore[arg-type]
            **MAIL,
            "sender": "Zoë's Shop <shop@example.com>",
            "subject": "Zoë, dein Warenkorb wartet \u2013 15 % Rabatt",
            "body_text": f"Hallo Zoë,\r\ndu hast Schuhe im Warenkorb.\n{long_line}\n",
        }
    )
    assert mail["Subject"] == "Zoë, dein Warenkorb wartet \u2013 15 % Rabatt"
    assert mail["From"].addresses[0].display_name == "Zoë's Shop"
    assert mail.get_content() == f"Hallo Zoë,\ndu hast Schuhe im Warenkorb.\n{long_line}\n"
    wire = email_bytes(**{**MAIL, "subject": "Zoë", "body_text": "ü"})  # type: ignore[arg-type]
    assert wire.isascii()
    assert all(len(line) <= 998 for line in wire.split(b"\r\n"))


def test_decoding_requests() -> None:
    from relevans.common.v1 import common_pb2
    from relevans.delivery.v1 import bus_pb2
    from relevans.kit.proto import to_struct

    payload = bus_pb2.DeliveryRequest(
        idempotency_key="k1",
        tenant_id="shop",
        profile_id="p1",
        channel=common_pb2.CHANNEL_EMAIL,
        purpose=common_pb2.PURPOSE_TRANSACTIONAL,
        template_id="t",
        variables=to_struct({"event": {"qty": 2, "price": 9.5}}),
    ).SerializeToString()
    r = decode_request(payload)
    assert r is not None
    assert (r.channel, r.purpose, r.attempt) == ("email", "transactional", 1)
    assert r.variables == {"event": {"qty": 2, "price": 9.5}}
    assert from_struct(to_struct({"n": 1.0}))["n"] == 1
    assert from_struct(to_struct({"n": float("nan")}))["n"] is None
    assert decode_request(b"\xff\xff") is None
    assert decode_request(bus_pb2.DeliveryRequest(tenant_id="shop").SerializeToString()) is None
    assert (
        decode_request(bus_pb2.DeliveryRequest(tenant_id="Bad!", idempotency_key="k").SerializeToString())
        is None
    )
