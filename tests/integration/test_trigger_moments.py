"""Every kind of moment, the policies and the decision trace, on real PostgreSQL, NATS and gRPC.

The tests publish what the profile service would (enriched events, trait and segment changes),
move the ManualClock, and read what reaches delivery and what `ExplainDecisions` says.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from zoneinfo import ZoneInfo

import grpc
import pytest_asyncio
import sqlalchemy as sa

from relevans.common.v1 import common_pb2
from relevans.delivery.v1 import bus_pb2 as delivery_bus_pb2
from relevans.delivery.v1 import delivery_pb2
from relevans.kit.clock import ManualClock
from relevans.kit.settings import Settings
from relevans.profile.v1 import bus_pb2 as profile_bus_pb2
from relevans.profile.v1 import profile_pb2
from relevans.trigger.v1 import trigger_pb2
from services.trigger.store import TriggerStore
from services.trigger.timers import DecisionPruner
from tests.helpers import eventually, field_violations, rpc_error, stays
from tests.helpers.cart import cart_trigger
from tests.helpers.moments import (
    duration,
    equals,
    inactivity,
    on_date,
    on_event,
    on_segment,
    on_trait,
    score_reaches,
    threshold,
)
from tests.helpers.trigger import Harness, token

DAY = timedelta(days=1)
CPH = ZoneInfo("Europe/Copenhagen")
TOYS = equals("event.category", "toys")


@pytest_asyncio.fixture
async def harness(settings: Settings, clock: ManualClock, nats_url: str) -> AsyncIterator[Harness]:
    async with Harness.running(settings, clock, nats_url) as h:
        yield h


async def _requests_of(h: Harness, trigger_id: str) -> list[delivery_bus_pb2.DeliveryRequest]:
    return [r for r in await h.requests() if r.trigger_id == trigger_id]


async def _decided(h: Harness, profile_id: str, n: int) -> list[tuple[str, str, str]]:
    """The person's decisions once there are at least `n` of them."""
    found = await h.outcomes(profile_id)
    return found if len(found) >= n else []


# ---- event ---------------------------------------------------------------------------------------


async def test_an_event_trigger_fires_on_each_matching_event_and_explains_the_others(
    harness: Harness,
) -> None:
    await harness.create(
        trigger=on_event(
            "big-purchase", "purchase", {"compare": {"field": "event.total", "op": "gt", "value": 10_000}}
        )
    )
    small = harness.enriched("purchase", total=900)
    big = harness.enriched("purchase", total=12_500)
    await harness.publish(small)
    await harness.publish(big)
    [request] = await eventually(lambda: _requests_of(harness, "big-purchase"))
    assert request.idempotency_key == f"big-purchase:p1:{big.event_id}"
    decisions = await eventually(lambda: _decided(harness, "p1", 3))
    # Both events may be decided in one batch, at one instant: only the hand-over is surely last.
    assert sorted(decisions[:2]) == [
        ("big-purchase", "fired", "event_matched"),
        ("big-purchase", "not_fired", "condition_false"),
    ]
    assert decisions[2] == ("big-purchase", "handed_to_delivery", "sent")


async def test_a_late_event_fires_nothing_and_the_trace_says_why(harness: Harness) -> None:
    await harness.create(trigger=on_event("thanks", "purchase"))
    await harness.publish(harness.enriched("purchase", at_offset=-3 * DAY))
    decisions = await eventually(lambda: _decided(harness, "p1", 1))
    assert decisions == [("thanks", "not_fired", "late_event")]
    await stays(lambda: _requests_of(harness, "thanks"), duration=0.3)


# ---- threshold -------------------------------------------------------------------------------------


async def test_the_eleventh_toy_view_within_seven_days_fires_once(harness: Harness) -> None:
    await harness.create(trigger=threshold("toy-interest", "page_view", 11, 7 * DAY, TOYS))
    for _ in range(10):
        await harness.publish(harness.enriched("page_view", category="toys"))
        await harness.publish(harness.enriched("page_view", category="garden"))
        await harness.clock.advance(timedelta(hours=14))
    await stays(lambda: _requests_of(harness, "toy-interest"), duration=0.5)
    await harness.publish(harness.enriched("page_view", category="toys"))
    [request] = await eventually(lambda: _requests_of(harness, "toy-interest"))
    assert request.profile_id == "p1"
    await harness.publish(harness.enriched("page_view", category="toys"))
    await stays(lambda: harness.more_than_one_request(), duration=0.5)


