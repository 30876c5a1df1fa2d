"""Templates per locale and channel: the locale fallback chain, the variables each channel has,
the header rule (no CR or LF where a mail header is made), previews and test sends. Pure."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from relevans.kit.errors import InvalidArgument
from relevans.kit.settings import Settings, SettingsError
from services.delivery.domain import (
    CHANNELS,
    FAILED,
    SENT,
    ProfileView,
    RawTemplate,
    Renderer,
    RenderError,
    SendOutcome,
    Template,
    email_bytes,
    validate_template,
)
from services.delivery.domain.channels.base import MOMENT_VARIABLES
from services.delivery.domain.locales import canonical_locale, fallback_chain, locale_problem, pick_locale
from services.delivery.domain.previews import render_preview
from services.delivery.domain.settings import TenantSettings, validate_settings
from services.delivery.domain.templates import pick_variant
from services.delivery.test_sends import TEST_NOT_RETRIED, final_of_test_send
from tests.helpers.cart import BODY, SUBJECT

NOW = datetime(2026, 1, 5, 9, 0, tzinfo=UTC)


@pytest.fixture(scope="module")
def renderer() -> Renderer:
    return Renderer()


# ---- the fallback chain ---------------------------------------------------------------------------

VARIANTS = ("de", "de-CH", "en", "fr")


@pytest.mark.parametrize(
    ("wanted", "tenant_default", "picked"),
    [
        ("de-CH", "", "de-CH"),  # the exact tag
        ("de-AT", "", "de"),  # its language
        ("de-CH-1996", "", "de-CH"),  # one subtag at a time
        ("fr-CA", "de", "fr"),
        ("it", "fr", "fr"),  # no Italian: the tenant's default
        ("it-CH", "de-CH", "de-CH"),
        ("it", "de-LI", "de"),  # the tenant's default falls back the same way
        ("it", "", "en"),  # then en
        ("", "", "en"),  # the person has no locale
        ("it", "es", "en"),
        ("DE_ch", "", "de-CH"),  # any case, _ for -
        ("zz-not-a-tag!", "", "en"),  # a trait that is no tag falls through
    ],
)
def test_a_person_gets_the_variant_of_the_first_locale_of_the_chain(
    wanted: str, tenant_default: str, picked: str
) -> None:
    assert pick_locale(VARIANTS, wanted, tenant_default) == picked


def test_without_en_the_first_variant_in_tag_order_is_the_last_resort() -> None:
    assert pick_locale(("sv", "fi"), "it", "es") == "fi"
    assert pick_locale(("de-CH",), "", "") == "de-CH"  # a template of one variant always renders it


def test_no_variant_no_pick() -> None:
    assert pick_locale((), "de", "en") is None
    assert pick_variant([], "de", "en") is None


def test_the_chain_is_the_persons_tag_shortened_then_the_tenants_then_en() -> None:
    assert fallback_chain("zh-Hant-TW", "de-CH") == ["zh-hant-tw", "zh-hant", "zh", "de-ch", "de", "en"]
    assert fallback_chain("en-GB", "en") == ["en-gb", "en"]
    # an extension's singleton goes with the subtag after it
    assert fallback_chain("de-CH-u-co-phonebk", "") == [
        "de-ch-u-co-phonebk",
        "de-ch-u-co",
        "de-ch",
        "de",
        "en",
    ]


def test_pick_variant_returns_the_stored_variant() -> None:
    variants = [Template("t", "email", loc, f"subject {loc}", "body") for loc in ("de", "en")]
    chosen = pick_variant(variants, "de-CH", "")
    assert chosen is not None and chosen.subject == "subject de"


@pytest.mark.parametrize(
    ("tag", "canonical"),
    [
        ("en", "en"),
        ("DE-ch", "de-CH"),
        ("zh-hant-tw", "zh-Hant-TW"),
        ("es-419", "es-419"),
        ("sr-latn-rs", "sr-Latn-RS"),
        ("de-CH-1996", "de-CH-1996"),
        ("en-US-x-twain", "en-US-x-twain"),
        ("de_at", "de-AT"),
    ],
)
def test_tags_are_stored_in_canonical_case(tag: str, canonical: str) -> None:
    assert locale_problem(canonical) is None
    assert canonical_locale(tag) == canonical


@pytest.mark.parametrize(
    "tag",
    ["", "e", "english-language", "de-", "de--CH", "de CH", "12", "de-CH\n", "x-private", "de-" + "a" * 70],
)
def test_what_is_not_a_bcp47_tag_is_refused(tag: str) -> None:
    assert locale_problem(tag) is not None


# ---- variables per channel ------------------------------------------------------------------------


def raw(**overrides: str) -> RawTemplate:
    values = {"template_id": "cart-reminder", "channel": "email", "subject": SUBJECT, "body_text": BODY}
    values.update(overrides)
    return RawTemplate(**values)


def violations(template: RawTemplate, renderer: Renderer, default_locale: str = "en") -> dict[str, str]:
    with pytest.raises(InvalidArgument) as caught:
        validate_template(template, renderer, default_locale)
    return {v.field: v.description for v in caught.value.violations}


def test_every_channel_has_the_persons_name_and_the_moments_variables() -> None:
    for channel in CHANNELS.values():
        assert "first_name" in channel.variables
        assert channel.variables >= MOMENT_VARIABLES
    assert "email" in CHANNELS["email"].variables


def test_a_template_using_a_variable_its_channel_never_has_is_refused(renderer: Renderer) -> None:
    found = violations(
        raw(body_text="Hi {{ first_name | fallback('there') }}, code {{ coupon_code }}\n"), renderer
    )
    assert list(found) == ["template.body_text"]
    assert (
        "coupon_code" in found["template.body_text"]
        and "email messages never have" in found["template.body_text"]
    )

    found = violations(raw(subject="{{ phone }}: {{ shop }} {{ event.x }}"), renderer)
    assert list(found) == ["template.subject"]
    assert "uses phone, shop," in found["template.subject"]


def test_below_the_top_level_variables_are_free_form(renderer: Renderer) -> None:
    source = (
        "{% set total = event.items | length %}{{ event.anything.deeper }} {{ total }} "
        "{% for item in event.items %}{{ loop.index }} {{ item.name }}{% endfor %} {{ range(2) | list }}"
        "{{ email }} {{ trait }} {{ before }} {{ after }} {{ date }} {{ time_zone }}\n"
    )
    assert validate_template(raw(body_text=source), renderer).body_text == source


# ---- the header rule ------------------------------------------------------------------------------


@pytest.mark.parametrize("subject", ["Hi\nBcc: x@example.com", "Hi\r\n", "Hi {{ first_name }}\rthere"])
def test_a_subject_with_cr_or_lf_is_refused_when_saved(renderer: Renderer, subject: str) -> None:
    found = violations(raw(subject=subject), renderer)
    assert list(found) == ["template.subject"]
    assert "CR or LF" in found["template.subject"]


def test_the_body_may_have_lines(renderer: Renderer) -> None:
    assert validate_template(raw(body_text="Hi\r\nthere\n"), renderer).body_text == "Hi\r\nthere\n"


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("subject", "Hi\r\nBcc: everyone@example.com"),
        ("recipient", "ada@example.com\nBcc: everyone@example.com"),
        ("sender", "relevans <no-reply@relevans.local>\r\nX-Evil: 1"),
    ],
)
def test_the_email_is_not_made_when_a_header_value_holds_a_line_break(field: str, value: str) -> None:
    mail = {
        "message_id": "m-1",
        "sender": "relevans <no-reply@relevans.local>",
        "recipient": "ada@example.com",
        "subject": "Hello",
        "body_text": "Hi\n",
        "now": NOW,
        field: value,
    }
    with pytest.raises(ValueError, match="line break"):
        email_bytes(**mail)  # type: ignore[arg-type]


def test_a_sender_setting_with_a_line_break_stops_the_start() -> None:
    with pytest.raises(SettingsError, match="RELEVANS_SMTP_SENDER"):
        Settings.from_env({"RELEVANS_SMTP_SENDER": "relevans <a@b.org>\r\nBcc: x@example.com"})


# ---- the locale of a template and the tenant's settings ------------------------------------------


def test_a_template_without_a_locale_is_the_tenants_default_variant(renderer: Renderer) -> None:
    assert validate_template(raw(), renderer, "de-CH").locale == "de-CH"
    assert validate_template(raw(), renderer, "").locale == "en"
    assert validate_template(raw(locale="FR-ca"), renderer, "de").locale == "fr-CA"
    assert "template.locale" in violations(raw(locale="français"), renderer)


def test_settings_take_a_bcp47_default_locale_in_canonical_case() -> None:
    assert validate_settings(TenantSettings(default_locale="de-ch")).default_locale == "de-CH"
    assert validate_settings(TenantSettings()).default_locale == ""
    with pytest.raises(InvalidArgument) as caught:
        validate_settings(TenantSettings(default_locale="german"))
    assert [v.field for v in caught.value.violations] == ["settings.default_locale"]
    with pytest.raises(InvalidArgument) as caught:
        validate_settings(None)
    assert [v.field for v in caught.value.violations] == ["settings"]


# ---- previews and test sends ----------------------------------------------------------------------

GREETINGS = [
    Template("cart-reminder", "email", "en", SUBJECT, BODY),
    Template(
        "cart-reminder", "email", "de", "{{ first_name | fallback('Hallo') }}, dein Warenkorb", "Hallo\n"
    ),
]
CART = {"event": {"product_name": "Shoes"}}


def test_a_preview_for_a_person_takes_their_variant_name_and_address(renderer: Renderer) -> None:
    ada = ProfileView("p1", email="ada@example.com", first_name="Ada", locale="de-AT")
    preview = render_preview(GREETINGS, "", {**CART, "first_name": "Eve"}, renderer, profile=ada)
    assert (preview.template.locale, preview.rendered.subject) == ("de", "Ada, dein Warenkorb")

    nameless = ProfileView("p2", email="x@example.com", first_name="None None", locale="")
    preview = render_preview(GREETINGS, "", CART, renderer, profile=nameless)
    assert (preview.template.locale, preview.rendered.subject) == ("en", "Hello, your cart is waiting")


def test_a_preview_without_a_person_takes_the_locale_asked_for(renderer: Renderer) -> None:
    preview = render_preview(GREETINGS, "", {"first_name": "ADMIN"}, renderer, locale="de-CH")
    assert (preview.template.locale, preview.rendered.subject) == ("de", "Hallo, dein Warenkorb")
    preview = render_preview(GREETINGS, "de", CART, renderer)
    assert preview.template.locale == "de"
    with pytest.raises(RenderError):
        render_preview(GREETINGS, "", {}, renderer, locale="en")  # no event


def test_a_test_send_is_never_left_to_retry() -> None:
    assert final_of_test_send("email", SendOutcome("sent", "250 ok")).status == SENT
    transient = final_of_test_send("email", SendOutcome("transient", "451 later"))
    assert (transient.status, transient.reason) == (FAILED, f"{TEST_NOT_RETRIED}: 451 later")
    assert final_of_test_send("email", SendOutcome("permanent", "550 no")).status == FAILED
