"""The SMS channel on real PostgreSQL, NATS JetStream, gRPC and HTTP: the real profile service gives
the phone and consent, the delivery service posts to the local SMS sink (or a scripted provider)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import replace
from datetime import timedelta
from pathlib import Path

import pytest_asyncio
from google.protobuf.struct_pb2 import Struct

from relevans.common.v1 import common_pb2
from relevans.delivery.v1 import delivery_pb2
from relevans.kit.clock import ManualClock
from relevans.kit.settings import Settings
from relevans.local.embedded import free_port
from relevans.local.sms_sink import SmsSink, StoredSms
from services.delivery.domain import RetryPolicy
from tests.helpers import eventually, field_violations, rpc_error, stays
from tests.helpers.delivery import TENANT, Harness, token
from tests.helpers.sms import DROP, HANG, ScriptedProvider

PHONE = "+41 44 668 18 00"
E164 = "+41446681800"
BODY = "Hi {{ first_name | fallback('there') }}, you left {{ event.product_name }} in your cart."
SMS = common_pb2.CHANNEL_SMS
STATUS = delivery_pb2
# The longest wait before the retry after the first attempt (the back-off doubles after each).
RETRY_WAIT = timedelta(seconds=RetryPolicy().delay_s(1, 0.999999))


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


async def _texts(h: Harness) -> list[StoredSms]:
    return h.texts()


async def _reason(h: Harness, key: str, prefix: str) -> delivery_pb2.Message | None:
    m = await h.message(key)
    return m if m is not None and m.reason.startswith(prefix) else None


# ---- to the sink --------------------------------------------------------------------------------


async def test_an_sms_arrives_at_the_sink_in_e164_with_its_segments_recorded(harness: Harness) -> None:
    profile_id = await harness.sms_customer(PHONE)
    await harness.put_sms_template(BODY)
    key = await harness.request(profile_id, template_id="cart-sms", channel=SMS)

    [text] = await eventually(lambda: _texts(harness))
    assert (text.to, text.sender) == (E164, "relevans")
    assert text.body == "Hi Ada, you left Blue running shoes in your cart."
    assert text.account_sid == harness.settings.sms_account_sid

    message = await harness.final(key)
    assert message.status == STATUS.MESSAGE_STATUS_SENT
    assert message.channel == SMS
    assert (message.recipient, message.subject) == (E164, "")
    assert message.sms_segments == 1
    assert message.reason == f"sms: 201 {text.sid}"
    got = await harness.delivery.GetMessage(
        delivery_pb2.GetMessageRequest(message_id=message.message_id), metadata=token(TENANT, "read")
    )
    assert got.message.sms_segments == 1
    [(subject, _)] = await eventually(harness.status_events)
    assert subject == "rv.delivery.status.sent"


async def test_text_with_an_emoji_goes_as_ucs2_and_counts_its_segments(harness: Harness) -> None:
    profile_id = await harness.sms_customer(PHONE)
    await harness.put_sms_template("Hi {{ first_name }} 😀 {{ event.note }}")
    # "Hi Ada 😀 " is 10 UTF-16 code units (the emoji 2), then 70: 80 > 70, so two parts of 67.
    key = await harness.request(profile_id, template_id="cart-sms", channel=SMS, event={"note": "x" * 70})

    [text] = await eventually(lambda: _texts(harness))
    assert text.body == "Hi Ada 😀 " + "x" * 70
    message = await harness.final(key)
    assert message.status == STATUS.MESSAGE_STATUS_SENT
    assert message.sms_segments == 2


async def test_a_long_gsm7_text_counts_153_septets_a_part(harness: Harness) -> None:
    profile_id = await harness.sms_customer(PHONE)
    await harness.put_sms_template("{{ event.note }}")
    key = await harness.request(
        profile_id, template_id="cart-sms", channel=SMS, event={"note": "€" * 100 + "a" * 200}
    )
    await eventually(lambda: _texts(harness))
    message = await harness.final(key)
    assert message.sms_segments == 3  # 400 septets: 152 (no € split) + 153 + 95


async def test_a_phone_not_in_international_format_is_suppressed_as_invalid(harness: Harness) -> None:
    profile_id = await harness.sms_customer("044 668 18 00")
    await harness.put_sms_template(BODY)
    key = await harness.request(profile_id, template_id="cart-sms", channel=SMS)

    message = await harness.final(key)
    assert (message.status, message.reason) == (STATUS.MESSAGE_STATUS_SUPPRESSED, "invalid_address")
    assert harness.texts() == []


async def test_a_person_without_a_phone_or_sms_consent_gets_no_sms(harness: Harness) -> None:
    await harness.put_sms_template(BODY)
    no_phone = await harness.customer()  # email only
    no_consent = await harness.sms_customer(PHONE, consent=0)
    first = await harness.request(no_phone, template_id="cart-sms", channel=SMS)
    second = await harness.request(no_consent, template_id="cart-sms", channel=SMS)
    assert (await harness.final(first)).reason == "no_address"
    assert (await harness.final(second)).reason == "consent_missing"
    assert harness.texts() == []


async def test_a_body_over_the_segment_limit_is_refused_with_the_count(harness: Harness) -> None:
    profile_id = await harness.sms_customer(PHONE)
    await harness.put_sms_template("{{ event.note }}")
    key = await harness.request(profile_id, template_id="cart-sms", channel=SMS, event={"note": "a" * 613})

    message = await harness.final(key)
    assert message.status == STATUS.MESSAGE_STATUS_SUPPRESSED
    assert message.reason == "sms_too_long: 5 segments > 4"
    [(subject, _)] = await eventually(harness.status_events)
    assert subject == "rv.delivery.status.suppressed"
    assert harness.texts() == []


async def test_an_sms_template_names_a_subject_it_cannot_have(harness: Harness) -> None:
    err = await rpc_error(
        harness.delivery.PutTemplate(
            delivery_pb2.PutTemplateRequest(
                template=delivery_pb2.Template(
                    template_id="cart-sms", channel=SMS, subject="Your cart", body_text=BODY
                )
            ),
            metadata=token(TENANT, "admin"),
        )
    )
    assert field_violations(err) == {"template.subject": "must be empty: sms messages have no subject"}


async def test_a_preview_of_an_sms_template_counts_its_segments(harness: Harness) -> None:
    await harness.put_sms_template("Hi {{ first_name | fallback('there') }} 😀 {{ event.note }}")
    variables = Struct()
    variables.update({"first_name": "Ada", "event": {"note": "x" * 70}})
    reply = await harness.delivery.PreviewTemplate(
        delivery_pb2.PreviewTemplateRequest(template_id="cart-sms", variables=variables),
        metadata=token(TENANT, "read"),
    )
    assert (reply.subject, reply.body_text) == ("", "Hi Ada 😀 " + "x" * 70)
    assert reply.sms_segments == 2


# ---- provider answers ---------------------------------------------------------------------------


async def _with_provider(
    settings: Settings, clock: ManualClock, nats_url: str, tmp_path: Path, provider: ScriptedProvider
) -> Harness:
    h = Harness(settings, clock, nats_url, tmp_path / "mail")
    await h.start(sms_provider_url=provider.url)
    return h


async def test_429_and_500_are_retried_until_the_provider_takes_the_message(
    settings: Settings, clock: ManualClock, nats_url: str, tmp_path: Path
) -> None:
    async with ScriptedProvider([429, 500]) as provider:
        h = await _with_provider(settings, clock, nats_url, tmp_path, provider)
        try:
            profile_id = await h.sms_customer(PHONE)
            await h.put_sms_template(BODY)
            key = await h.request(profile_id, template_id="cart-sms", channel=SMS)

            waiting = await eventually(
                lambda: _reason(h, key, "retrying: attempt 1: sms: 429 20429 Too Many Requests")
            )
            assert waiting is not None and waiting.status == STATUS.MESSAGE_STATUS_PENDING
            await h.clock.advance(RETRY_WAIT)
            await eventually(
                lambda: _reason(h, key, "retrying: attempt 2: sms: 500 20500 Internal Server Error")
            )
            await h.clock.advance(RETRY_WAIT * 2)
            sent = await eventually(lambda: h.message(key, STATUS.MESSAGE_STATUS_SENT))
            assert sent is not None
            assert [c.reason for c in sent.history] == [
                "accepted",
                "retrying: attempt 1: sms: 429 20429 Too Many Requests",
                "retrying: attempt 2: sms: 500 20500 Internal Server Error",
                "sms: 201 SM3",
            ]
            assert sent.sms_segments == 1
            assert [r["To"] for r in provider.requests] == [E164] * 3
        finally:
            await h.close()


async def test_a_400_fails_the_message_without_a_retry(
    settings: Settings, clock: ManualClock, nats_url: str, tmp_path: Path
) -> None:
    async with ScriptedProvider([400]) as provider:
        h = await _with_provider(settings, clock, nats_url, tmp_path, provider)
        try:
            profile_id = await h.sms_customer(PHONE)
            await h.put_sms_template(BODY)
            key = await h.request(profile_id, template_id="cart-sms", channel=SMS)

            message = await h.final(key)
            assert message.status == STATUS.MESSAGE_STATUS_FAILED
            assert message.reason == "sms_rejected: 400 21211 Invalid 'To' Phone Number"
            await eventually(h.requests_done)
            assert len(provider.requests) == 1
        finally:
            await h.close()


async def test_a_connection_lost_after_the_request_is_an_unknown_outcome_never_resent(
    settings: Settings, clock: ManualClock, nats_url: str, tmp_path: Path
) -> None:
    async with ScriptedProvider([DROP]) as provider:
        h = await _with_provider(settings, clock, nats_url, tmp_path, provider)
        try:
            profile_id = await h.sms_customer(PHONE)
            await h.put_sms_template(BODY)
            key = await h.request(profile_id, template_id="cart-sms", channel=SMS)

            message = await h.final(key)
            assert message.status == STATUS.MESSAGE_STATUS_FAILED
            assert message.reason.startswith("outcome_unknown: ServerDisconnectedError")
            await eventually(h.requests_done)
            assert len(provider.requests) == 1
        finally:
            await h.close()


async def test_no_answer_within_the_timeout_is_an_unknown_outcome_never_resent(
    settings: Settings, clock: ManualClock, nats_url: str, tmp_path: Path
) -> None:
    # The transport's own read timeout on the network, not domain time: kept short.
    async with ScriptedProvider([HANG]) as provider:
        h = await _with_provider(replace(settings, sms_timeout=0.3), clock, nats_url, tmp_path, provider)
        try:
            profile_id = await h.sms_customer(PHONE)
            await h.put_sms_template(BODY)
            key = await h.request(profile_id, template_id="cart-sms", channel=SMS)

            message = await h.final(key)
            assert message.status == STATUS.MESSAGE_STATUS_FAILED
            assert message.reason.startswith("outcome_unknown: SocketTimeoutError")
            await eventually(h.requests_done)
            assert len(provider.requests) == 1
        finally:
            await h.close()


async def test_a_provider_that_cannot_be_reached_is_retried_until_it_is_back(
    settings: Settings, clock: ManualClock, nats_url: str, tmp_path: Path
) -> None:
    port = free_port()
    h = Harness(settings, clock, nats_url, tmp_path / "mail")
    try:
        await h.start(sms_provider_url=f"http://127.0.0.1:{port}")
        profile_id = await h.sms_customer(PHONE)
        await h.put_sms_template(BODY)
        key = await h.request(profile_id, template_id="cart-sms", channel=SMS)

        waiting = await eventually(lambda: _reason(h, key, "retrying: attempt 1: sms: ClientConnectorError"))
        assert waiting is not None and waiting.status == STATUS.MESSAGE_STATUS_PENDING
        h.sms_sink = SmsSink(tmp_path / "sms", port=port)
        await h.sms_sink.start()
        await h.clock.advance(RETRY_WAIT)
        [text] = await eventually(lambda: _texts(h), timeout=30)
        assert text.to == E164
        assert (await h.final(key)).status == STATUS.MESSAGE_STATUS_SENT
        await stays(lambda: _more_than_one_text(h), duration=0.3)
    finally:
        await h.close()


async def _more_than_one_text(h: Harness) -> bool:
    return len(h.texts()) > 1