async def test_eleven_views_with_at_most_ten_in_any_seven_days_never_fire(harness: Harness) -> None:
    await harness.create(trigger=threshold("toy-interest", "page_view", 11, 7 * DAY, TOYS))
    await harness.publish(harness.enriched("page_view", category="toys"))
    await harness.clock.advance(6 * DAY)
    for _ in range(9):
        await harness.publish(harness.enriched("page_view", category="toys"))
        await harness.clock.advance(timedelta(hours=2))
    # The first view is exactly 7 days old now: outside the window (t - 7 days, t].
    await harness.advance_to(harness.clock.now() + (7 * DAY - 6 * DAY - timedelta(hours=18)))
    await harness.publish(harness.enriched("page_view", category="toys"))
    await stays(lambda: _requests_of(harness, "toy-interest"), duration=0.8)


# ---- inactivity --------------------------------------------------------------------------------------


async def test_a_check_in_on_day_13_moves_the_deadline_and_a_lapse_sends_once(harness: Harness) -> None:
    await harness.create(trigger=inactivity("lapsing", ["check_in"], 14 * DAY))
    await harness.publish(harness.enriched("check_in"))
    [timer] = await eventually(harness.pending)
    start = harness.clock.now()
    assert timer.due_at == start + 14 * DAY
    await harness.clock.advance(13 * DAY)
    await harness.publish(harness.enriched("check_in"))
    await eventually(lambda: _due_is(harness, start + 27 * DAY))
    await harness.clock.advance(2 * DAY)  # day 15: the first deadline has passed, the moved one has not
    await stays(lambda: _requests_of(harness, "lapsing"), duration=0.5)
    await harness.advance_to(start + 27 * DAY)
    [request] = await eventually(lambda: _requests_of(harness, "lapsing"))
    await harness.clock.advance(30 * DAY)
    await stays(harness.more_than_one_request, duration=0.5)
    # A new lapse: the next check-in starts it, and 14 days later one more message.
    await harness.publish(harness.enriched("check_in"))
    await eventually(harness.pending)
    await harness.clock.advance(14 * DAY)
    assert len(await eventually(lambda: _at_least(harness, "lapsing", 2))) == 2
    assert request.idempotency_key != (await _requests_of(harness, "lapsing"))[1].idempotency_key


async def _due_is(h: Harness, due: datetime) -> bool:
    return [t.due_at for t in await h.pending()] == [due]


async def _at_least(h: Harness, trigger_id: str, n: int) -> list[delivery_bus_pb2.DeliveryRequest]:
    found = await _requests_of(h, trigger_id)
    return found if len(found) >= n else []


# ---- dates ------------------------------------------------------------------------------------------


async def test_a_birthday_greeting_goes_at_ten_local_time_in_each_persons_zone(harness: Harness) -> None:
    await harness.create(trigger=on_date("birthday", "birthday", "10:00", yearly=True))
    zones = {"cph": "Europe/Copenhagen", "la": "America/Los_Angeles", "syd": "Australia/Sydney"}
    for person, zone in zones.items():
        await harness.publish_traits(person, {"birthday": "1990-07-15", "time_zone": zone})
    timers = await eventually(lambda: _pending_count(harness, 3))
    due = {t.profile_id: t.due_at for t in timers}
    assert due == {
        "cph": datetime(2026, 7, 15, 8, tzinfo=UTC),  # 10:00 CEST
        "la": datetime(2026, 7, 15, 17, tzinfo=UTC),  # 10:00 PDT
        "syd": datetime(2026, 7, 15, 0, tzinfo=UTC),  # 10:00 AEST
    }
    await harness.advance_to(datetime(2026, 7, 15, 8, tzinfo=UTC))
    sent = await eventually(lambda: _at_least(harness, "birthday", 2))
    assert {r.profile_id for r in sent} == {"syd", "cph"}
    await harness.advance_to(datetime(2026, 7, 15, 17, tzinfo=UTC))
    await eventually(lambda: _at_least(harness, "birthday", 3))
    # Next year's greetings are waiting, each at 10:00 local again.
    nxt = {t.profile_id: t.due_at for t in await harness.pending()}
    assert nxt["cph"] == datetime(2027, 7, 15, 8, tzinfo=UTC)


