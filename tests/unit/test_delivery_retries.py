"""Retries, hard bounces and rate limits of delivery, as pure rules: the back-off schedule, which
SMTP answers refuse an address for good, and a token bucket that no clock second sees exceeded."""

from __future__ import annotations

import asyncio
from collections import Counter
from datetime import UTC, datetime, timedelta

import pytest

from relevans.kit.clock import ManualClock
from relevans.kit.settings import Settings, SettingsError
from services.delivery.channels import rate_limits
from services.delivery.domain import (
    BOUNCED,
    MAX_ATTEMPTS,
    PENDING,
    Final,
    RetryPolicy,
    SendFailure,
    SendOutcome,
    TokenBucket,
)
from services.delivery.domain.channels.email import EmailChannel
from services.delivery.rate_limits import RateLimiter

NOW = datetime(2026, 1, 5, 9, 0, tzinfo=UTC)
EMAIL = EmailChannel()
NO_SUCH_USER = "550 5.1.1 no such mailbox"


# ---- back-off -----------------------------------------------------------------------------------


def test_the_back_off_doubles_from_30_seconds_with_half_of_each_wait_random() -> None:
    policy = RetryPolicy(base_delay_s=30, max_delay_s=3600)
    assert [policy.delay_s(n, 0.0) for n in range(1, 5)] == [15, 30, 60, 120]
    assert [policy.delay_s(n, 0.999999) for n in range(1, 5)] == pytest.approx([30, 60, 120, 240])
    assert policy.delay_s(1, 0.5) == 22.5
    assert policy.next_attempt_at(2, NOW, 0.0) == NOW + timedelta(seconds=30)


def test_the_back_off_is_capped() -> None:
    policy = RetryPolicy(base_delay_s=30, max_delay_s=100)
    assert policy.delay_s(20, 0.0) == 50
    assert policy.delay_s(200, 0.999) < 100


def test_every_wait_of_the_default_policy_fits_between_its_bounds() -> None:
    policy = RetryPolicy()
    total_max = sum(policy.delay_s(n, 0.999999) for n in range(1, MAX_ATTEMPTS))
    total_min = sum(policy.delay_s(n, 0.0) for n in range(1, MAX_ATTEMPTS))
    # 8 attempts span from about half an hour to about an hour
    assert 1900 < total_min < total_max < 3900


# ---- hard bounces -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("stage", "code", "detail", "kind"),
    [
        ("rcpt", 550, "5.1.1 no such mailbox", "bounced"),
        ("rcpt", 550, "mailbox unavailable", "bounced"),
        ("rcpt", 551, "user not local", "bounced"),
        ("rcpt", 553, "mailbox name not allowed", "bounced"),
        ("rcpt", 552, "5.2.2 mailbox full", "permanent"),  # the mailbox exists: not the address
        ("rcpt", 554, "5.7.1 relay denied", "permanent"),
        ("data", 550, "5.1.1 recipient rejected after DATA", "bounced"),
        ("data", 550, "5.7.1 message looks like spam", "permanent"),
        ("data", 554, "5.1.1 no such user", "bounced"),
        ("mail", 553, "5.1.8 sender domain rejected", "permanent"),  # the sender's address
        ("data", 550, "5.1.7 bad sender address", "permanent"),
        ("rcpt", 450, "4.1.1 mailbox busy", "transient"),  # a 4xx is never for good
        ("rcpt", 451, "4.7.1 greylisted, try again", "transient"),
    ],
)
def test_a_permanent_refusal_of_the_recipient_is_a_hard_bounce(
    stage: str, code: int, detail: str, kind: str
) -> None:
    assert EMAIL.classify(SendFailure(stage, code, detail)) == kind


def test_a_hard_bounce_ends_the_message_bounced() -> None:
    assert EMAIL.final(SendOutcome("bounced", "550 5.1.1 no such mailbox"), 1) == Final(
        BOUNCED, "hard_bounce: smtp: 550 5.1.1 no such mailbox"
    )
    assert EMAIL.final(SendOutcome("transient", "451 later"), 2) == Final(
        PENDING, "retrying: attempt 2: smtp: 451 later"
    )


# ---- rate limits --------------------------------------------------------------------------------


