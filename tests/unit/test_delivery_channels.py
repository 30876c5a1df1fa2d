"""Delivery's channel registry and the email channel's rules: address, limits, failure classes."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any, cast

import pytest

from relevans.kit.errors import InvalidArgument
from relevans.kit.settings import Settings
from services.delivery.channels import open_transports
from services.delivery.domain import (
    CHANNELS,
    FAILED,
    SUPPORTED_CHANNELS,
    SUPPRESSED,
    Channel,
    DeliveryRequest,
    Final,
    ProfileView,
    RawTemplate,
    Renderer,
    RenderError,
    RenderLimits,
    Send,
    SendFailure,
    SendOutcome,
    decide,
    recipient_check,
    validate_template,
)
from services.delivery.domain.channels.email import EmailChannel
from services.delivery.domain.channels.web import WEB
from services.delivery.domain.rendering import DEFAULT_LIMITS
from services.delivery.domain.templates import Template
from services.delivery.worker import DeliveryWorker

EMAIL = EmailChannel()


def test_supported_channels_are_the_registered_ones() -> None:
    assert frozenset(CHANNELS) == SUPPORTED_CHANNELS == {"email", "sms", "web", "webhook"}
    for name, channel in CHANNELS.items():
        assert isinstance(channel, Channel)
        assert channel.name == name


def test_every_registered_channel_has_a_transport() -> None:
    # The web transport writes delivery's own database: app.build opens it beside these.
    assert set(open_transports(Settings())) | {WEB} == SUPPORTED_CHANNELS


def test_the_worker_refuses_to_start_without_a_transport_for_a_registered_channel() -> None:
    unused = cast(Any, None)
    with pytest.raises(ValueError, match="no transport for the registered channel"):
        DeliveryWorker(unused, unused, {}, Renderer(), unused, make_id=lambda: "m")


def test_an_unregistered_channel_is_refused_everywhere() -> None:
    renderer = Renderer()
    raw = RawTemplate(template_id="t", channel="fax", subject="s", body_text="b")
    with pytest.raises(InvalidArgument) as caught:
        validate_template(raw, renderer)
    assert [(v.field, v.description) for v in caught.value.violations] == [
        (
            "template.channel",
            "only CHANNEL_EMAIL, CHANNEL_SMS, CHANNEL_WEB, CHANNEL_WEBHOOK templates are supported",
        )
    ]
    assert recipient_check("marketing", "fax", ProfileView("p1", email="ann@example.com")) == Final(
        FAILED, "channel_unsupported: fax"
    )


@pytest.mark.parametrize(
    ("stage", "code", "kind"),
    [
        ("connect", 421, "transient"),
        ("connect", 554, "transient"),  # turned away before a session: try again later
        ("mail", 450, "transient"),
        ("rcpt", 451, "transient"),
        ("mail", 550, "permanent"),  # the sender refused: not the recipient's fault
        ("rcpt", 552, "permanent"),
        ("data", 452, "transient"),
        ("data", 552, "permanent"),
        ("data", 550, "permanent"),  # content refused (spam, policy): not the address
        ("connect", None, "transient"),  # cannot connect: nothing was handed over
        ("rcpt", None, "transient"),
        ("data", None, "unknown"),  # broke with the content on the wire: maybe delivered
    ],
)
def test_email_classifies_smtp_4xx_as_transient_and_5xx_as_permanent(
    stage: str, code: int | None, kind: str
) -> None:
    assert EMAIL.classify(SendFailure(stage, code)) == kind


def test_email_final_states_follow_the_outcome() -> None:
    assert EMAIL.final(SendOutcome("sent", "250 OK"), 1).status == "sent"
    assert EMAIL.final(SendOutcome("permanent", "550 no"), 1) == Final(FAILED, "smtp_rejected: 550 no")
    assert EMAIL.final(SendOutcome("transient", "451 later"), 1).status == "pending"
    assert EMAIL.final(SendOutcome("transient", "451 later"), 8).reason.startswith("retries_exhausted")


def test_email_address_is_the_profiles_email() -> None:
    assert EMAIL.address(ProfileView("p1", email="  ann@example.com ")) == "ann@example.com"
    assert EMAIL.address_problem("") == "no_address"
    assert EMAIL.address_problem("not an address") == "invalid_address"
    assert EMAIL.address_problem("a@" + "b" * 320) == "invalid_address"
    assert EMAIL.address_problem("ann@example.com") is None


def test_email_has_the_template_limits_of_the_readme() -> None:
    assert EMAIL.limits == DEFAULT_LIMITS
    assert EMAIL.limits == RenderLimits(
        subject_source_bytes=1024, body_source_bytes=64 * 1024, output_bytes=256 * 1024, subject_chars=998
    )


def test_a_channels_limits_bound_what_it_renders() -> None:
    small = RenderLimits(subject_source_bytes=100, body_source_bytes=100, output_bytes=50, subject_chars=5)
    renderer = Renderer()
    with pytest.raises(RenderError, match="subject: longer than 5 characters"):
        renderer.render("Hello there", "body", {}, small)
    with pytest.raises(RenderError, match="larger than 48 characters"):  # 50 less the subject
        renderer.render("Hi", "x" * 60, {}, small)
    assert renderer.render("Hi", "x" * 40, {}, small).body_text == "x" * 40


def test_the_decision_sends_to_the_channels_address() -> None:
    request = DeliveryRequest(
        idempotency_key="k",
        tenant_id="shop",
        profile_id="p1",
        trigger_id="t1",
        channel="email",
        purpose="transactional",
        template_id="t",
    )
    template = Template("t", "email", "en", "Hi", "Body", datetime(2026, 1, 1, tzinfo=UTC))
    decision = decide(request, ProfileView("p1", email=" ann@example.com "), template, Renderer())
    assert decision == Send(recipient="ann@example.com", subject="Hi", body_text="Body", tenant_id="shop")
    assert decide(request, ProfileView("p1"), template, Renderer()) == Final(SUPPRESSED, "no_address")
