"""Delivery's retries, hard bounces and rate limit end to end: real PostgreSQL, NATS, the profile
service and an SMTP sink that answers as it is scripted to (451 greylisting, 550 no such mailbox).
Time is the ManualClock: each retry is due, and each rate-limited mail may go, only once the test
moves the clock. Also: the migration that adds bounces goes down and up."""

from __future__ import annotations

from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import replace
from datetime import timedelta
from pathlib import Path

import pytest_asyncio
import sqlalchemy as sa
from alembic import command
from sqlalchemy import Connection

from relevans.common.v1 import common_pb2
from relevans.delivery.v1 import delivery_pb2
from relevans.kit.clock import ManualClock
from relevans.kit.db import alembic_config, create_engine
from relevans.kit.settings import Settings
from relevans.local.smtp_sink import SmtpScript
from services.delivery.app import build
from services.delivery.domain import MAX_ATTEMPTS, RetryPolicy
from services.delivery.suppressions import Suppression, suppress, suppression_reasons
from services.delivery.tables import messages
from tests.helpers import eventually, stays
from tests.helpers.delivery import EMAIL, Harness

GREYLISTED = "451 4.7.1 greylisted, try again later"
NO_SUCH_USER = "550 5.1.1 no such mailbox"
BOUNCING = "gone@example.com"
FIRST_RETRY_MAX_S = RetryPolicy().delay_s(1, 0.999999)

Start = Callable[[SmtpScript], Awaitable[Harness]]


@pytest_asyncio.fixture
async def started(
    settings: Settings, clock: ManualClock, nats_url: str, tmp_path: Path
) -> AsyncIterator[Start]:
    """Start the harness with an SMTP sink answering as the given script says."""
    harnesses: list[Harness] = []

    async def start(script: SmtpScript) -> Harness:
        h = Harness(settings, clock, nats_url, tmp_path / f"mail{len(harnesses)}")
        harnesses.append(h)
        await h.start(script=script)
        return h

    try:
        yield start
    finally:
        for h in harnesses:
            await h.close()


async def _attempts(h: Harness, key: str, n: int) -> delivery_pb2.Message | None:
    """The message once `n` attempts at sending it are recorded."""
    m = await h.message(key)
    return m if m is not None and m.attempts >= n else None


async def _attempted(h: Harness, key: str, n: int) -> delivery_pb2.Message:
    """Wait until `n` attempts at sending the message are recorded."""
    found = await eventually(lambda: _attempts(h, key, n))
    assert found is not None
    return found


async def _next_attempt(h: Harness, key: str, made: int) -> delivery_pb2.Message:
    """Move the clock past the back-off after attempt `made`, and wait for attempt `made + 1`."""
    await _attempted(h, key, made)
    await h.clock.advance(timedelta(seconds=RetryPolicy().delay_s(made, 0.999999)))
    return await _attempted(h, key, made + 1)


async def test_451_twice_then_250_sends_one_mail_after_three_attempts_each_in_the_history(
    started: Start,
) -> None:
    h = await started(SmtpScript(rcpt={EMAIL: [GREYLISTED, GREYLISTED]}))
    assert h.sink is not None
    profile_id = await h.customer()
    await h.put_template()
    key = await h.request(profile_id)

    first = await _attempted(h, key, 1)
    assert (first.status, first.reason) == (
        delivery_pb2.MESSAGE_STATUS_PENDING,
        f"retrying: attempt 1: smtp: {GREYLISTED}",
    )
    await eventually(h.requests_done)  # acked: the retry is the message's row, not a bus redelivery
    await h.clock.advance(timedelta(seconds=FIRST_RETRY_MAX_S / 2 - 1))  # before the earliest retry
    await stays(lambda: _attempts(h, key, 2), duration=0.3)

    await _next_attempt(h, key, 1)
    await _next_attempt(h, key, 2)
    sent = await h.final(key)

    [mail] = h.mails()
    assert mail["To"] == EMAIL
    assert h.sink.rcpt_attempts(EMAIL) == 3
    assert (sent.status, sent.attempts) == (delivery_pb2.MESSAGE_STATUS_SENT, 3)
    assert [(c.status, c.reason) for c in sent.history] == [
        (delivery_pb2.MESSAGE_STATUS_PENDING, "accepted"),
        (delivery_pb2.MESSAGE_STATUS_PENDING, f"retrying: attempt 1: smtp: {GREYLISTED}"),
        (delivery_pb2.MESSAGE_STATUS_PENDING, f"retrying: attempt 2: smtp: {GREYLISTED}"),
        (delivery_pb2.MESSAGE_STATUS_SENT, "smtp: 250 OK"),
    ]
    await h.clock.advance(timedelta(hours=2))
    await stays(h.more_than_one_mail, duration=0.3)
    [(subject, _)] = await eventually(h.status_events)
    assert subject == "rv.delivery.status.sent"