async def _pending_count(h: Harness, n: int) -> list:  # type: ignore[type-arg]
    found = await h.pending()
    return found if len(found) >= n else []


async def test_a_renewal_reminder_on_the_night_clocks_change_is_sent_once_at_the_local_time(
    harness: Harness,
) -> None:
    # Autumn 2026 in Copenhagen: 03:00 CEST on 25 October becomes 02:00 CET; 02:30 happens twice.
    await harness.create(trigger=on_date("renewal", "renewal_date", "02:30", offset_days=-7))
    await harness.publish_traits("p1", {"renewal_date": "2026-11-01", "time_zone": "Europe/Copenhagen"})
    [timer] = await eventually(harness.pending)
    assert timer.due_at == datetime(2026, 10, 25, 0, 30, tzinfo=UTC)  # the first 02:30 (CEST)
    await harness.advance_to(datetime(2026, 10, 25, 0, 30, tzinfo=UTC))
    [request] = await eventually(lambda: _requests_of(harness, "renewal"))
    await harness.clock.advance(timedelta(hours=2))  # past the second 02:30 (CET)
    await stays(harness.more_than_one_request, duration=0.5)
    assert request.profile_id == "p1"


async def test_a_changed_date_trait_moves_the_timer(harness: Harness) -> None:
    await harness.create(trigger=on_date("renewal", "renewal_date", "09:00", offset_days=-7))
    await harness.publish_traits("p1", {"renewal_date": "2026-03-01"})
    await eventually(lambda: _due_is(harness, datetime(2026, 2, 22, 9, tzinfo=UTC)))
    await harness.clock.advance(timedelta(minutes=1))
    await harness.publish_traits(
        "p1", {"renewal_date": "2026-04-01"}, previous={"renewal_date": "2026-03-01"}
    )
    await eventually(lambda: _due_is(harness, datetime(2026, 3, 25, 9, tzinfo=UTC)))


# ---- segments and traits ---------------------------------------------------------------------------


async def test_segment_entry_and_a_trait_taking_a_value_fire(harness: Harness) -> None:
    await harness.create(trigger=on_segment("welcome-vip", "vips"))
    await harness.create(trigger=on_trait("gold", "tier", "gold"))
    await harness.publish_segment("p1", "vips", entered=False)
    await harness.publish_segment("p1", "vips", entered=True)
    await harness.publish_traits("p1", {"tier": "silver"})
    await harness.publish_traits("p1", {"tier": "gold"}, previous={"tier": "silver"})
    await eventually(lambda: _requests_of(harness, "welcome-vip"))
    [gold] = await eventually(lambda: _requests_of(harness, "gold"))
    assert gold.profile_id == "p1"
    await stays(lambda: _at_least(harness, "welcome-vip", 2), duration=0.3)


# ---- policies ----------------------------------------------------------------------------------------


def _per_day(n: int, channel: int = common_pb2.CHANNEL_UNSPECIFIED) -> trigger_pb2.FrequencyCap:
    return trigger_pb2.FrequencyCap(channel=channel, max_messages=n, calendar_day=True)


async def test_six_triggers_and_a_cap_of_three_send_the_three_highest_priorities(harness: Harness) -> None:
    await harness.set_policy(trigger_pb2.Policy(caps=[_per_day(3, common_pb2.CHANNEL_EMAIL)]))
    for n in range(1, 7):
        action = trigger_pb2.CAPPED_ACTION_DROP if n % 2 else trigger_pb2.CAPPED_ACTION_DEFER
        policy = trigger_pb2.TriggerPolicy(priority=n, capped_action=action)
        await harness.create(trigger=on_event(f"promo-{n}", "visit", policy=policy))
    await harness.create(trigger=on_event("receipt", "visit", purpose=common_pb2.PURPOSE_TRANSACTIONAL))
    await harness.publish(harness.enriched("visit"))
    sent = await eventually(lambda: _count_at_least(harness, 4))
    assert sorted(r.trigger_id for r in sent) == ["promo-4", "promo-5", "promo-6", "receipt"]
    decisions = await eventually(lambda: _decided(harness, "p1", 14))
    capped = {t: code for t, outcome, code in decisions if outcome == "capped"}
    assert capped == {"promo-1": "cap", "promo-2": "cap", "promo-3": "cap"}
    deferred = [
        d
        for d in await harness.explain("p1")
        if d.trigger_id == "promo-2" and d.outcome == trigger_pb2.DECISION_OUTCOME_CAPPED
    ]
    assert deferred[0].defer_until.ToDatetime(UTC) == datetime(
        2026, 1, 6, tzinfo=UTC
    )  # next midnight (UTC zone)
    await stays(lambda: _count_at_least(harness, 5), duration=0.5)


