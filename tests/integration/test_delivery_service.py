"""The delivery service on real PostgreSQL, NATS JetStream, gRPC, SMTP — and the real profile service."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import replace
from datetime import timedelta
from email.message import EmailMessage
from pathlib import Path
from typing import Any

import grpc
import pytest_asyncio
import sqlalchemy as sa
from aiosmtpd.smtp import SMTP

from relevans.common.v1 import common_pb2
from relevans.delivery.v1 import delivery_pb2
from relevans.kit.clock import ManualClock
from relevans.kit.locks import lock_key64
from relevans.kit.proto import to_struct
from relevans.kit.settings import Settings
from relevans.local.embedded import free_port
from relevans.profile.v1 import bus_pb2 as profile_bus_pb2
from relevans.profile.v1 import profile_pb2
from services.delivery.profiles import ProfileClient
from services.delivery.tables import merged_profiles, messages
from services.profile.app import build as build_profile
from tests.helpers import eventually, field_violations, rpc_error, stays
from tests.helpers.cart import SUBJECT, TEMPLATE_ID
from tests.helpers.delivery import EMAIL, TENANT, Harness, token


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


def body_of(mail: EmailMessage) -> str:
    part = mail.get_body(preferencelist=("plain",))
    assert part is not None
    return str(part.get_content())


# ---- sending ------------------------------------------------------------------------------------


async def test_a_request_sends_one_mail_with_subject_body_and_unsubscribe_headers(harness: Harness) -> None:
    profile_id = await harness.customer()
    await harness.put_template()
    key = await harness.request(profile_id)

    [mail] = await eventually(harness.some_mail)
    assert mail["To"] == EMAIL
    assert mail["From"] == harness.settings.smtp_sender
    assert mail["Subject"] == "Ada, your cart is waiting"
    assert body_of(mail) == "Hi Ada,\nyou left Blue running shoes in your cart.\n"

    message = await harness.final(key)
    assert message.status == delivery_pb2.MESSAGE_STATUS_SENT
    assert (message.recipient, message.subject) == (EMAIL, "Ada, your cart is waiting")
    assert (message.profile_id, message.trigger_id, message.template_id) == (
        profile_id,
        "abandoned-cart",
        TEMPLATE_ID,
    )
    assert message.channel == common_pb2.CHANNEL_EMAIL
    assert [c.status for c in message.history] == [
        delivery_pb2.MESSAGE_STATUS_PENDING,
        delivery_pb2.MESSAGE_STATUS_SENT,
    ]
    assert mail["Message-ID"] == f"<{message.message_id}@relevans.local>"
    assert "/u/" in mail["List-Unsubscribe"]  # the signed link: tests/integration/test_delivery_tracking.py
    assert "<mailto:" in mail["List-Unsubscribe"]
    assert mail["List-Unsubscribe-Post"] == "List-Unsubscribe=One-Click"

    got = await harness.delivery.GetMessage(
        delivery_pb2.GetMessageRequest(message_id=message.message_id), metadata=token(TENANT, "read")
    )
    assert got.message == message

    [(subject, event)] = await eventually(harness.status_events)
    assert subject == "rv.delivery.status.sent"
    assert (event.message_id, event.idempotency_key, event.profile_id) == (
        message.message_id,
        key,
        profile_id,
    )
    assert event.status == delivery_pb2.MESSAGE_STATUS_SENT


async def test_the_same_request_twice_sends_one_mail(harness: Harness) -> None:
    profile_id = await harness.customer()
    await harness.put_template()
    key = await harness.request(profile_id, "abandoned-cart:p:e1")
    await harness.request(profile_id, key)
    await eventually(harness.some_mail)
    await eventually(harness.requests_done)
    await harness.request(profile_id, key)  # and once more, after the first was sent
    await eventually(harness.requests_done)
    await stays(harness.more_than_one_mail, duration=0.5)
    assert len(await harness.messages()) == 1


async def test_consent_withdrawn_before_the_request_suppresses_it(harness: Harness) -> None:
    profile_id = await harness.customer()
    await harness.put_template()
    await harness.set_consent(profile_id, common_pb2.CONSENT_STATUS_WITHDRAWN)
    key = await harness.request(profile_id)

    message = await harness.final(key)
    assert message.status == delivery_pb2.MESSAGE_STATUS_SUPPRESSED
    assert message.reason == "consent_withdrawn"
    got = await harness.delivery.GetMessage(
        delivery_pb2.GetMessageRequest(message_id=message.message_id), metadata=token(TENANT, "read")
    )
    assert got.message.status == delivery_pb2.MESSAGE_STATUS_SUPPRESSED
    assert got.message.history[-1].reason == "consent_withdrawn"
    [(subject, _)] = await eventually(harness.status_events)
    assert subject == "rv.delivery.status.suppressed"
    assert harness.mails() == []


async def test_transactional_messages_need_no_marketing_consent(harness: Harness) -> None:
    profile_id = await harness.customer(consent=common_pb2.CONSENT_STATUS_DENIED)
    await harness.put_template()
    marketing = await harness.request(profile_id)
    service = await harness.request(profile_id, purpose=common_pb2.PURPOSE_TRANSACTIONAL)
    assert (await harness.final(marketing)).reason == "consent_withdrawn"
    assert (await harness.final(service)).status == delivery_pb2.MESSAGE_STATUS_SENT
    assert len(await eventually(harness.some_mail)) == 1


async def test_no_first_name_says_hi_there(harness: Harness) -> None:
    profile_id = await harness.customer(first_name="")
    await harness.put_template()
    await harness.request(profile_id)
    [mail] = await eventually(harness.some_mail)
    assert body_of(mail).startswith("Hi there,\n")
    assert mail["Subject"] == "Hello, your cart is waiting"


async def test_a_placeholder_first_name_is_not_printed(harness: Harness) -> None:
    profile_id = await harness.customer(first_name="*|FNAME|*")
    await harness.put_template()
    await harness.request(profile_id)
    [mail] = await eventually(harness.some_mail)
    assert body_of(mail).startswith("Hi there,\n")


async def test_a_null_first_name_falls_back_instead_of_blocking_the_message(harness: Harness) -> None:
    """ "None None" once failed the output check (render_failed: output contains 'None')."""
    profile_id = await harness.customer(first_name="None None")
    await harness.put_template()
    key = await harness.request(profile_id)
    assert (await harness.final(key)).status == delivery_pb2.MESSAGE_STATUS_SENT
    [mail] = await eventually(harness.some_mail)
    assert body_of(mail).startswith("Hi there,\n")
    assert mail["Subject"] == "Hello, your cart is waiting"


async def test_a_first_name_is_printed_as_the_person_wrote_it(harness: Harness) -> None:
    profile_id = await harness.customer(first_name="de la Cruz")
    await harness.put_template()
    await harness.request(profile_id)
    [mail] = await eventually(harness.some_mail)
    assert body_of(mail).startswith("Hi de la Cruz,\n")


async def test_a_template_using_an_undefined_variable_is_not_sent(harness: Harness) -> None:
    profile_id = await harness.customer()
    await harness.put_template(body="Hi {{ first_name | fallback('you') }}, code {{ event.coupon_code }}.\n")
    key = await harness.request(profile_id)
    message = await harness.final(key)
    assert message.status == delivery_pb2.MESSAGE_STATUS_SUPPRESSED
    assert message.reason.startswith("render_failed: ")
    assert "coupon_code" in message.reason
    await stays(harness.some_mail, duration=0.3)


async def test_missing_profile_and_missing_template(harness: Harness) -> None:
    profile_id = await harness.customer()
    await harness.put_template()
    nobody = await harness.request("no-such-profile")
    no_template = await harness.request(profile_id, template_id="no-such-template")
    assert (await harness.final(nobody)).reason == "profile_not_found"
    missing = await harness.final(no_template)
    assert (missing.status, missing.reason) == (delivery_pb2.MESSAGE_STATUS_FAILED, "template_not_found")
    assert harness.mails() == []


# ---- at most once under failures ---------------------------------------------------------------


async def insert_message(harness: Harness, key: str, profile_id: str, status: str) -> None:
    now = harness.clock.now()
    async with harness.engine.begin() as conn:
        await conn.execute(
            messages.insert().values(
                tenant_id=TENANT,
                message_id=f"m-{key}",
                idempotency_key=key,
                profile_id=profile_id,
                trigger_id="abandoned-cart",
                channel="email",
                purpose="marketing",
                template_id=TEMPLATE_ID,
                variables={},
                status=status,
                reason="",
                recipient=EMAIL,
                subject="s",
                attempts=0,
                created_at=now,
                updated_at=now,
            )
        )


async def test_a_message_left_mid_send_by_a_crashed_worker_is_failed_not_resent(harness: Harness) -> None:
    profile_id = await harness.customer()
    await harness.put_template()
    await insert_message(harness, "crashed", profile_id, "sending")
    await harness.request(profile_id, "crashed")
    message = await harness.final("crashed")
    assert (message.status, message.reason) == (delivery_pb2.MESSAGE_STATUS_FAILED, "outcome_unknown")
    await stays(harness.some_mail, duration=0.3)


async def test_a_request_another_live_worker_holds_is_left_to_it(harness: Harness) -> None:
    profile_id = await harness.customer()
    await harness.put_template()
    await insert_message(harness, "busy", profile_id, "sending")
    async with harness.engine.connect() as other_worker:
        await other_worker.execute(sa.select(sa.func.pg_advisory_lock(lock_key64(TENANT, "busy"))))
        await other_worker.commit()
        await harness.request(profile_id, "busy")
        await stays(lambda: harness.message("busy", delivery_pb2.MESSAGE_STATUS_FAILED), duration=0.6)
        # The other worker finishes its send, records it and lets go.
        await other_worker.execute(
            messages.update().where(messages.c.idempotency_key == "busy").values(status="sent")
        )
        await other_worker.execute(sa.select(sa.func.pg_advisory_unlock_all()))
        await other_worker.commit()
    await eventually(harness.requests_done)
    assert (await harness.final("busy")).status == delivery_pb2.MESSAGE_STATUS_SENT
    assert harness.mails() == []


async def test_smtp_down_is_retried_until_it_is_back(
    settings: Settings, clock: ManualClock, nats_url: str, tmp_path: Path
) -> None:
    port = free_port()
    h = Harness(settings, clock, nats_url, tmp_path / "mail")
    try:
        await h.start(smtp_port=port, sink=False)
        profile_id = await h.customer()
        await h.put_template()
        key = await h.request(profile_id)
        retrying = await eventually(lambda: _reason(h, key, "retrying: attempt 1: smtp: "))
        assert retrying is not None
        assert retrying.status == delivery_pb2.MESSAGE_STATUS_PENDING
        await eventually(h.requests_done)  # the request is acked: the retry is the message's row
        await h.start_sink(port)
        await stays(h.some_mail, duration=0.3)  # not before its back-off has passed
        await clock.advance(timedelta(seconds=30))  # the first retry waits 15 to 30 s
        [mail] = await eventually(h.some_mail)
        assert mail["Subject"] == "Ada, your cart is waiting"
        sent = await h.final(key)
        assert sent.status == delivery_pb2.MESSAGE_STATUS_SENT
        assert sent.attempts == 2
        assert any(c.reason.startswith("retrying: attempt 1: smtp: ") for c in sent.history)
        assert sent.history[-1].status == delivery_pb2.MESSAGE_STATUS_SENT
    finally:
        await h.close()


async def test_profile_service_down_is_retried_until_it_is_back(harness: Harness) -> None:
    profile_id = await harness.customer()
    await harness.put_template()
    profile_host = harness.hosts.pop(0)
    await profile_host.stop()
    key = await harness.request(profile_id)

    waiting = await eventually(lambda: _reason(harness, key, "retrying: attempt 1: profile_unavailable"))
    assert waiting is not None
    assert waiting.status == delivery_pb2.MESSAGE_STATUS_PENDING
    assert harness.mails() == []

    again = await build_profile(
        replace(harness.settings, profile_listen=f"127.0.0.1:{profile_host.port}"), harness.clock
    )
    await again.start()
    harness.hosts.insert(0, again)

    async def mailed_after_another_retry() -> list[EmailMessage]:
        # past the back-off of the next attempt (the first ones may still find the client's
        # connection to profile backing off)
        await harness.clock.advance(timedelta(minutes=10))
        return harness.mails()

    [mail] = await eventually(mailed_after_another_retry, timeout=30, interval=0.5)
    assert mail["Subject"] == "Ada, your cart is waiting"
    assert (await harness.final(key)).status == delivery_pb2.MESSAGE_STATUS_SENT


async def _reason(h: Harness, key: str, prefix: str) -> delivery_pb2.Message | None:
    m = await h.message(key)
    return m if m is not None and m.reason.startswith(prefix) else None


class _RejectingHandler:
    async def handle_RCPT(self, server: Any, session: Any, envelope: Any, address: str, options: Any) -> str:
        return "554 5.7.1 relaying denied"  # permanent, but not about the address (that is a bounce)


async def test_a_permanent_smtp_refusal_fails_the_message_with_the_reply(
    settings: Settings, clock: ManualClock, nats_url: str, tmp_path: Path
) -> None:
    loop = asyncio.get_running_loop()
    server = await loop.create_server(
        lambda: SMTP(_RejectingHandler(), hostname="rejecting", loop=loop), "127.0.0.1", 0
    )
    h = Harness(settings, clock, nats_url, tmp_path / "mail")
    h.smtp_servers.append(server)
    try:
        await h.start(smtp_port=server.sockets[0].getsockname()[1], sink=False)
        profile_id = await h.customer()
        await h.put_template()
        key = await h.request(profile_id)
        message = await h.final(key)
        assert message.status == delivery_pb2.MESSAGE_STATUS_FAILED
        assert message.reason == "smtp_rejected: 554 5.7.1 relaying denied"
        [(subject, _)] = await eventually(h.status_events)
        assert subject == "rv.delivery.status.failed"
    finally:
        await h.close()


# ---- the API ------------------------------------------------------------------------------------


async def test_bad_put_template_names_the_field_and_line(harness: Harness) -> None:
    err = await rpc_error(harness.put_template(body="Hi {{ first_name | fallback('there') }},\n{% if %}\n"))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    violations = field_violations(err)
    assert list(violations) == ["template.body_text"]
    assert "line 2" in violations["template.body_text"]

    err = await rpc_error(harness.put_template(template_id="Not Valid!", subject=""))
    assert set(field_violations(err)) == {"template.template_id", "template.subject"}

    err = await rpc_error(
        harness.delivery.PutTemplate(
            delivery_pb2.PutTemplateRequest(
                template=delivery_pb2.Template(
                    template_id="nowhere", channel=common_pb2.CHANNEL_UNSPECIFIED, subject="s", body_text="b"
                )
            ),
            metadata=token(TENANT, "admin"),
        )
    )
    assert "template.channel" in field_violations(err)


async def test_templates_are_stored_previewed_and_need_admin_to_change(harness: Harness) -> None:
    stored = await harness.put_template()
    assert (stored.template_id, stored.locale, stored.subject) == (TEMPLATE_ID, "en", SUBJECT)
    got = await harness.delivery.GetTemplate(
        delivery_pb2.GetTemplateRequest(template_id=TEMPLATE_ID), metadata=token(TENANT, "read")
    )
    assert got.template == stored

    preview = await harness.delivery.PreviewTemplate(
        delivery_pb2.PreviewTemplateRequest(
            template_id=TEMPLATE_ID,
            variables=to_struct({"first_name": "ADA", "event": {"product_name": "Shoes"}}),
        ),
        metadata=token(TENANT, "read"),
    )
    assert (preview.subject, preview.body_text) == (
        "ADA, your cart is waiting",
        "Hi ADA,\nyou left Shoes in your cart.\n",
    )

    err = await rpc_error(
        harness.delivery.PreviewTemplate(
            delivery_pb2.PreviewTemplateRequest(template_id=TEMPLATE_ID), metadata=token(TENANT, "read")
        )
    )
    assert err.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "render_failed" in (err.details() or "") and "event" in (err.details() or "")

    err = await rpc_error(_put_with_read_scope(harness))
    assert err.code() == grpc.StatusCode.PERMISSION_DENIED

    err = await rpc_error(
        harness.delivery.GetTemplate(
            delivery_pb2.GetTemplateRequest(template_id=TEMPLATE_ID), metadata=token("other", "read")
        )
    )
    assert err.code() == grpc.StatusCode.NOT_FOUND


async def _put_with_read_scope(harness: Harness) -> None:
    await harness.delivery.PutTemplate(
        delivery_pb2.PutTemplateRequest(
            template=delivery_pb2.Template(
                template_id="x", channel=common_pb2.CHANNEL_EMAIL, subject="s", body_text="b"
            )
        ),
        metadata=token(TENANT, "read"),
    )


async def test_messages_are_listed_newest_first_per_profile_and_tenant(harness: Harness) -> None:
    ada = await harness.customer()
    bob = await harness.customer(email="bob@example.com", first_name="Bob")
    await harness.put_template()
    keys = []
    for who in (ada, bob, ada):
        keys.append(await harness.request(who))
        await harness.final(keys[-1])

    listed = await harness.messages()
    assert [m.idempotency_key for m in listed] == list(reversed(keys))
    assert [m.idempotency_key for m in await harness.messages(profile_id=ada)] == [keys[2], keys[0]]

    first = await harness.delivery.ListMessages(
        delivery_pb2.ListMessagesRequest(page_size=2), metadata=token(TENANT, "read")
    )
    assert [m.idempotency_key for m in first.messages] == [keys[2], keys[1]]
    second = await harness.delivery.ListMessages(
        delivery_pb2.ListMessagesRequest(page_size=2, page_token=first.next_page_token),
        metadata=token(TENANT, "read"),
    )
    assert [m.idempotency_key for m in second.messages] == [keys[0]]
    assert second.next_page_token == ""

    err = await rpc_error(
        harness.delivery.ListMessages(
            delivery_pb2.ListMessagesRequest(page_token="nonsense"), metadata=token(TENANT, "read")
        )
    )
    assert "page_token" in field_violations(err)

    assert await harness.messages(tenant="other") == []
    err = await rpc_error(
        harness.delivery.GetMessage(
            delivery_pb2.GetMessageRequest(message_id=listed[0].message_id), metadata=token("other", "read")
        )
    )
    assert err.code() == grpc.StatusCode.NOT_FOUND


# ---- profile merges -----------------------------------------------------------------------------


async def shadow(harness: Harness, anonymous_id: str) -> str:
    """A profile known only by an anonymous id."""
    event = profile_pb2.Event(type="page_view", anonymous_id=anonymous_id)
    reply = await harness.profiles.Track(
        profile_pb2.TrackRequest(event=event), metadata=token(TENANT, "ingest")
    )
    return str(reply.profile_id)


async def identify(harness: Harness, anonymous_id: str) -> None:
    await harness.profiles.Identify(
        profile_pb2.IdentifyRequest(email=EMAIL, anonymous_id=anonymous_id), metadata=token(TENANT, "ingest")
    )


async def merges_consumed(harness: Harness) -> bool:
    info = await harness.js.consumer_info("RV_PROFILE", "delivery-merges")
    return not info.num_pending and not info.num_ack_pending


async def survivor_of(harness: Harness, profile_id: str) -> str | None:
    async with harness.engine.connect() as conn:
        m = merged_profiles
        return await conn.scalar(sa.select(m.c.surviving_profile_id).where(m.c.profile_id == profile_id))


async def message_rows(harness: Harness) -> list[tuple[str, str]]:
    async with harness.engine.connect() as conn:
        rows = await conn.execute(
            sa.select(messages.c.idempotency_key, messages.c.profile_id).order_by(messages.c.idempotency_key)
        )
        return [(r.idempotency_key, r.profile_id) for r in rows]


async def test_a_merge_gives_the_shadows_messages_and_later_requests_to_the_known_person(
    harness: Harness,
) -> None:
    known = await harness.customer()
    await harness.put_template()
    anon = await shadow(harness, "cookie-1")
    before = await harness.request(anon, "abandoned-cart:anon:e1")
    assert (await harness.final(before)).status == delivery_pb2.MESSAGE_STATUS_SUPPRESSED  # no address yet

    await identify(harness, "cookie-1")  # profile merges the shadow into Ada and publishes ProfileMerged
    await eventually(lambda: _rows_are(harness, [(before, known)]))
    [listed] = await harness.messages(profile_id=known)
    assert (listed.idempotency_key, listed.profile_id) == (before, known)
    assert await harness.messages(profile_id=anon) == [listed]  # the old id stands for the survivor

    # A request the trigger service still addresses to the merged-away id goes to Ada, once.
    after = await harness.request(anon, "abandoned-cart:anon:e2")
    [mail] = await eventually(harness.some_mail)
    assert mail["To"] == EMAIL
    sent = await harness.final(after)
    assert (sent.status, sent.profile_id) == (delivery_pb2.MESSAGE_STATUS_SENT, known)
    await harness.request(anon, after)
    await eventually(harness.requests_done)
    await stays(harness.more_than_one_mail, duration=0.4)

    # The merge delivered again moves nothing and changes nothing.
    rows = await message_rows(harness)
    again = profile_bus_pb2.ProfileMerged(
        tenant_id=TENANT, surviving_profile_id=known, merged_profile_id=anon, reason="anonymous_id"
    )
    await harness.js.publish("rv.profile.merged", again.SerializeToString())
    await eventually(lambda: merges_consumed(harness))
    assert await message_rows(harness) == rows == [(before, known), (after, known)]


async def _rows_are(harness: Harness, expected: list[tuple[str, str]]) -> bool:
    return await message_rows(harness) == expected


async def test_the_profile_client_answers_a_merged_away_id_with_the_survivor(harness: Harness) -> None:
    known = await harness.customer()
    anon = await shadow(harness, "cookie-2")
    await identify(harness, "cookie-2")
    client = ProfileClient(
        harness.settings.profile_target,
        deadline_s=2.0,
        secret=harness.settings.token_secret,
        clock=harness.clock,
    )
    try:
        views = await client.batch_get(TENANT, [anon, known, "no-such-profile"])
    finally:
        await client.close()
    assert set(views) == {anon, known}
    assert (views[anon].profile_id, views[anon].email, views[anon].first_name) == (known, EMAIL, "Ada")


async def test_erasing_the_survivor_deletes_messages_recorded_under_the_merged_away_id(
    harness: Harness,
) -> None:
    known = await harness.customer()
    await harness.put_template()
    anon = await shadow(harness, "cookie-3")
    await identify(harness, "cookie-3")
    assert await eventually(lambda: survivor_of(harness, anon)) == known
    # A message recorded under the old id while the merge was being applied is still the person's.
    await insert_message(harness, "abandoned-cart:anon:late", anon, "sent")
    [late] = await harness.messages(profile_id=known)
    assert late.idempotency_key == "abandoned-cart:anon:late"

    await harness.profiles.EraseProfile(
        profile_pb2.EraseProfileRequest(profile_id=known, request_id="erase-1"),
        metadata=token(TENANT, "admin"),
    )
    await eventually(lambda: _rows_are(harness, []))
    # A late request for the merged-away id is dropped like one for the person.
    await harness.request(anon, "abandoned-cart:anon:after-erasure")
    await eventually(harness.requests_done)
    assert await message_rows(harness) == []


UNSAFE_BODIES = {
    "class of a string": "Hi {{ ''.__class__.__mro__ }}\n",
    "dunder of a variable": "Hi\n{{ event.__mro__ }}\n",
    "dunder by subscript": "Hi {{ event['__class__'] }}\n",
    "dunder by the attr filter": "Hi {{ event | attr('__globals__') }}\n",
    "a blocked str method": "Hi {{ '{0.__class__}'.format(event) }}\n",
    "a huge range": "{% for i in range(10**9) %}x{% endfor %}\n",
    "a huge repetition": "Hi {{ 'a' * 10**9 }}\n",
    "a huge power": "Hi {{ 7 ** 100000 }}\n",
    "a huge padding": "Hi {{ 'a' | center(10**9) }}\n",
    "a huge integer literal": "Hi {{ " + "9" * 5000 + " }}\n",
    "an infinite literal": "Hi {{ 1e999 }}\n",
    "a division by zero": "Hi {{ 1 / 0 }}\n",
    "deeply nested parentheses": "Hi {{ " + "(" * 100 + "1" + ")" * 100 + " }}\n",
    "deeply nested blocks": "Hi\n" + "{% if x %}" * 101 + "y" + "{% endif %}" * 101 + "\n",
}


async def test_put_template_refuses_what_could_only_fail_when_rendered(harness: Harness) -> None:
    """Unsafe constructs are refused when saved (issue 16, finding 6): what could only fail when a
    message is rendered is INVALID_ARGUMENT on `template.body_text`, naming the line; nothing is stored."""
    for case, body in UNSAFE_BODIES.items():  # one service for all: each save must fail the same way
        err = await rpc_error(harness.put_template(body=body))
        assert err.code() == grpc.StatusCode.INVALID_ARGUMENT, case
        violations = field_violations(err)
        assert list(violations) == ["template.body_text"], case
        assert violations["template.body_text"].startswith("does not compile: line "), (case, violations)
    err = await rpc_error(
        harness.delivery.GetTemplate(
            delivery_pb2.GetTemplateRequest(template_id=TEMPLATE_ID), metadata=token(TENANT, "read")
        )
    )
    assert err.code() == grpc.StatusCode.NOT_FOUND