async def test_550_bounces_without_retry_and_suppresses_the_address_for_the_next_send(
    started: Start,
) -> None:
    h = await started(SmtpScript(rcpt={BOUNCING: [NO_SUCH_USER] * 10}))
    assert h.sink is not None
    gone = await h.customer(email=BOUNCING, first_name="Gus")
    ada = await h.customer()
    await h.put_template()
    key = await h.request(gone)

    bounced = await h.final(key)
    assert (bounced.status, bounced.reason) == (
        delivery_pb2.MESSAGE_STATUS_BOUNCED,
        f"hard_bounce: smtp: {NO_SUCH_USER}",
    )
    assert (bounced.recipient, bounced.attempts) == (BOUNCING, 1)
    [(subject, event)] = await eventually(h.status_events)
    assert (subject, event.status) == ("rv.delivery.status.bounced", delivery_pb2.MESSAGE_STATUS_BOUNCED)
    await h.clock.advance(timedelta(hours=2))
    await stays(lambda: _attempts(h, key, 2), duration=0.3)
    assert h.sink.rcpt_attempts(BOUNCING) == 1  # not retried

    # the next message to that address is suppressed before any SMTP; other addresses still go
    again = await h.final(await h.request(gone, purpose=common_pb2.PURPOSE_TRANSACTIONAL))
    assert (again.status, again.reason) == (delivery_pb2.MESSAGE_STATUS_SUPPRESSED, "address_bounced")
    assert h.sink.rcpt_attempts(BOUNCING) == 1
    assert (await h.final(await h.request(ada))).status == delivery_pb2.MESSAGE_STATUS_SENT

    # suppression is the tenant's: another tenant's customer with that address is not suppressed
    # (the sink still refuses it, so it bounces there too)
    other = await h.customer(email=BOUNCING, tenant="other-shop")
    await h.put_template(tenant="other-shop")
    elsewhere = await h.request(other, tenant="other-shop")
    found = await eventually(lambda: _final_in(h, "other-shop", elsewhere))
    assert found is not None and found.status == delivery_pb2.MESSAGE_STATUS_BOUNCED
    assert h.sink.rcpt_attempts(BOUNCING) == 2


async def _final_in(h: Harness, tenant: str, key: str) -> delivery_pb2.Message | None:
    for m in await h.messages(tenant):
        if m.idempotency_key == key and m.status != delivery_pb2.MESSAGE_STATUS_PENDING:
            return m
    return None


async def test_retries_exhausted_end_failed_with_the_last_error(
    started: Start,
) -> None:
    h = await started(SmtpScript(rcpt={EMAIL: [GREYLISTED] * 100}))
    assert h.sink is not None
    profile_id = await h.customer()
    await h.put_template()
    key = await h.request(profile_id)
    for made in range(1, MAX_ATTEMPTS):
        await _next_attempt(h, key, made)
    failed = await h.final(key)

    assert (failed.status, failed.attempts) == (delivery_pb2.MESSAGE_STATUS_FAILED, MAX_ATTEMPTS)
    assert failed.reason == f"retries_exhausted: {MAX_ATTEMPTS} attempts: smtp: {GREYLISTED}"
    retrying = [c.reason for c in failed.history if c.reason.startswith("retrying: ")]
    assert retrying == [f"retrying: attempt {n}: smtp: {GREYLISTED}" for n in range(1, MAX_ATTEMPTS)]
    assert h.sink.rcpt_attempts(EMAIL) == MAX_ATTEMPTS
    await h.clock.advance(timedelta(days=1))
    await stays(lambda: _attempts(h, key, MAX_ATTEMPTS + 1), duration=0.3)
    assert h.mails() == []
    [(subject, _)] = await eventually(h.status_events)
    assert subject == "rv.delivery.status.failed"


async def test_consent_is_asked_for_again_at_each_attempt(
    started: Start,
) -> None:
    h = await started(SmtpScript(rcpt={EMAIL: [GREYLISTED]}))
    assert h.sink is not None
    profile_id = await h.customer()
    await h.put_template()
    key = await h.request(profile_id)
    await _attempted(h, key, 1)

    await h.set_consent(profile_id, common_pb2.CONSENT_STATUS_WITHDRAWN)
    await h.clock.advance(timedelta(seconds=FIRST_RETRY_MAX_S))
    message = await h.final(key)

    assert (message.status, message.reason) == (delivery_pb2.MESSAGE_STATUS_SUPPRESSED, "consent_withdrawn")
    assert h.mails() == []
    assert h.sink.rcpt_attempts(EMAIL) == 1


