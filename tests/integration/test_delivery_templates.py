"""Templates per locale, tenant settings, PreviewTemplate for a person, SendTest and the header rule,
through the gRPC API of the delivery service on real PostgreSQL, NATS, SMTP and the real profile
service."""

from __future__ import annotations

from collections.abc import AsyncIterator
from email.message import EmailMessage
from pathlib import Path
from typing import Any

import grpc
import pytest_asyncio
import sqlalchemy as sa

from relevans.common.v1 import common_pb2
from relevans.delivery.v1 import delivery_pb2
from relevans.kit.clock import ManualClock
from relevans.kit.proto import to_struct
from relevans.kit.settings import Settings
from relevans.profile.v1 import profile_pb2
from services.delivery.domain.tracking import UNSUBSCRIBE, LinkSigner, LinkToken, tracking_key
from services.delivery.tables import suppressions
from tests.helpers import eventually, field_violations, rpc_error
from tests.helpers.cart import BODY, SUBJECT, TEMPLATE_ID
from tests.helpers.delivery import TENANT, Harness, token

PRODUCT = {"product_name": "Blue running shoes"}
CART = {"event": PRODUCT}
SUBJECTS = {
    "en": SUBJECT,
    "de": "{{ first_name | fallback('Hallo') }}, dein Warenkorb wartet",
    "fr": "{{ first_name | fallback('Bonjour') }}, votre panier vous attend",
}
BODIES = {
    "en": BODY,
    "de": "Hallo {{ first_name | fallback('zusammen') }},\ndu hast {{ event.product_name }} vergessen.\n",
    "fr": "Bonjour {{ first_name | fallback('à vous') }},\nvous avez oublié {{ event.product_name }}.\n",
}


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


async def person(harness: Harness, email: str, first_name: str, locale: str = "") -> str:
    """A customer with marketing consent and, when given, a `locale` trait."""
    reply = await harness.profiles.Identify(
        profile_pb2.IdentifyRequest(
            email=email,
            first_name=first_name,
            traits=to_struct({"locale": locale} if locale else {}),
            consents=[
                profile_pb2.ConsentInput(
                    purpose=common_pb2.PURPOSE_MARKETING,
                    channel=common_pb2.CHANNEL_EMAIL,
                    status=common_pb2.CONSENT_STATUS_GRANTED,
                    source="signup_form",
                )
            ],
        ),
        metadata=token(TENANT, "ingest"),
    )
    return str(reply.profile.profile_id)


async def put_variant(harness: Harness, locale: str, **fields: Any) -> delivery_pb2.Template:
    values: dict[str, Any] = {
        "template_id": TEMPLATE_ID,
        "channel": common_pb2.CHANNEL_EMAIL,
        "locale": locale,
        "subject": SUBJECTS.get(locale, SUBJECT),
        "body_text": BODIES.get(locale, BODY),
    }
    values.update(fields)
    reply = await harness.delivery.PutTemplate(
        delivery_pb2.PutTemplateRequest(template=delivery_pb2.Template(**values)),
        metadata=token(TENANT, "admin"),
    )
    return reply.template


async def set_default_locale(harness: Harness, locale: str, tenant: str = TENANT) -> delivery_pb2.Settings:
    reply = await harness.delivery.UpdateSettings(
        delivery_pb2.UpdateSettingsRequest(settings=delivery_pb2.Settings(default_locale=locale)),
        metadata=token(tenant, "admin"),
    )
    return reply.settings


async def get_settings(harness: Harness, tenant: str = TENANT) -> delivery_pb2.Settings:
    reply = await harness.delivery.GetSettings(
        delivery_pb2.GetSettingsRequest(), metadata=token(tenant, "read")
    )
    return reply.settings


def mail_to(harness: Harness, address: str) -> list[EmailMessage]:
    return [m for m in harness.mails() if m["To"] == address]


def body_of(mail: EmailMessage) -> str:
    part = mail.get_body(preferencelist=("plain",))
    assert part is not None
    return str(part.get_content())


# ---- variants per locale ----------------------------------------------------------------------------