async def _count_at_least(h: Harness, n: int) -> list[delivery_bus_pb2.DeliveryRequest]:
    found = await h.requests()
    return found if len(found) >= n else []


async def test_two_trigger_processes_never_send_past_a_cap_of_one(harness: Harness) -> None:
    await harness.start()  # a second instance sharing the events, the timers and the database
    await harness.set_policy(trigger_pb2.Policy(caps=[_per_day(1)]))
    for n in range(5):
        await harness.create(
            trigger=on_event(f"offer-{n}", "visit", policy=trigger_pb2.TriggerPolicy(priority=n))
        )
    people = [f"p{i}" for i in range(20)]
    for p in people:
        await harness.publish(harness.enriched("visit", profile_id=p))
    sent = await eventually(lambda: _count_at_least(harness, len(people)))
    await stays(lambda: _count_at_least(harness, len(people) + 1), duration=1.0)
    assert sorted(r.profile_id for r in sent) == sorted(people)
    assert {r.trigger_id for r in sent} == {"offer-4"}


async def test_quiet_hours_defer_to_their_end_and_an_expiry_that_comes_first_drops(harness: Harness) -> None:
    await harness.set_policy(
        trigger_pb2.Policy(
            quiet_hours=trigger_pb2.QuietHours(start="22:00", end="07:00"),
            default_time_zone="Europe/Copenhagen",
        )
    )
    await harness.create(trigger=on_event("evening-offer", "visit"))
    short = trigger_pb2.TriggerPolicy(expiry=duration(timedelta(hours=6)))
    await harness.create(trigger=on_event("flash-sale", "visit", policy=short))
    await harness.advance_to(datetime(2026, 1, 5, 22, 15, tzinfo=CPH))
    await harness.publish(harness.enriched("visit"))
    decisions = await eventually(lambda: _decided(harness, "p1", 4))
    assert ("evening-offer", "deferred", "quiet_hours") in decisions
    assert ("flash-sale", "expired", "expired") in decisions
    [deferral] = [
        d
        for d in await harness.explain("p1", "evening-offer")
        if d.outcome == trigger_pb2.DECISION_OUTCOME_DEFERRED
    ]
    assert deferral.defer_until.ToDatetime(UTC) == datetime(2026, 1, 6, 7, tzinfo=CPH)
    await harness.advance_to(datetime(2026, 1, 6, 6, 59, tzinfo=CPH))
    await stays(harness.requests, duration=0.4)
    await harness.advance_to(datetime(2026, 1, 6, 7, 0, tzinfo=CPH))
    [request] = await eventually(harness.requests)
    assert request.trigger_id == "evening-offer"


# ---- restarts -------------------------------------------------------------------------------------


async def test_a_restart_with_timers_of_every_kind_pending_fires_each_exactly_once(harness: Harness) -> None:
    # Quiet hours all day but a minute keep the moments that fire at once pending too.
    await harness.set_policy(
        trigger_pb2.Policy(
            quiet_hours=trigger_pb2.QuietHours(start="09:00", end="08:59"), default_expiry=duration(7 * DAY)
        )
    )
    start = harness.clock.now()
    await harness.create(trigger=on_event("k-event", "visit"))
    await harness.create(trigger=threshold("k-threshold", "visit", 1, DAY))
    await harness.create(trigger=inactivity("k-inactivity", ["visit"], DAY))
    await harness.create(trigger=on_date("k-date", "renewal_date", "12:00"))
    await harness.create(trigger=on_segment("k-segment", "vips"))
    await harness.create(trigger=on_trait("k-trait", "tier", "gold"))
    await harness.create(trigger=cart_trigger("k-absence", delay=timedelta(hours=1)))
    await harness.publish(harness.enriched("visit"))
    await harness.publish(harness.enriched("add_to_cart"))
    await harness.publish_segment("p1", "vips", entered=True)
    await harness.publish_traits("p1", {"tier": "gold", "renewal_date": "2026-01-06"})
    kinds = {"k-event", "k-threshold", "k-inactivity", "k-date", "k-segment", "k-trait", "k-absence"}
    await eventually(lambda: _pending_triggers(harness, kinds))
    [host] = harness.hosts
    await harness.stop(host)
    await harness.start()
    await harness.advance_to(start + 2 * DAY - timedelta(seconds=30))  # 08:59:30, outside quiet hours
    sent = await eventually(lambda: _count_at_least(harness, len(kinds)))
    await stays(lambda: _count_at_least(harness, len(kinds) + 1), duration=1.0)
    assert sorted(r.trigger_id for r in sent) == sorted(kinds)