def test_a_bucket_spaces_sends_by_the_rate_and_lets_an_idle_one_go_at_once() -> None:
    bucket = TokenBucket(rate=4)
    waits = [bucket.reserve(NOW) for _ in range(5)]
    assert waits == [0, 0.25, 0.5, 0.75, 1.0]
    # long idle: one token (no burst), then spaced again
    later = NOW + timedelta(seconds=60)
    assert [bucket.reserve(later), bucket.reserve(later)] == [0, 0.25]
    with pytest.raises(ValueError, match="rate"):
        TokenBucket(rate=0)


async def test_lanes_sharing_a_limiter_send_at_most_the_rate_in_any_clock_second() -> None:
    clock = ManualClock(NOW)
    rate, lanes, per_lane = 10, 8, 12
    limiter = RateLimiter(rate, clock)
    sent: list[datetime] = []

    async def lane() -> None:
        for _ in range(per_lane):
            await limiter.acquire()
            sent.append(clock.now())

    tasks = [asyncio.create_task(lane()) for _ in range(lanes)]
    while not all(t.done() for t in tasks):
        for _ in range(8):  # let every lane that may go take its turn at this clock time
            await asyncio.sleep(0)
        await clock.advance(timedelta(milliseconds=10))
    per_second = Counter(int((t - NOW).total_seconds()) for t in sent)
    assert len(sent) == lanes * per_lane
    assert max(per_second.values()) == rate
    # and not slower than the rate: 96 sends at 10/s take under 10 clock seconds
    assert max(per_second) == (lanes * per_lane - 1) // rate


def test_a_bounce_closes_the_triggers_decision_trace_as_not_delivered() -> None:
    from relevans.delivery.v1 import bus_pb2, delivery_pb2
    from services.trigger.consumers import delivery_outcome

    bounced = bus_pb2.DeliveryStatusChanged(
        tenant_id="shop",
        message_id="m1",
        idempotency_key="cart:p1:e1",
        profile_id="p1",
        trigger_id="cart",
        status=delivery_pb2.MESSAGE_STATUS_BOUNCED,
        reason=f"hard_bounce: smtp: {NO_SUCH_USER}",
    )
    found = delivery_outcome(bounced, NOW)
    assert found is not None
    assert (found.outcome, found.reason) == ("delivery_failed", f"hard_bounce: smtp: {NO_SUCH_USER}")


@pytest.mark.parametrize(
    ("env", "named"),
    [
        ({"RELEVANS_SMTP_RATE_LIMIT": "-1"}, "RELEVANS_SMTP_RATE_LIMIT"),
        ({"RELEVANS_SMS_RATE_LIMIT": "-1"}, "RELEVANS_SMS_RATE_LIMIT"),
        ({"RELEVANS_WEBHOOK_RATE_LIMIT": "-0.5"}, "RELEVANS_WEBHOOK_RATE_LIMIT"),
        ({"RELEVANS_DELIVERY_RETRY_DELAY": "0"}, "RELEVANS_DELIVERY_RETRY_DELAY"),
        ({"RELEVANS_DELIVERY_RETRY_DELAY": "60", "RELEVANS_DELIVERY_RETRY_MAX_DELAY": "30"}, "MAX_DELAY"),
    ],
)
def test_bad_retry_and_rate_settings_name_the_variable(env: dict[str, str], named: str) -> None:
    with pytest.raises(SettingsError, match=named):
        Settings.from_env(env)
    assert Settings.from_env({"RELEVANS_SMTP_RATE_LIMIT": "12.5"}).smtp_rate_limit == 12.5


def test_the_rate_limits_are_the_services_shared_by_its_processes() -> None:
    one = Settings(smtp_rate_limit=10, sms_rate_limit=3, webhook_rate_limit=0)
    assert rate_limits(one) == {"email": 10, "sms": 3, "webhook": 0}
    two = Settings(
        smtp_rate_limit=10, sms_rate_limit=3, delivery_processes=2, delivery_http_listen="127.0.0.1:50154"
    )
    assert rate_limits(two) == {"email": 5, "sms": 1.5, "webhook": 0}


def test_several_delivery_processes_need_a_fixed_http_port() -> None:
    with pytest.raises(SettingsError, match="RELEVANS_DELIVERY_HTTP_LISTEN"):
        Settings(delivery_processes=2, delivery_http_listen="127.0.0.1:0")
    with pytest.raises(SettingsError, match="RELEVANS_DELIVERY_PROCESSES=0"):
        Settings(delivery_processes=0)