async def test_each_person_gets_the_variant_of_their_locale_by_the_fallback_chain(harness: Harness) -> None:
    for locale in ("en", "de", "fr"):
        await put_variant(harness, locale)
    swiss = await person(harness, "urs@example.com", "Urs", "de-CH")  # no de-CH variant: de
    french = await person(harness, "ines@example.com", "Inès", "fr_fr")  # as people write it
    italian = await person(harness, "gia@example.com", "Gia", "it")  # no it: the tenant's default
    unknown = await person(harness, "sam@example.com", "Sam")  # no locale: the tenant's default

    keys = {who: await harness.request(who, event=PRODUCT) for who in (swiss, french)}
    await set_default_locale(harness, "fr-CA")  # falls back to fr
    keys |= {who: await harness.request(who, event=PRODUCT) for who in (italian, unknown)}

    sent = {who: await harness.final(key) for who, key in keys.items()}
    assert {who: m.locale for who, m in sent.items()} == {
        swiss: "de",
        french: "fr",
        italian: "fr",
        unknown: "fr",
    }
    assert all(m.status == delivery_pb2.MESSAGE_STATUS_SENT for m in sent.values())
    [urs] = await eventually(lambda: _mail(harness, "urs@example.com"))
    assert urs["Subject"] == "Urs, dein Warenkorb wartet"
    assert body_of(urs) == "Hallo Urs,\ndu hast Blue running shoes vergessen.\n"
    [ines] = await eventually(lambda: _mail(harness, "ines@example.com"))
    assert ines["Subject"] == "Inès, votre panier vous attend"

    await set_default_locale(harness, "")  # back to en for whoever matches no variant
    again = await harness.final(await harness.request(italian, event=PRODUCT))
    assert again.locale == "en"
    got = await harness.delivery.GetMessage(
        delivery_pb2.GetMessageRequest(message_id=again.message_id), metadata=token(TENANT, "read")
    )
    assert (got.message.locale, got.message.test) == ("en", False)


async def _mail(harness: Harness, address: str) -> list[EmailMessage]:
    return mail_to(harness, address)


async def test_a_template_without_a_locale_is_the_tenants_default_and_get_template_shows_it(
    harness: Harness,
) -> None:
    await set_default_locale(harness, "de-ch")
    stored = await put_variant(harness, "", subject=SUBJECTS["de"], body_text=BODIES["de"])
    assert stored.locale == "de-CH"
    english = await put_variant(harness, "EN")
    assert english.locale == "en"
    got = await harness.delivery.GetTemplate(
        delivery_pb2.GetTemplateRequest(template_id=TEMPLATE_ID), metadata=token(TENANT, "read")
    )
    assert got.template == stored  # the variant the tenant's default picks


# ---- bad templates ----------------------------------------------------------------------------------


async def test_bad_put_template_names_the_field_and_saves_nothing(harness: Harness) -> None:
    cases: dict[str, tuple[str, dict[str, str]]] = {
        "template.subject": ("en", {"subject": "Your cart\r\nBcc: everyone@example.com"}),
        "template.body_text": (
            "en",
            {"body_text": "Hi {{ first_name | fallback('there') }}, {{ coupon_code }}\n"},
        ),
        "template.locale": ("german", {}),
    }
    for field, (locale, bad) in cases.items():
        err = await rpc_error(put_variant(harness, locale, **bad))
        assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert list(field_violations(err)) == [field], bad
    err = await rpc_error(put_variant(harness, "en", subject="{{ phone }}: your cart"))
    assert "uses phone, which email messages never have" in field_violations(err)["template.subject"]

    err = await rpc_error(
        harness.delivery.GetTemplate(
            delivery_pb2.GetTemplateRequest(template_id=TEMPLATE_ID), metadata=token(TENANT, "read")
        )
    )
    assert err.code() == grpc.StatusCode.NOT_FOUND

    stored = await put_variant(harness, "en")
    await rpc_error(put_variant(harness, "en", subject="Hi\nthere"))
    got = await harness.delivery.GetTemplate(
        delivery_pb2.GetTemplateRequest(template_id=TEMPLATE_ID), metadata=token(TENANT, "read")
    )
    assert got.template == stored


async def test_a_subject_a_variable_breaks_into_lines_is_not_sent(harness: Harness) -> None:
    profile_id = await person(harness, "ada@example.com", "Ada")
    await put_variant(harness, "en", subject="Still thinking about {{ event.product_name }}?")
    key = await harness.request(profile_id, event={"product_name": "shoes\r\nBcc: everyone@example.com"})
    message = await harness.final(key)
    assert message.status == delivery_pb2.MESSAGE_STATUS_SUPPRESSED
    assert message.reason == "render_failed: subject: contains a line break (CR or LF)"
    assert harness.mails() == []