async def _pending_triggers(h: Harness, wanted: set[str]) -> bool:
    return {t.trigger_id for t in await h.pending()} >= wanted


# ---- the trace closes with delivery's outcome --------------------------------------------------------


async def test_delivery_outcomes_end_the_story_in_the_trace(harness: Harness) -> None:
    await harness.create(trigger=on_event("thanks", "purchase"))
    await harness.publish(harness.enriched("purchase"))
    [request] = await eventually(lambda: _requests_of(harness, "thanks"))
    status = delivery_bus_pb2.DeliveryStatusChanged(
        tenant_id=request.tenant_id,
        message_id="m1",
        idempotency_key=request.idempotency_key,
        profile_id=request.profile_id,
        trigger_id=request.trigger_id,
        status=delivery_pb2.MESSAGE_STATUS_SUPPRESSED,
        reason="consent_withdrawn",
    )
    status.time.FromDatetime(harness.clock.now())
    for _ in range(2):  # a redelivered status is one entry
        await harness.js.publish("rv.delivery.status.suppressed", status.SerializeToString())
    decisions = await eventually(lambda: _decided(harness, "p1", 3))
    assert decisions[-1] == ("thanks", "delivery_suppressed", "suppressed")
    newest = (await harness.explain("p1"))[0]
    assert newest.reason == "consent_withdrawn"
    assert newest.idempotency_key == request.idempotency_key
    await stays(lambda: _decided(harness, "p1", 4), duration=0.3)


# ---- bad input ------------------------------------------------------------------------------------


async def _violations(harness: Harness, t: trigger_pb2.Trigger) -> dict[str, str]:
    err = await rpc_error(
        harness.stub.CreateTrigger(trigger_pb2.CreateTriggerRequest(trigger=t), metadata=token("shop"))
    )
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    return field_violations(err)


async def test_bad_definitions_name_their_field_paths_and_save_nothing(harness: Harness) -> None:
    cases = {
        "trigger.event.condition.compare.field": on_event("a", "purchase", equals("nosuch.field", 1)),
        "trigger.event.condition.compare.value": on_event(
            "a2", "purchase", {"compare": {"field": "score", "op": "gt", "value": "high"}}
        ),
        "trigger.threshold.event_count.window": threshold("b", "page_view", 3, timedelta(0)),
        "trigger.inactivity.duration": inactivity("c", ["visit"], timedelta(days=400)),
        "trigger.date.local_time": on_date("d", "birthday", "25:00"),
        "trigger.date.date_trait": on_date("e", "", "10:00"),
        "trigger.policy.reentry.period": on_event(
            "f",
            "visit",
            policy=trigger_pb2.TriggerPolicy(
                reentry=trigger_pb2.ReentryRule(mode=trigger_pb2.REENTRY_MODE_ONCE_PER_PERIOD)
            ),
        ),
    }
    for field, t in cases.items():
        assert field in await _violations(harness, t), field
    listed = await harness.stub.ListTriggers(trigger_pb2.ListTriggersRequest(), metadata=token("shop"))
    assert not listed.triggers


async def test_bad_policies_name_their_field_paths_and_change_nothing(harness: Harness) -> None:
    before = await harness.stub.GetPolicy(trigger_pb2.GetPolicyRequest(), metadata=token("shop"))
    bad = trigger_pb2.Policy(
        caps=[trigger_pb2.FrequencyCap(max_messages=0, calendar_day=True)],
        quiet_hours=trigger_pb2.QuietHours(start="22:00", end="22:00"),
        default_time_zone="Mars/Olympus_Mons",
    )
    err = await rpc_error(
        harness.stub.SetPolicy(trigger_pb2.SetPolicyRequest(policy=bad), metadata=token("shop"))
    )
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert {"policy.caps[0].max_messages", "policy.quiet_hours.end", "policy.default_time_zone"} <= set(
        field_violations(err)
    )
    after = await harness.stub.GetPolicy(trigger_pb2.GetPolicyRequest(), metadata=token("shop"))
    assert after == before


