"""The SMS channel's rules: segments (GSM-7 and UCS-2), the E.164 address, how a provider's HTTP
answers end a message, its templates; and the Twilio-shaped request its transport builds."""

from __future__ import annotations

import base64
from datetime import UTC, datetime
from urllib.parse import parse_qs

import pytest

from relevans.kit.errors import InvalidArgument
from relevans.kit.settings import Settings, SettingsError
from services.delivery.channels.base import Refused
from services.delivery.channels.sms import SmsTransport, TwilioProvider
from services.delivery.domain import (
    FAILED,
    PENDING,
    SENT,
    SUPPRESSED,
    DeliveryRequest,
    Final,
    ProfileView,
    RawTemplate,
    Renderer,
    Send,
    SendFailure,
    SendOutcome,
    decide,
    validate_template,
)
from services.delivery.domain.channels.sms import Segments, SmsChannel, e164, sms_segments, too_long
from services.delivery.domain.templates import Template

SMS = SmsChannel()
NOW = datetime(2026, 1, 1, tzinfo=UTC)

# ---- segments -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("Hi Ada, your cart is waiting.", Segments("gsm7", 29, 1)),
        ("a" * 160, Segments("gsm7", 160, 1)),
        ("a" * 161, Segments("gsm7", 161, 2)),
        ("a" * 306, Segments("gsm7", 306, 2)),  # 2 x 153
        ("a" * 307, Segments("gsm7", 307, 3)),
        ("a" * 612, Segments("gsm7", 612, 4)),
        ("a" * 613, Segments("gsm7", 613, 5)),
        # The basic set includes letters of many Latin alphabets, Greek capitals, newlines.
        ("Åse Ødegård, Ñandu, Müller: ΔΦΓ\r\n@£$¥§¿¡", Segments("gsm7", 40, 1)),
    ],
)
def test_gsm7_text_takes_one_septet_a_character(text: str, expected: Segments) -> None:
    assert sms_segments(text) == expected


def test_the_extension_characters_take_two_septets() -> None:
    for c in "^{}\\[]~|€\f":
        assert sms_segments(c) == Segments("gsm7", 2, 1)
    assert sms_segments("€" * 80) == Segments("gsm7", 160, 1)
    assert sms_segments("€" * 81) == Segments("gsm7", 162, 2)
    assert sms_segments("a" * 159 + "€") == Segments("gsm7", 161, 2)


def test_an_extension_character_is_never_split_between_parts() -> None:
    # 152 septets, then a 2-septet € that does not fit the first part's last septet.
    text = "a" * 152 + "€" + "a" * 152
    assert sms_segments(text).units == 306
    assert sms_segments(text).count == 3  # 152 | 2 + 151 | 1, where 306 plain septets fit two
    assert sms_segments("a" * 151 + "€" + "a" * 153).count == 2  # 153 | 153


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("😀", Segments("ucs2", 2, 1)),  # one emoji is two UTF-16 code units
        ("Hi Ada 😀", Segments("ucs2", 9, 1)),
        ("😀" * 35, Segments("ucs2", 70, 1)),
        ("😀" * 36, Segments("ucs2", 72, 2)),
        ("ç" * 70, Segments("ucs2", 70, 1)),  # lower-case ç is not in GSM-7 (only Ç)
        ("ç" * 71, Segments("ucs2", 71, 2)),
        ("ж" * 134, Segments("ucs2", 134, 2)),  # 2 x 67
        ("ж" * 135, Segments("ucs2", 135, 3)),
        ("李" * 268, Segments("ucs2", 268, 4)),
        ("李" * 269, Segments("ucs2", 269, 5)),
    ],
)
def test_any_other_character_makes_the_whole_text_ucs2(text: str, expected: Segments) -> None:
    assert sms_segments(text) == expected


def test_one_character_outside_gsm7_switches_a_long_text_to_ucs2() -> None:
    assert sms_segments("a" * 100).count == 1
    assert sms_segments("a" * 100 + "ł").count == 2  # 101 units > 70
    assert sms_segments("a" * 100 + "😀") == Segments("ucs2", 102, 2)


def test_an_emoji_is_never_split_between_parts() -> None:
    # 66 units, then an emoji (2) that does not fit the first part's last unit.
    assert sms_segments("a" * 66 + "😀" + "a" * 66 + "ł").count == 3
    assert sms_segments("a" * 65 + "😀" + "a" * 66 + "ł").count == 2