# ---- preview ----------------------------------------------------------------------------------------


async def test_preview_renders_what_a_real_person_would_get_now(harness: Harness) -> None:
    for locale in ("en", "de"):
        await put_variant(harness, locale)
    urs = await person(harness, "urs@example.com", "Urs", "de-CH")
    placeholder = await person(harness, "x@example.com", "Firstname Lastname")

    def preview(**fields: Any) -> Any:
        return harness.delivery.PreviewTemplate(
            delivery_pb2.PreviewTemplateRequest(template_id=TEMPLATE_ID, **fields),
            metadata=token(TENANT, "read"),
        )

    # the request's first name does not override the person's
    got = await preview(profile_id=urs, variables=to_struct({**CART, "first_name": "Eve"}))
    assert (got.locale, got.subject) == ("de", "Urs, dein Warenkorb wartet")
    assert got.body_text == "Hallo Urs,\ndu hast Blue running shoes vergessen.\n"
    got = await preview(profile_id=placeholder, variables=to_struct(CART))
    assert (got.locale, got.subject) == ("en", "Hello, your cart is waiting")

    got = await preview(locale="de-AT", variables=to_struct({**CART, "first_name": "Eve"}))
    assert (got.locale, got.subject) == ("de", "Eve, dein Warenkorb wartet")
    got = await preview(variables=to_struct(CART))
    assert got.locale == "en"

    err = await rpc_error(preview(profile_id="no-such-profile", variables=to_struct(CART)))
    assert err.code() == grpc.StatusCode.NOT_FOUND
    err = await rpc_error(preview(locale="de CH", variables=to_struct(CART)))
    assert list(field_violations(err)) == ["locale"]
    err = await rpc_error(preview(profile_id=urs))  # no event
    assert err.code() == grpc.StatusCode.FAILED_PRECONDITION


# ---- SendTest ---------------------------------------------------------------------------------------


def send_test(harness: Harness, scope: str = "admin", **fields: Any) -> Any:
    return harness.delivery.SendTest(
        delivery_pb2.SendTestRequest(template_id=TEMPLATE_ID, **fields), metadata=token(TENANT, scope)
    )


async def test_send_test_sends_a_marked_test_mail_recorded_as_a_test(harness: Harness) -> None:
    for locale in ("en", "de"):
        await put_variant(harness, locale)
    urs = await person(harness, "urs@example.com", "Urs", "de-CH")

    reply = await send_test(harness, recipient="qa@example.com", profile_id=urs, variables=to_struct(CART))
    [mail] = await eventually(lambda: _mail(harness, "qa@example.com"))
    assert mail["Subject"] == "[TEST] Urs, dein Warenkorb wartet"
    assert body_of(mail) == "Hallo Urs,\ndu hast Blue running shoes vergessen.\n"
    sent = reply.message
    assert (sent.test, sent.locale, sent.status) == (True, "de", delivery_pb2.MESSAGE_STATUS_SENT)
    assert (sent.recipient, sent.subject, sent.profile_id, sent.trigger_id) == (
        "qa@example.com",
        "[TEST] Urs, dein Warenkorb wartet",
        urs,
        "",
    )
    assert [c.status for c in sent.history] == [
        delivery_pb2.MESSAGE_STATUS_PENDING,
        delivery_pb2.MESSAGE_STATUS_SENT,
    ]
    got = await harness.delivery.GetMessage(
        delivery_pb2.GetMessageRequest(message_id=sent.message_id), metadata=token(TENANT, "read")
    )
    assert got.message == sent
    # its one-click link is the tenant's and the message's, as a real mail's
    [link] = [p.strip(" <>") for p in str(mail["List-Unsubscribe"]).split(",") if "/u/" in p]
    signer = LinkSigner(tracking_key(harness.settings.token_secret))
    assert signer.verify(link.rsplit("/", 1)[1], UNSUBSCRIBE) == LinkToken(
        TENANT, sent.message_id, UNSUBSCRIBE
    )

    # not deduplicated: the same test again is a second mail; a real message goes besides
    again = await send_test(harness, recipient="qa@example.com", profile_id=urs, variables=to_struct(CART))
    assert again.message.message_id != sent.message_id
    real = await harness.final(await harness.request(urs, event=PRODUCT))
    assert (real.status, real.test) == (delivery_pb2.MESSAGE_STATUS_SENT, False)
    await eventually(lambda: _count(harness, 3))
    # a test is not announced to the other services: only the real message is
    statuses = await eventually(harness.status_events)
    assert [e.message_id for _, e in statuses] == [real.message_id]

    # without a person: the given variables and locale
    plain = await send_test(
        harness, recipient="qa@example.com", locale="en", variables=to_struct({**CART, "first_name": "Eve"})
    )
    assert (plain.message.subject, plain.message.profile_id) == ("[TEST] Eve, your cart is waiting", "")