async def test_explain_is_tenant_scoped_and_pages_newest_first(harness: Harness) -> None:
    await harness.create(
        trigger=on_event("seen", "visit", {"compare": {"field": "event.n", "op": "gt", "value": 100}})
    )
    await harness.create(trigger=on_event("every", "visit"))
    # The first evaluation is decided alone (a batch's evaluations of one person are one row).
    await harness.publish(harness.enriched("visit", n=0))
    await eventually(lambda: _decided(harness, "p1", 3))
    for n in range(1, 5):
        await harness.clock.advance(timedelta(minutes=1))
        await harness.publish(harness.enriched("visit", n=n))
    await eventually(lambda: _decided(harness, "p1", 11))
    # Condition-false evaluations are one entry, written again at most hourly with the count since.
    [collapsed] = await harness.explain("p1", "seen")
    assert (collapsed.reason_code, collapsed.count) == ("condition_false", 1)
    await harness.clock.advance(timedelta(hours=1))
    last = harness.enriched("visit", n=5)
    await harness.publish(last)
    await eventually(lambda: _counted(harness, "seen", 6))
    [collapsed] = await harness.explain("p1", "seen")
    assert collapsed.event_id == last.event_id
    assert collapsed.decide_time.ToDatetime(UTC) == harness.clock.now()
    first = await harness.stub.ExplainDecisions(
        trigger_pb2.ExplainDecisionsRequest(profile_id="p1", page_size=3), metadata=token("shop")
    )
    second = await harness.stub.ExplainDecisions(
        trigger_pb2.ExplainDecisionsRequest(profile_id="p1", page_size=3, page_token=first.next_page_token),
        metadata=token("shop"),
    )
    times = [d.decide_time.ToDatetime() for d in [*first.decisions, *second.decisions]]
    assert times == sorted(times, reverse=True)
    other = await harness.stub.ExplainDecisions(
        trigger_pb2.ExplainDecisionsRequest(profile_id="p1"), metadata=token("other-shop")
    )
    assert not other.decisions
    err = await rpc_error(
        harness.stub.ExplainDecisions(
            trigger_pb2.ExplainDecisionsRequest(profile_id="p2", page_token=first.next_page_token),
            metadata=token("shop"),
        )
    )
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT


# ---- the profile in the event, consent, erasure, retention ------------------------------------------


async def test_conditions_see_the_profile_at_the_event_and_the_score_crossing_fires_once(
    harness: Harness,
) -> None:
    await harness.create(
        trigger=on_event(
            "gold-buyer", "purchase", {"compare": {"field": "trait.tier", "op": "eq", "value": "gold"}}
        )
    )
    await harness.create(trigger=score_reaches("hand-to-sales", 100, channel=common_pb2.CHANNEL_WEBHOOK))
    for score, tier in ((40, "silver"), (120, "gold"), (150, "gold")):
        event = harness.enriched("purchase")
        event.profile.score = score
        event.profile.traits["tier"].string_value = tier
        await harness.publish(event)
    sent = await eventually(lambda: _count_at_least(harness, 3))
    await stays(lambda: _count_at_least(harness, 4), duration=0.5)
    assert sorted(r.trigger_id for r in sent) == ["gold-buyer", "gold-buyer", "hand-to-sales"]
    assert next(r for r in sent if r.trigger_id == "hand-to-sales").channel == common_pb2.CHANNEL_WEBHOOK


async def test_a_withdrawn_consent_suppresses_marketing_and_an_erasure_takes_the_trace(
    harness: Harness,
) -> None:
    await harness.create(trigger=on_event("offer", "visit"))
    consent = profile_bus_pb2.ConsentChanged(
        tenant_id="shop",
        profile_id="p1",
        consent=profile_pb2.Consent(
            purpose=common_pb2.PURPOSE_MARKETING,
            channel=common_pb2.CHANNEL_EMAIL,
            status=common_pb2.CONSENT_STATUS_WITHDRAWN,
        ),
    )
    consent.consent.update_time.FromDatetime(harness.clock.now())
    await harness.js.publish("rv.profile.consent", consent.SerializeToString())
    await eventually(lambda: _consents_known(harness, "p1"))  # the two streams are not ordered
    await harness.publish(harness.enriched("visit"))
    decisions = await eventually(lambda: _decided(harness, "p1", 2))
    assert decisions[-1] == ("offer", "suppressed", "no_consent")
    await stays(harness.requests, duration=0.3)

    erased = profile_bus_pb2.ProfileErased(tenant_id="shop", profile_id="p1", erasure_id="e1")
    await harness.js.publish("rv.profile.erased", erased.SerializeToString())
    await eventually(lambda: _no_decisions(harness, "p1"))