def test_a_body_over_the_limit_says_by_how_much() -> None:
    assert too_long(sms_segments("a" * 612), 4) is None
    assert too_long(sms_segments("a" * 613), 4) == "sms_too_long: 5 segments > 4"
    # 33 emoji a part (66 of 67 units: an emoji is not split), so 180 take 6.
    assert too_long(sms_segments("😀" * 180), 4) == "sms_too_long: 6 segments > 4"


# ---- the address --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("phone", "expected"),
    [
        ("+46701234567", "+46701234567"),
        ("+41 44 668 18 00", "+41446681800"),
        ("+1-202-555-0143", "+12025550143"),
        (" +4915112345678 ", "+4915112345678"),
        ("0701234567", None),  # national format: the country is not guessed
        ("46701234567", None),
        ("+1 555 0100", None),  # parses, but no such number
        ("+999 123456", None),  # no such country code
        ("+46 70 CALL ME", None),
        ("", None),
    ],
)
def test_phone_numbers_are_e164_written_internationally(phone: str, expected: str | None) -> None:
    assert e164(phone) == expected


def test_the_address_is_the_profiles_phone_in_e164() -> None:
    assert SMS.address(ProfileView("p1", phone="+41 44 668 18 00")) == "+41446681800"
    assert SMS.address(ProfileView("p1", phone=" 0701234567 ")) == "0701234567"
    assert SMS.address(ProfileView("p1", email="ann@example.com")) == ""
    assert SMS.address_problem("") == "no_address"
    assert SMS.address_problem("0701234567") == "invalid_address"
    assert SMS.address_problem("+41 44 668 18 00") == "invalid_address"  # not E.164 as it stands
    assert SMS.address_problem("+41446681800") is None


# ---- outcomes -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("stage", "code", "kind"),
    [
        ("response", 200, "sent"),
        ("response", 201, "sent"),
        ("response", 429, "transient"),  # slow down
        ("response", 500, "transient"),
        ("response", 503, "transient"),
        ("response", 400, "permanent"),
        ("response", 401, "permanent"),
        ("response", 404, "permanent"),
        ("response", 302, "permanent"),  # redirects are not followed
        ("connect", None, "transient"),  # refused, DNS, connect timeout: nothing was sent
        ("request", None, "unknown"),  # broke or timed out after the request went out
    ],
)
def test_provider_answers_are_classified(stage: str, code: int | None, kind: str) -> None:
    assert SMS.classify(SendFailure(stage, code)) == kind


def test_sms_final_states_follow_the_outcome() -> None:
    assert SMS.final(SendOutcome("sent", "201 SM1"), 1) == Final(SENT, "sms: 201 SM1")
    assert SMS.final(SendOutcome("permanent", "400 21211 bad To"), 1) == Final(
        FAILED, "sms_rejected: 400 21211 bad To"
    )
    assert SMS.final(SendOutcome("unknown", "ServerDisconnectedError"), 1) == Final(
        FAILED, "outcome_unknown: ServerDisconnectedError"
    )
    assert SMS.final(SendOutcome("transient", "429 slow"), 1) == Final(
        PENDING, "retrying: attempt 1: sms: 429 slow"
    )
    assert SMS.final(SendOutcome("transient", "500"), 8).reason == "retries_exhausted: 8 attempts: sms: 500"


# ---- templates and the decision -----------------------------------------------------------------


def test_sms_templates_have_no_subject_and_a_small_body() -> None:
    renderer = Renderer()
    ok = validate_template(
        RawTemplate(template_id="t", channel="sms", body_text="Hi {{ event.x }}"), renderer
    )
    assert (ok.channel, ok.subject) == ("sms", "")
    with pytest.raises(InvalidArgument) as caught:
        validate_template(
            RawTemplate(template_id="t", channel="sms", subject="Hello", body_text="x" * 4097), renderer
        )
    assert {v.field: v.description for v in caught.value.violations} == {
        "template.subject": "must be empty: sms messages have no subject",
        "template.body_text": "must be at most 4096 bytes",
    }