async def test_the_smtp_rate_limit_holds_mails_until_the_clock_lets_them_go(
    settings: Settings, clock: ManualClock, nats_url: str, tmp_path: Path
) -> None:
    h = Harness(replace(settings, smtp_rate_limit=1.0), clock, nats_url, tmp_path / "mail")
    try:
        await h.start()
        profile_id = await h.customer()
        await h.put_template()
        keys = [await h.request(profile_id) for _ in range(3)]
        await eventually(h.some_mail)
        await stays(h.more_than_one_mail, duration=0.3)  # 1 a second, and the clock stands still
        await clock.advance(timedelta(seconds=1))
        await eventually(lambda: _mail_count(h, 2))
        await stays(lambda: _mail_count(h, 3), duration=0.3)
        await clock.advance(timedelta(seconds=1))
        await eventually(lambda: _mail_count(h, 3))
        for key in keys:
            assert (await h.final(key)).status == delivery_pb2.MESSAGE_STATUS_SENT
    finally:
        await h.close()


async def _mail_count(h: Harness, n: int) -> bool:
    return len(h.mails()) >= n


async def test_two_delivery_processes_make_each_retry_once(
    settings: Settings, clock: ManualClock, nats_url: str, tmp_path: Path
) -> None:
    """Both processes' retry workers see every due message; each retry is still made once: the
    message is read under its lock, and one retried a moment ago is no longer due."""
    h = Harness(settings, clock, nats_url, tmp_path / "mail")
    try:
        await h.start(script=SmtpScript(data=[GREYLISTED]))  # every message's first DATA: 451
        second = await build(h.settings, clock)
        await second.start()
        h.hosts.append(second)
        profile_id = await h.customer()
        await h.put_template()
        keys = [await h.request(profile_id) for _ in range(30)]
        for key in keys:
            await _attempted(h, key, 1)
        await clock.advance(timedelta(seconds=FIRST_RETRY_MAX_S))
        finals = [await h.final(key) for key in keys]

        assert {(m.status, m.attempts) for m in finals} == {(delivery_pb2.MESSAGE_STATUS_SENT, 2)}
        for m in finals:
            assert [c.reason for c in m.history] == [
                "accepted",
                f"retrying: attempt 1: smtp: {GREYLISTED}",
                "smtp: 250 OK",
            ]
        mails = Counter(str(mail["Message-ID"]) for mail in h.mails())
        assert len(mails) == 30 and set(mails.values()) == {1}
    finally:
        await h.close()


def _alembic(conn: Connection, direction: str, revision: str) -> None:
    cfg = alembic_config("delivery")
    cfg.attributes["connection"] = conn
    getattr(command, direction)(cfg, revision)


async def test_the_bounce_migration_goes_down_and_up_again(settings: Settings, clock: ManualClock) -> None:
    engine = create_engine(settings.database_url("delivery"))
    now = clock.now()
    try:
        async with engine.begin() as conn:
            await conn.execute(
                messages.insert().values(
                    tenant_id="shop",
                    message_id="m1",
                    idempotency_key="k1",
                    profile_id="p1",
                    trigger_id="t",
                    channel="email",
                    purpose="marketing",
                    template_id="cart",
                    variables={},
                    status="bounced",
                    reason=f"hard_bounce: smtp: {NO_SUCH_USER}",
                    recipient=BOUNCING,
                    subject="",
                    attempts=1,
                    created_at=now,
                    updated_at=now,
                )
            )
            await suppress(
                conn,
                [
                    Suppression("shop", "email", BOUNCING, "address_bounced"),
                    Suppression("shop", "", "erased@example.com", "erased"),
                ],
                now,
            )
            await conn.run_sync(_alembic, "downgrade", "0006")
            status = await conn.scalar(sa.text("SELECT status FROM messages"))
            kept = await conn.scalars(sa.text("SELECT reason FROM suppressions"))
            assert (status, list(kept)) == ("failed", ["erased"])
            await conn.run_sync(_alembic, "upgrade", "head")
            found = await suppression_reasons(conn, [("shop", "email", "Erased@example.com ")])
            assert found == {("shop", "email", "Erased@example.com "): "erased"}
    finally:
        await engine.dispose()