async def _count(harness: Harness, n: int) -> bool:
    return len(harness.mails()) == n


async def test_send_test_refuses_bad_recipients_and_needs_admin(harness: Harness) -> None:
    await put_variant(harness, "en")
    for bad in ("", "not an address", "qa@example.com\r\nBcc: everyone@example.com", "qa@example.com\n"):
        err = await rpc_error(send_test(harness, recipient=bad, variables=to_struct(CART)))
        assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert list(field_violations(err)) == ["recipient"], bad
    err = await rpc_error(send_test(harness, "read", recipient="qa@example.com", variables=to_struct(CART)))
    assert err.code() == grpc.StatusCode.PERMISSION_DENIED
    err = await rpc_error(send_test(harness, recipient="qa@example.com", profile_id="nobody"))
    assert err.code() == grpc.StatusCode.NOT_FOUND
    err = await rpc_error(send_test(harness, recipient="qa@example.com"))  # no event: cannot render
    assert err.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert await harness.messages() == []
    assert harness.mails() == []


async def test_a_test_send_is_not_retried_and_never_goes_to_an_erased_persons_address(
    settings: Settings, clock: ManualClock, nats_url: str, tmp_path: Path
) -> None:
    harness = Harness(settings, clock, nats_url, tmp_path / "mail")
    try:
        await harness.start(sink=False)  # nothing listens on the SMTP port
        await put_variant(harness, "en")
        down = await send_test(harness, recipient="qa@example.com", variables=to_struct(CART))
        assert down.message.status == delivery_pb2.MESSAGE_STATUS_FAILED
        assert down.message.reason.startswith("test_not_retried: ")
        assert [c.status for c in down.message.history] == [
            delivery_pb2.MESSAGE_STATUS_PENDING,
            delivery_pb2.MESSAGE_STATUS_FAILED,
        ]

        gone = await person(harness, "gone@example.com", "Gone")
        await harness.profiles.EraseProfile(
            profile_pb2.EraseProfileRequest(profile_id=gone), metadata=token(TENANT, "admin")
        )
        await eventually(lambda: _suppressions(harness))
        erased = await send_test(harness, recipient="gone@example.com", variables=to_struct(CART))
        assert (erased.message.status, erased.message.reason) == (
            delivery_pb2.MESSAGE_STATUS_SUPPRESSED,
            "erased",
        )
    finally:
        await harness.close()


async def _suppressions(harness: Harness) -> int:
    async with harness.engine.connect() as conn:
        return int((await conn.execute(sa.select(sa.func.count()).select_from(suppressions))).scalar_one())


# ---- settings ---------------------------------------------------------------------------------------


async def test_settings_round_trip_validated_per_tenant(harness: Harness) -> None:
    assert await get_settings(harness) == delivery_pb2.Settings()
    await harness.clock.advance(60)
    updated = await set_default_locale(harness, "DE-ch")
    assert updated.default_locale == "de-CH"
    assert updated.update_time.ToDatetime().timestamp() == harness.clock.now().timestamp()
    assert await get_settings(harness) == updated
    assert await get_settings(harness, "other") == delivery_pb2.Settings()

    err = await rpc_error(set_default_locale(harness, "Deutsch (Schweiz)"))
    assert list(field_violations(err)) == ["settings.default_locale"]
    err = await rpc_error(
        harness.delivery.UpdateSettings(delivery_pb2.UpdateSettingsRequest(), metadata=token(TENANT, "admin"))
    )
    assert list(field_violations(err)) == ["settings"]
    err = await rpc_error(
        harness.delivery.UpdateSettings(
            delivery_pb2.UpdateSettingsRequest(settings=delivery_pb2.Settings(default_locale="fr")),
            metadata=token(TENANT, "read"),
        )
    )
    assert err.code() == grpc.StatusCode.PERMISSION_DENIED
    assert await get_settings(harness) == updated
