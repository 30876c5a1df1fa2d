"""Webhook signatures (Standard Webhooks v1), checked against the reference `standardwebhooks`
package, and the webhook channel's payload and rules."""

from __future__ import annotations

import base64
import json
from dataclasses import replace
from datetime import UTC, datetime, timedelta

import pytest
from standardwebhooks import Webhook, WebhookVerificationError

from relevans.kit.errors import InvalidArgument
from services.delivery.domain import DeliveryRequest, ProfileView, RawTemplate, Renderer, Send, decide
from services.delivery.domain.channels import CHANNELS
from services.delivery.domain.channels.base import SendFailure, SendOutcome
from services.delivery.domain.channels.webhook import STAGE_ADDRESS, STAGE_CONNECT, STAGE_SENT, WebhookChannel
from services.delivery.domain.states import FAILED, PENDING, SENT
from services.delivery.domain.templates import validate_template
from services.delivery.domain.webhooks import (
    new_secret,
    payload,
    secret_key,
    signature,
    signed_headers,
    verification_problem,
)

NOW = datetime.now(UTC).replace(microsecond=0)
BODY = payload(
    message_id="msg-1",
    trigger_id="lead-score",
    profile_id="p-1",
    subject="Hot lead",
    text="Ada is ready for a call",
    variables={"score": 120, "event": {"type": "download", "paper": "Pricing 2026"}},
    now=NOW,
)


def test_a_new_secret_is_whsec_and_base64_of_32_random_bytes() -> None:
    secret = new_secret()
    assert secret.startswith("whsec_")
    assert len(base64.b64decode(secret.removeprefix("whsec_"))) == 32
    assert new_secret() != secret


def test_the_reference_library_verifies_our_signature() -> None:
    secret = new_secret()
    headers = signed_headers(secret, "msg-1", NOW, BODY)
    assert headers["webhook-id"] == "msg-1"
    assert headers["webhook-timestamp"] == str(int(NOW.timestamp()))
    assert Webhook(secret).verify(BODY, headers)["data"]["message_id"] == "msg-1"


def test_our_signature_is_the_reference_signature() -> None:
    secret = new_secret()
    assert signature(secret, "msg-1", int(NOW.timestamp()), BODY) == Webhook(secret).sign("msg-1", NOW, BODY)


def test_a_tampered_body_fails_verification_in_the_reference_library_and_ours() -> None:
    secret = new_secret()
    headers = signed_headers(secret, "msg-1", NOW, BODY)
    tampered = BODY.replace(b"Ada", b"Eve")
    with pytest.raises(WebhookVerificationError):
        Webhook(secret).verify(tampered, headers)
    assert verification_problem(secret, headers, tampered, NOW) == "no matching signature"
    assert verification_problem(secret, headers, BODY, NOW) is None


def test_another_id_timestamp_or_secret_fails_verification() -> None:
    secret = new_secret()
    headers = signed_headers(secret, "msg-1", NOW, BODY)
    with pytest.raises(WebhookVerificationError):
        Webhook(secret).verify(BODY, {**headers, "webhook-id": "msg-2"})
    with pytest.raises(WebhookVerificationError):
        Webhook(new_secret()).verify(BODY, headers)
    later = str(int(NOW.timestamp()) + 1)
    with pytest.raises(WebhookVerificationError):
        Webhook(secret).verify(BODY, {**headers, "webhook-timestamp": later})


def test_our_receiver_check_refuses_stale_and_unsigned_deliveries() -> None:
    secret = new_secret()
    headers = signed_headers(secret, "msg-1", NOW, BODY)
    assert verification_problem(secret, headers, BODY, NOW + timedelta(minutes=6)) == (
        "webhook-timestamp is too far from now"
    )
    assert "missing" in (verification_problem(secret, {}, BODY, NOW) or "")


def test_a_secret_that_is_not_base64_is_refused() -> None:
    with pytest.raises(ValueError, match="base64"):
        secret_key("whsec_not base64!")