async def _counted(h: Harness, trigger_id: str, count: int) -> bool:
    return [d.count for d in await h.explain("p1", trigger_id)] == [count]


async def _consents_known(h: Harness, profile_id: str) -> bool:
    async with h.engine.connect() as conn:
        found = await conn.execute(
            sa.text("SELECT consents FROM people WHERE profile_id = :p"), {"p": profile_id}
        )
        return bool(found.scalar())


async def _no_decisions(h: Harness, profile_id: str) -> bool:
    return not await h.explain(profile_id)


async def test_decisions_older_than_the_retention_are_pruned(harness: Harness) -> None:
    await harness.create(trigger=on_event("offer", "visit"))
    await harness.publish(harness.enriched("visit", profile_id="old"))
    await eventually(lambda: _decided(harness, "old", 2))
    await harness.clock.advance(timedelta(days=60))
    await harness.publish(harness.enriched("visit", profile_id="recent"))
    await eventually(lambda: _decided(harness, "recent", 2))
    await harness.clock.advance(timedelta(days=31))  # "old" is 91 days old, "recent" 31
    pruner = DecisionPruner(TriggerStore(harness.engine), harness.clock, timedelta(days=90))
    assert await pruner.prune() == 2
    assert not await harness.explain("old")
    assert len(await harness.explain("recent")) == 2


async def test_re_entry_once_ever_and_a_minimum_interval_hold_back_and_say_so(harness: Harness) -> None:
    once = trigger_pb2.TriggerPolicy(reentry=trigger_pb2.ReentryRule(mode=trigger_pb2.REENTRY_MODE_ONCE_EVER))
    spaced = trigger_pb2.TriggerPolicy(
        reentry=trigger_pb2.ReentryRule(mode=trigger_pb2.REENTRY_MODE_EVERY_TIME, period=duration(DAY))
    )
    await harness.create(trigger=on_event("welcome", "visit", policy=once))
    await harness.create(trigger=on_event("daily-tip", "visit", policy=spaced))
    await harness.publish(harness.enriched("visit"))
    await eventually(lambda: _count_at_least(harness, 2))
    await harness.clock.advance(timedelta(hours=2))
    await harness.publish(harness.enriched("visit"))
    decisions = await eventually(lambda: _decided(harness, "p1", 8))
    assert ("welcome", "held_back", "reentry_once_ever") in decisions
    assert ("daily-tip", "held_back", "reentry_min_interval") in decisions
    await harness.clock.advance(DAY)
    await harness.publish(harness.enriched("visit"))
    sent = await eventually(lambda: _count_at_least(harness, 3))
    await stays(lambda: _count_at_least(harness, 4), duration=0.4)
    assert sorted(r.trigger_id for r in sent) == ["daily-tip", "daily-tip", "welcome"]


async def test_a_date_trigger_created_after_the_dates_were_known_arms_every_person(harness: Harness) -> None:
    await harness.create(
        trigger=on_segment("placeholder", "nobody")
    )  # the service follows traits from the start
    for person, day in (("p1", "1990-03-01"), ("p2", "1985-11-20")):
        await harness.publish_traits(person, {"birthday": day})
    await eventually(lambda: _people_known(harness, 2))
    await harness.create(trigger=on_date("birthday", "birthday", "10:00", yearly=True))
    due = {t.profile_id: t.due_at for t in await harness.pending()}
    assert due == {
        "p1": datetime(2026, 3, 1, 10, tzinfo=UTC),
        "p2": datetime(2026, 11, 20, 10, tzinfo=UTC),
    }


async def _people_known(h: Harness, n: int) -> bool:
    async with h.engine.connect() as conn:
        return (await conn.execute(sa.text("SELECT count(*) FROM people"))).scalar() == n