def test_the_decision_sends_an_sms_to_the_e164_phone() -> None:
    request = DeliveryRequest(
        idempotency_key="k",
        tenant_id="shop",
        profile_id="p1",
        trigger_id="t1",
        channel="sms",
        purpose="marketing",
        template_id="t",
        variables={"event": {"product_name": "Shoes"}},
    )
    template = Template(
        "t", "sms", "en", "", "Hi {{ first_name | fallback('there') }}: {{ event.product_name }}"
    )
    consent = {("marketing", "sms"): "granted"}
    ada = ProfileView("p1", first_name="Ada", phone="+41 44 668 18 00", consents=consent)
    renderer = Renderer()
    assert decide(request, ada, template, renderer) == Send(
        "+41446681800", "", "Hi Ada: Shoes", tenant_id="shop"
    )
    national = ProfileView("p1", phone="044 668 18 00", consents=consent)
    assert decide(request, national, template, renderer) == Final(SUPPRESSED, "invalid_address")
    assert decide(request, ProfileView("p1", consents=consent), template, renderer) == Final(
        SUPPRESSED, "no_address"
    )
    email_only = {("marketing", "email"): "granted"}
    assert decide(
        request, ProfileView("p1", phone="+41446681800", consents=email_only), template, renderer
    ) == (Final(SUPPRESSED, "consent_missing"))


# ---- the provider's request ---------------------------------------------------------------------


def test_the_twilio_request_is_a_form_post_with_basic_auth() -> None:
    twilio = TwilioProvider("https://api.example.com/", "AC123", "s3cret", "+15005550006")
    assert twilio.url == "https://api.example.com/2010-04-01/Accounts/AC123/Messages.json"
    assert twilio.headers["Authorization"] == "Basic " + base64.b64encode(b"AC123:s3cret").decode()
    assert twilio.headers["Content-Type"] == "application/x-www-form-urlencoded"
    form = parse_qs(twilio.payload("+41446681800", "Hi Åse 😀 & more").decode())
    assert form == {"To": ["+41446681800"], "From": ["+15005550006"], "Body": ["Hi Åse 😀 & more"]}


def test_the_twilio_answer_gives_the_id_or_the_error() -> None:
    twilio = TwilioProvider("http://sink", "AC1", "t", "relevans")
    assert twilio.detail(201, b'{"sid": "SM42", "status": "queued"}') == "201 SM42"
    assert (
        twilio.detail(400, b'{"code": 21211, "message": "Invalid \'To\' Phone Number", "status": 400}')
        == "400 21211 Invalid 'To' Phone Number"
    )
    assert twilio.detail(502, b"<html>Bad gateway</html>") == "502 <html>Bad gateway</html>"
    assert len(twilio.detail(500, b"x" * 10_000)) == 300


def test_the_transport_composes_the_request_and_counts_segments() -> None:
    transport = SmsTransport(TwilioProvider("http://sink", "AC1", "t", "relevans"), max_segments=2)
    out = transport.compose("m1", Send("+41446681800", "", "Hi 😀"), NOW)
    assert out.recipient == "+41446681800"
    assert out.sms_segments == 1
    assert parse_qs(out.content.decode())["Body"] == ["Hi 😀"]
    assert transport.compose("m2", Send("+41446681800", "", "a" * 306), NOW).sms_segments == 2
    with pytest.raises(Refused) as refused:
        transport.compose("m3", Send("+41446681800", "", "a" * 307), NOW)
    assert refused.value.reason == "sms_too_long: 3 segments > 2"


def test_the_sms_settings_are_checked() -> None:
    assert Settings().sms_max_segments == 4
    assert Settings.from_env({"RELEVANS_SMS_MAX_SEGMENTS": "10"}).sms_max_segments == 10
    for bad in ("0", "11"):
        with pytest.raises(SettingsError, match="RELEVANS_SMS_MAX_SEGMENTS"):
            Settings.from_env({"RELEVANS_SMS_MAX_SEGMENTS": bad})
    for url in ("api.twilio.com", "ftp://api.twilio.com", "https://"):
        with pytest.raises(SettingsError, match="RELEVANS_SMS_PROVIDER_URL"):
            Settings.from_env({"RELEVANS_SMS_PROVIDER_URL": url})
    with pytest.raises(SettingsError, match="RELEVANS_SMS_TIMEOUT"):
        Settings.from_env({"RELEVANS_SMS_TIMEOUT": "0"})