def test_the_payload_carries_type_ids_text_variables_and_timestamp() -> None:
    document = json.loads(BODY)
    assert document == {
        "type": "relevans.message",
        "timestamp": NOW.isoformat().replace("+00:00", "Z"),
        "data": {
            "message_id": "msg-1",
            "trigger_id": "lead-score",
            "profile_id": "p-1",
            "subject": "Hot lead",
            "text": "Ada is ready for a call",
            "variables": {"score": 120, "event": {"type": "download", "paper": "Pricing 2026"}},
        },
    }


# ---- the channel's rules ------------------------------------------------------------------------

HOOK = WebhookChannel()


def test_the_webhook_channel_is_registered_and_addresses_the_profile() -> None:
    assert CHANNELS["webhook"].name == "webhook"
    assert HOOK.address(ProfileView("p-1")) == "p-1"
    assert HOOK.address_problem("p-1") is None


@pytest.mark.parametrize(
    ("failure", "kind"),
    [
        (SendFailure(STAGE_CONNECT, None), "transient"),
        (SendFailure(STAGE_SENT, None), "transient"),
        (SendFailure(STAGE_SENT, 429), "transient"),
        (SendFailure(STAGE_SENT, 500), "transient"),
        (SendFailure(STAGE_SENT, 503), "transient"),
        (SendFailure(STAGE_SENT, 404), "permanent"),
        (SendFailure(STAGE_SENT, 401), "permanent"),
        (SendFailure(STAGE_SENT, 302), "permanent"),
        (SendFailure(STAGE_ADDRESS, None), "permanent"),
    ],
)
def test_failures_are_classified(failure: SendFailure, kind: str) -> None:
    assert HOOK.classify(failure) == kind


def test_outcomes_end_the_message() -> None:
    assert HOOK.final(SendOutcome("sent", "200 OK"), 1).status == SENT
    refused = HOOK.final(SendOutcome("permanent", "address_blocked: 10.0.0.1 is a private address"), 1)
    assert (refused.status, refused.reason) == (FAILED, "address_blocked: 10.0.0.1 is a private address")
    assert HOOK.final(SendOutcome("unknown", "timeout"), 1).reason.startswith("outcome_unknown")
    assert HOOK.final(SendOutcome("transient", "503"), 1).status == PENDING
    assert HOOK.final(SendOutcome("transient", "503"), 8).reason.startswith("retries_exhausted")


def test_a_webhook_template_needs_its_endpoint() -> None:
    raw = RawTemplate(template_id="lead", channel="webhook", subject="s", body_text="b")
    with pytest.raises(InvalidArgument) as caught:
        validate_template(raw, Renderer())
    assert [v.field for v in caught.value.violations] == ["template.webhook_endpoint_id"]
    ok = validate_template(replace(raw, webhook_endpoint_id="crm"), Renderer())
    assert ok.webhook_endpoint_id == "crm"


def test_an_email_template_keeps_no_endpoint() -> None:
    raw = RawTemplate(template_id="t", channel="email", subject="s", body_text="b", webhook_endpoint_id="crm")
    assert validate_template(raw, Renderer()).webhook_endpoint_id == ""


def test_a_webhook_decision_carries_the_request_and_the_template() -> None:
    template = validate_template(
        RawTemplate(
            template_id="lead",
            channel="webhook",
            subject="Lead",
            body_text="{{ first_name }}",
            webhook_endpoint_id="crm",
        ),
        Renderer(),
    )
    request = DeliveryRequest("k", "shop", "p-1", "lead-score", "webhook", "marketing", "lead", {"score": 3})
    profile = ProfileView("p-1", first_name="Ada", consents={("marketing", "webhook"): "granted"})
    decision = decide(request, profile, template, Renderer())
    assert isinstance(decision, Send)
    assert (decision.recipient, decision.body_text) == ("p-1", "Ada")
    assert decision.request == request and decision.template == template
