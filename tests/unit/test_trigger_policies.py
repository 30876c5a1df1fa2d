"""Sending policies at fire time (`decide_due`), the person's zone, the history needed, and the
policies' stored JSON. Pure: no database, no clock but the `now` given."""

from __future__ import annotations

import json
from datetime import UTC, datetime, time, timedelta
from typing import Any
from zoneinfo import ZoneInfo

from hypothesis import given
from hypothesis import strategies as st

from services.trigger.domain.policies import (
    ALL_CHANNELS,
    CALENDAR_DAY_HORIZON,
    CHANNELS,
    DEFER,
    DROP,
    EVERY_TIME,
    ONCE_EVER,
    ONCE_PER_PERIOD,
    DueMessage,
    FrequencyCap,
    QuietHours,
    Reentry,
    Sent,
    TenantPolicy,
    TriggerPolicy,
    Verdict,
    decide_due,
    history_horizon,
    person_zone,
    tenant_policy_from_json,
    tenant_policy_to_json,
    trigger_policy_from_json,
    trigger_policy_to_json,
)

CPH = ZoneInfo("Europe/Copenhagen")
# Monday 4 May 2026, 12:00 in Copenhagen (CEST, UTC+2).
NOON = datetime(2026, 5, 4, 10, tzinfo=UTC)
DAY = timedelta(days=1)


def due(
    trigger_id: str,
    now: datetime = NOON,
    *,
    channel: str = "email",
    purpose: str = "marketing",
    occurrence: str = "o1",
    first_due_at: datetime | None = None,
    **policy: Any,
) -> DueMessage:
    return DueMessage(
        trigger_id=trigger_id,
        occurrence=occurrence,
        channel=channel,
        purpose=purpose,
        policy=TriggerPolicy(**policy),
        due_at=now,
        first_due_at=first_due_at or now,
    )


def sent(trigger_id: str, at: datetime, channel: str = "email", purpose: str = "marketing") -> Sent:
    return Sent(trigger_id, channel, purpose, at)


def outcomes(verdicts: list[Verdict]) -> list[tuple[str, str]]:
    return [(v.message.trigger_id, v.outcome) for v in verdicts]


# ---- caps and priority -------------------------------------------------------------------------

THREE_A_DAY = TenantPolicy(caps=(FrequencyCap(ALL_CHANNELS, 3),))


def test_six_triggers_due_at_once_under_a_cap_of_three_a_day_send_the_three_highest_priorities() -> None:
    # Priorities 1..6; the odd ones defer when capped, the even ones drop.
    messages = [due(f"t{p}", priority=p, capped_action=DEFER if p % 2 else DROP) for p in (3, 6, 1, 4, 2, 5)]
    receipt = due("receipt", purpose="transactional")
    verdicts = decide_due([*messages, receipt], [], THREE_A_DAY, CPH, NOON)

    by_id = {v.message.trigger_id: v for v in verdicts}
    assert [v.message for v in verdicts] == [*messages, receipt], "one verdict per message, in order"
    assert {t for t, o in outcomes(verdicts) if o == "handed_to_delivery"} == {"t6", "t5", "t4", "receipt"}
    midnight = datetime(2026, 5, 4, 22, tzinfo=UTC)  # 00:00 on 5 May in Copenhagen
    for t, until in (("t3", midnight), ("t1", midnight), ("t2", None)):
        v = by_id[t]
        assert (v.outcome, v.reason_code, v.until) == ("capped", "cap", until)
        assert "cap of 3 marketing messages per calendar day across all channels reached" in v.reason
    assert by_id["t3"].reason.endswith("deferred to 2026-05-05T00:00+02:00 Europe/Copenhagen")
    assert by_id["t2"].reason.endswith("dropped")
    assert by_id["receipt"].reason_code == "sent"


def test_the_calendar_day_is_the_persons_local_day() -> None:
    # Three sent between 00:30 and 01:30 local on 4 May: that is still 3 May in UTC.
    history = [
        sent("a", datetime(2026, 5, 3, 22, 30, tzinfo=UTC) + timedelta(minutes=30 * i)) for i in range(3)
    ]
    assert outcomes(decide_due([due("t")], history, THREE_A_DAY, CPH, NOON)) == [("t", "capped")]
    # In UTC the same sends fell on another day.
    assert outcomes(decide_due([due("t")], history, THREE_A_DAY, ZoneInfo("UTC"), NOON)) == [
        ("t", "handed_to_delivery")
    ]
    # Yesterday's local sends (23:30 on 3 May local) do not count.
    late = [sent("a", datetime(2026, 5, 3, 21, 30, tzinfo=UTC))] * 3
    assert outcomes(decide_due([due("t")], late, THREE_A_DAY, CPH, NOON)) == [("t", "handed_to_delivery")]


def test_transactional_sends_do_not_count_toward_caps_and_are_never_capped() -> None:
    history = [sent("r", NOON - timedelta(hours=1), purpose="transactional")] * 5
    verdicts = decide_due(
        [due("t"), due("r", purpose="transactional")],
        history + [sent("a", NOON - timedelta(hours=1))] * 3,
        THREE_A_DAY,
        CPH,
        NOON,
    )
    assert outcomes(verdicts) == [("t", "capped"), ("r", "handed_to_delivery")]
    assert outcomes(decide_due([due("t")], history, THREE_A_DAY, CPH, NOON)) == [("t", "handed_to_delivery")]


def test_messages_handed_earlier_in_the_decision_count_for_the_later_ones() -> None:
    history = [sent("a", NOON - timedelta(hours=2))] * 2
    verdicts = decide_due([due("t1", priority=1), due("t2", priority=2)], history, THREE_A_DAY, CPH, NOON)
    assert outcomes(verdicts) == [("t1", "capped"), ("t2", "handed_to_delivery")]


def test_priority_ties_go_to_the_first_due_then_the_trigger_id() -> None:
    one = TenantPolicy(caps=(FrequencyCap(ALL_CHANNELS, 1),))
    early = due("z", first_due_at=NOON - timedelta(hours=1))
    assert outcomes(decide_due([due("a"), early], [], one, CPH, NOON)) == [
        ("a", "capped"),
        ("z", "handed_to_delivery"),
    ]
    assert outcomes(decide_due([due("b"), due("a")], [], one, CPH, NOON)) == [
        ("b", "capped"),
        ("a", "handed_to_delivery"),
    ]


def test_a_channel_cap_counts_and_holds_only_its_channel() -> None:
    policy = TenantPolicy(caps=(FrequencyCap("email", 1),))
    history = [sent("a", NOON - timedelta(hours=1), channel="sms")] * 4
    verdicts = decide_due(
        [due("e1", priority=2), due("e2", priority=1), due("s", channel="sms")], history, policy, CPH, NOON
    )
    assert outcomes(verdicts) == [("e1", "handed_to_delivery"), ("e2", "capped"), ("s", "handed_to_delivery")]
    assert "cap of 1 email message per calendar day reached" in verdicts[1].reason


def test_rolling_six_a_week_across_channels_with_three_a_day_per_channel() -> None:
    policy = TenantPolicy(
        caps=(
            FrequencyCap("email", 3),
            FrequencyCap("sms", 3),
            FrequencyCap(ALL_CHANNELS, 6, rolling=timedelta(days=7)),
        )
    )
    week: dict[str, Any] = dict(expiry=timedelta(days=7))
    # Three emails today: a fourth email waits for midnight, an sms still goes.
    today = [sent("a", NOON - timedelta(hours=h)) for h in (1, 2, 3)]
    verdicts = decide_due([due("e", **week), due("s", channel="sms", **week)], today, policy, CPH, NOON)
    assert outcomes(verdicts) == [("e", "capped"), ("s", "handed_to_delivery")]
    assert verdicts[0].until == datetime(2026, 5, 4, 22, tzinfo=UTC)

    # Six this week on both channels: the week cap holds either channel until the oldest of
    # the six ages out (five days ago + 7 days), though each day cap has room.
    week_history = [
        sent("a", NOON - 5 * DAY),
        sent("a", NOON - 4 * DAY, channel="sms"),
        sent("a", NOON - 4 * DAY + timedelta(hours=1)),
        sent("a", NOON - 3 * DAY, channel="sms"),
        sent("a", NOON - 2 * DAY),
        sent("a", NOON - DAY, channel="sms"),
        sent("a", NOON - 8 * DAY),  # outside the window
    ]
    verdicts = decide_due(
        [due("e", **week), due("s", channel="sms", **week)], week_history, policy, CPH, NOON
    )
    assert outcomes(verdicts) == [("e", "capped"), ("s", "capped")]
    assert verdicts[0].until == verdicts[1].until == NOON + 2 * DAY
    assert "cap of 6 marketing messages per rolling 7 days across all channels reached" in verdicts[0].reason

    # The same with the default expiry of a day: the place comes too late, so it expires.
    verdicts = decide_due([due("e")], week_history, policy, CPH, NOON)
    assert (verdicts[0].outcome, verdicts[0].reason_code, verdicts[0].until) == ("expired", "expired", None)
    assert "after its expiry at 2026-05-05T12:00+02:00" in verdicts[0].reason


def test_a_deferral_waits_for_every_full_cap() -> None:
    policy = TenantPolicy(
        caps=(FrequencyCap(ALL_CHANNELS, 1), FrequencyCap(ALL_CHANNELS, 2, rolling=timedelta(hours=36)))
    )
    history = [sent("a", NOON - timedelta(hours=30)), sent("a", NOON - timedelta(hours=1))]
    [v] = decide_due([due("t", expiry=timedelta(days=2))], history, policy, CPH, NOON)
    # The day cap frees at midnight (+10 h), the 36-hour cap when the 30-hour-old send ages out (+6 h).
    assert v.until == datetime(2026, 5, 4, 22, tzinfo=UTC)


@given(
    priorities=st.lists(st.integers(-1000, 1000), min_size=1, max_size=12),
    cap=st.integers(1, 5),
    transactional=st.sets(st.integers(0, 11)),
)
def test_a_cap_is_never_exceeded_and_the_highest_priorities_go(
    priorities: list[int], cap: int, transactional: set[int]
) -> None:
    messages = [
        due(f"t{i:02d}", priority=p, purpose="transactional" if i in transactional else "marketing")
        for i, p in enumerate(priorities)
    ]
    verdicts = decide_due(messages, [], TenantPolicy(caps=(FrequencyCap(ALL_CHANNELS, cap),)), CPH, NOON)
    marketing = [v for v in verdicts if v.message.purpose == "marketing"]
    handed = [v for v in marketing if v.outcome == "handed_to_delivery"]
    assert len(handed) == min(cap, len(marketing))
    assert all(v.outcome == "capped" for v in marketing if v not in handed)
    if len(handed) < len(marketing):
        lowest_handed = min(v.message.policy.priority for v in handed)
        assert all(v.message.policy.priority <= lowest_handed for v in marketing if v not in handed)
    assert all(v.outcome == "handed_to_delivery" for v in verdicts if v.message.purpose == "transactional")


# ---- quiet hours --------------------------------------------------------------------------------

NIGHTS = TenantPolicy(quiet_hours=QuietHours(time(22), time(7)))


def local(year: int, month: int, day: int, hour: int, minute: int = 0) -> datetime:
    """A wall-clock time in Copenhagen as its UTC instant (the first, when it occurs twice)."""
    return datetime(year, month, day, hour, minute, tzinfo=CPH).astimezone(UTC)


def test_a_message_due_at_22_15_local_waits_until_07_00_local_the_next_day() -> None:
    now = local(2026, 5, 4, 22, 15)
    [v] = decide_due([due("t", now)], [], NIGHTS, CPH, now)
    assert (v.outcome, v.reason_code, v.until) == ("deferred", "quiet_hours", local(2026, 5, 5, 7))
    assert v.reason == (
        "quiet hours 22:00-07:00 in Europe/Copenhagen: deferred to 2026-05-05T07:00+02:00 Europe/Copenhagen"
    )


def test_quiet_hours_are_start_inclusive_and_end_exclusive_and_span_midnight() -> None:
    for hour, minute, until in (
        (22, 0, local(2026, 5, 5, 7)),
        (0, 30, local(2026, 5, 4, 7)),
        (6, 59, local(2026, 5, 4, 7)),
        (7, 0, None),
        (21, 59, None),
        (12, 0, None),
    ):
        now = local(2026, 5, 4, hour, minute)
        [v] = decide_due([due("t", now)], [], NIGHTS, CPH, now)
        assert v.until == until, (hour, minute)
        assert v.outcome == ("deferred" if until else "handed_to_delivery")


def test_quiet_hours_within_one_day() -> None:
    lunch = TenantPolicy(quiet_hours=QuietHours(time(12), time(13, 30)))
    [v] = decide_due([due("t")], [], lunch, CPH, NOON)
    assert v.until == local(2026, 5, 4, 13, 30)


def test_a_message_whose_expiry_comes_before_the_quiet_hours_end_expires() -> None:
    now = local(2026, 5, 4, 22, 15)
    [v] = decide_due([due("t", now, expiry=timedelta(hours=6))], [], NIGHTS, CPH, now)
    assert (v.outcome, v.reason_code, v.until) == ("expired", "expired", None)
    assert v.reason == (
        "quiet hours 22:00-07:00 in Europe/Copenhagen end at 2026-05-05T07:00+02:00 Europe/Copenhagen, "
        "after its expiry at 2026-05-05T04:15+02:00 Europe/Copenhagen"
    )


def test_quiet_hours_across_the_daylight_saving_nights() -> None:
    # Autumn: 25 October 2026 clocks go back 03:00 -> 02:00; the night is an hour longer.
    now = local(2026, 10, 24, 22, 15)
    [v] = decide_due([due("t", now)], [], NIGHTS, CPH, now)
    assert v.until == datetime(2026, 10, 25, 6, tzinfo=UTC) == local(2026, 10, 25, 7)
    # Spring: 29 March 2026 clocks jump 02:00 -> 03:00.
    now = local(2026, 3, 28, 22, 15)
    [v] = decide_due([due("t", now)], [], NIGHTS, CPH, now)
    assert v.until == datetime(2026, 3, 29, 5, tzinfo=UTC) == local(2026, 3, 29, 7)
    # Quiet hours ending inside the skipped hour end at the same instant read with the old offset.
    short = TenantPolicy(quiet_hours=QuietHours(time(22), time(2, 30)))
    [v] = decide_due([due("t", now)], [], short, CPH, now)
    assert v.until == datetime(2026, 3, 29, 1, 30, tzinfo=UTC)  # 03:30 CEST
    # Quiet hours leaving only 02:00-02:30 free: that night the free half hour does not exist,
    # so the message waits at the end (03:00 CEST, quiet again) and then for the next night's.
    tight = TenantPolicy(quiet_hours=QuietHours(time(2, 30), time(2)))
    [v] = decide_due([due("t", now, expiry=2 * DAY)], [], tight, CPH, now)
    assert v.until == local(2026, 3, 29, 3)
    [v] = decide_due([due("t", v.until, expiry=2 * DAY)], [], tight, CPH, v.until)
    assert v.until == local(2026, 3, 30, 2)
    # During the repeated hour (the second 02:30, CET) quiet hours to 07:00 still end at 07:00 CET.
    now = datetime(2026, 10, 25, 1, 30, tzinfo=UTC)
    [v] = decide_due([due("t", now)], [], NIGHTS, CPH, now)
    assert v.until == datetime(2026, 10, 25, 6, tzinfo=UTC)


def test_whose_quiet_hours_apply() -> None:
    now = local(2026, 5, 4, 23)
    own = QuietHours(time(23, 30), time(8))
    assert outcomes(decide_due([due("t", now, quiet_hours=own)], [], NIGHTS, CPH, now)) == [
        ("t", "handed_to_delivery")
    ]
    [v] = decide_due([due("t", now, quiet_hours=QuietHours(time(20), time(9)))], [], TenantPolicy(), CPH, now)
    assert v.until == local(2026, 5, 5, 9)
    assert outcomes(decide_due([due("t", now, ignore_quiet_hours=True)], [], NIGHTS, CPH, now)) == [
        ("t", "handed_to_delivery")
    ]
    receipt = due("r", now, purpose="transactional")
    assert outcomes(decide_due([receipt], [], NIGHTS, CPH, now)) == [("r", "handed_to_delivery")]
    including = TenantPolicy(quiet_hours=NIGHTS.quiet_hours, quiet_hours_include_transactional=True)
    assert outcomes(decide_due([receipt], [], including, CPH, now)) == [("r", "deferred")]
    # In the person's zone: 23:00 in Copenhagen is 14:00 in Los Angeles.
    assert outcomes(decide_due([due("t", now)], [], NIGHTS, ZoneInfo("America/Los_Angeles"), now)) == [
        ("t", "handed_to_delivery")
    ]


def test_a_quiet_hours_deferral_takes_no_place_under_a_cap() -> None:
    now = local(2026, 5, 4, 23)
    policy = TenantPolicy(caps=(FrequencyCap(ALL_CHANNELS, 1),), quiet_hours=NIGHTS.quiet_hours)
    verdicts = decide_due(
        [due("night", now, priority=9), due("any", now, ignore_quiet_hours=True)], [], policy, CPH, now
    )
    assert outcomes(verdicts) == [("night", "deferred"), ("any", "handed_to_delivery")]


# ---- expiry, consent, re-entry, and their order --------------------------------------------------


def test_expiry_counts_from_first_due_and_a_late_message_is_never_sent() -> None:
    first = NOON - timedelta(hours=24)
    [on_time] = decide_due([due("t", first_due_at=first)], [], TenantPolicy(), CPH, NOON)
    assert on_time.outcome == "handed_to_delivery"
    [late] = decide_due([due("t", first_due_at=first)], [], TenantPolicy(), CPH, NOON + timedelta(seconds=1))
    assert (late.outcome, late.reason_code) == ("expired", "expired")
    assert (
        late.reason == "its expiry passed at 2026-05-04T10:00:00+00:00 (first due 2026-05-03T10:00:00+00:00)"
    )
    own = decide_due([due("t", first_due_at=first, expiry=timedelta(days=2))], [], TenantPolicy(), CPH, NOON)
    assert outcomes(own) == [("t", "handed_to_delivery")]
    short = TenantPolicy(default_expiry=timedelta(hours=1))
    assert outcomes(decide_due([due("t", first_due_at=first)], [], short, CPH, NOON)) == [("t", "expired")]


def test_known_refusals_of_marketing_consent_suppress() -> None:
    consents = {
        ("marketing", "email"): "denied",
        ("marketing", "sms"): "withdrawn",
        ("marketing", "web"): "granted",
    }
    verdicts = decide_due(
        [
            due("e"),
            due("s", channel="sms"),
            due("w", channel="web"),
            due("h", channel="webhook"),
            due("r", purpose="transactional"),
        ],
        [],
        TenantPolicy(),
        CPH,
        NOON,
        consents,
    )
    assert outcomes(verdicts) == [
        ("e", "suppressed"),
        ("s", "suppressed"),
        ("w", "handed_to_delivery"),
        ("h", "handed_to_delivery"),
        ("r", "handed_to_delivery"),
    ]
    assert (verdicts[0].reason_code, verdicts[0].reason) == (
        "no_consent",
        "marketing consent on email is denied",
    )


def test_reentry_once_ever() -> None:
    rule: dict[str, Any] = dict(reentry=Reentry(ONCE_EVER))
    [v] = decide_due([due("t", **rule)], [sent("t", NOON - 400 * DAY)], TenantPolicy(), CPH, NOON)
    assert (v.outcome, v.reason_code) == ("held_back", "reentry_once_ever")
    assert "2025-03-30" in v.reason
    assert outcomes(decide_due([due("t", **rule)], [sent("other", NOON)], TenantPolicy(), CPH, NOON)) == [
        ("t", "handed_to_delivery")
    ]
    # Two occurrences due together: the first goes, the second is held back.
    twice = [due("t", occurrence="b", **rule), due("t", occurrence="a", **rule)]
    assert [(v.message.occurrence, v.outcome) for v in decide_due(twice, [], TenantPolicy(), CPH, NOON)] == [
        ("b", "held_back"),
        ("a", "handed_to_delivery"),
    ]


def test_reentry_once_per_period_and_minimum_interval() -> None:
    month: dict[str, Any] = dict(reentry=Reentry(ONCE_PER_PERIOD, 30 * DAY))
    for ago, outcome in (
        (29 * DAY, "held_back"),
        (30 * DAY, "handed_to_delivery"),
        (31 * DAY, "handed_to_delivery"),
    ):
        [v] = decide_due([due("t", **month)], [sent("t", NOON - ago)], TenantPolicy(), CPH, NOON)
        assert v.outcome == outcome, ago
    [v] = decide_due([due("t", **month)], [sent("t", NOON - DAY)], TenantPolicy(), CPH, NOON)
    assert (v.reason_code, v.reason) == (
        "reentry_once_per_period",
        "once per 30 days: last sent at 2026-05-03T10:00:00+00:00",
    )

    hourly: dict[str, Any] = dict(reentry=Reentry(EVERY_TIME, timedelta(hours=1)))
    [v] = decide_due(
        [due("t", **hourly)], [sent("t", NOON - timedelta(minutes=30))], TenantPolicy(), CPH, NOON
    )
    assert (v.outcome, v.reason_code) == ("held_back", "reentry_min_interval")
    assert "at least 1 hour apart" in v.reason
    free: dict[str, Any] = dict(reentry=Reentry(EVERY_TIME))
    assert outcomes(decide_due([due("t", **free)], [sent("t", NOON)], TenantPolicy(), CPH, NOON)) == [
        ("t", "handed_to_delivery")
    ]


def test_the_first_step_that_stops_a_message_names_it() -> None:
    policy = TenantPolicy(caps=(FrequencyCap(ALL_CHANNELS, 1),), quiet_hours=NIGHTS.quiet_hours)
    now = local(2026, 5, 4, 23)
    history = [sent("t", now - timedelta(hours=1))]
    consents = {("marketing", "email"): "denied"}
    stale = now - timedelta(days=2)
    once = Reentry(ONCE_EVER)
    cases = [
        (due("t", now, first_due_at=stale, reentry=once), consents, "expired"),
        (due("t", now, reentry=once), consents, "no_consent"),
        (due("t", now, reentry=once), {}, "reentry_once_ever"),
        (due("t", now), {}, "quiet_hours"),
        (due("t", now, ignore_quiet_hours=True), {}, "cap"),
    ]
    for message, given_consents, code in cases:
        [v] = decide_due([message], history, policy, CPH, now, given_consents)
        assert v.reason_code == code


# ---- the person's zone and the history needed ------------------------------------------------


def test_person_zone_is_the_trait_if_valid_else_the_tenant_default() -> None:
    policy = TenantPolicy(default_time_zone="Europe/Copenhagen", time_zone_trait="tz")
    assert person_zone({"tz": "Australia/Sydney"}, policy) == ZoneInfo("Australia/Sydney")
    for traits in (
        {},
        {"tz": "Mars/Olympus"},
        {"tz": 7},
        {"tz": ""},
        {"tz": "../etc/passwd"},
        {"time_zone": "UTC"},
    ):
        assert person_zone(traits, policy) == CPH, traits


def test_history_horizon_is_the_longest_window_or_all() -> None:
    policy = TenantPolicy(caps=(FrequencyCap("email", 3), FrequencyCap(ALL_CHANNELS, 6, timedelta(days=7))))
    assert history_horizon(TenantPolicy(), []) == timedelta(0)
    assert history_horizon(TenantPolicy(caps=(FrequencyCap("email", 3),)), []) == CALENDAR_DAY_HORIZON
    assert history_horizon(policy, [TriggerPolicy()]) == timedelta(days=7)
    month = TriggerPolicy(reentry=Reentry(ONCE_PER_PERIOD, 30 * DAY))
    assert history_horizon(policy, [TriggerPolicy(), month]) == 30 * DAY
    assert history_horizon(policy, [month, TriggerPolicy(reentry=Reentry(ONCE_EVER))]) is None


# ---- stored JSON ------------------------------------------------------------------------------

durations = st.timedeltas(min_value=timedelta(microseconds=1), max_value=timedelta(days=365))
quiet_hours = st.none() | st.builds(
    QuietHours,
    st.times().map(lambda t: t.replace(second=0, microsecond=0)),
    st.times().map(lambda t: t.replace(second=0, microsecond=0)),
)
trigger_policies = st.builds(
    TriggerPolicy,
    priority=st.integers(-1000, 1000),
    reentry=st.builds(Reentry, st.sampled_from((ONCE_EVER, ONCE_PER_PERIOD, EVERY_TIME)), durations),
    capped_action=st.sampled_from((DEFER, DROP)),
    expiry=st.none() | durations,
    quiet_hours=quiet_hours,
    ignore_quiet_hours=st.booleans(),
)
tenant_policies = st.builds(
    TenantPolicy,
    caps=st.lists(
        st.builds(
            FrequencyCap,
            st.sampled_from((ALL_CHANNELS, *CHANNELS)),
            st.integers(1, 1000),
            st.none() | durations,
        ),
        max_size=20,
    ).map(tuple),
    quiet_hours=quiet_hours,
    quiet_hours_include_transactional=st.booleans(),
    default_time_zone=st.sampled_from(("UTC", "Europe/Copenhagen", "America/Los_Angeles")),
    time_zone_trait=st.sampled_from(("time_zone", "tz")),
    default_expiry=durations,
    late_event_window=durations,
    updated_at=st.none() | st.datetimes(timezones=st.just(UTC)),
)


@given(tenant_policies)
def test_tenant_policy_json_round_trips(policy: TenantPolicy) -> None:
    back = tenant_policy_from_json(json.loads(json.dumps(tenant_policy_to_json(policy))))
    assert back == policy
    assert back.updated_at == policy.updated_at


@given(trigger_policies)
def test_trigger_policy_json_round_trips(policy: TriggerPolicy) -> None:
    assert trigger_policy_from_json(json.loads(json.dumps(trigger_policy_to_json(policy)))) == policy


def test_policy_json_is_readable_text_and_missing_keys_take_the_defaults() -> None:
    policy = TenantPolicy(
        caps=(FrequencyCap("email", 3), FrequencyCap(ALL_CHANNELS, 6, timedelta(days=7))),
        quiet_hours=QuietHours(time(22), time(7)),
        default_expiry=timedelta(hours=6, microseconds=500),
    )
    data = tenant_policy_to_json(policy)
    assert data["caps"] == [
        {"channel": "email", "max_messages": 3, "calendar_day": True},
        {"channel": "", "max_messages": 6, "rolling": "604800s"},
    ]
    assert data["quiet_hours"] == {"start": "22:00", "end": "07:00"}
    assert data["default_expiry"] == "21600.0005s"
    assert tenant_policy_from_json({}) == TenantPolicy()
    assert trigger_policy_from_json(None) == trigger_policy_from_json({}) == TriggerPolicy()


@given(
    history=st.lists(st.tuples(st.sampled_from(CHANNELS[:2]), st.integers(0, 10 * 24 * 60)), max_size=15),
    due_channels=st.lists(st.sampled_from(CHANNELS[:2]), min_size=1, max_size=8),
)
def test_no_cap_of_any_window_or_channel_is_pushed_over_its_maximum(
    history: list[tuple[str, int]], due_channels: list[str]
) -> None:
    policy = TenantPolicy(
        caps=(
            FrequencyCap("email", 2),
            FrequencyCap("sms", 1),
            FrequencyCap(ALL_CHANNELS, 4, rolling=timedelta(days=7)),
            FrequencyCap(ALL_CHANNELS, 2, rolling=timedelta(hours=20)),
        )
    )
    sends = [sent("old", NOON - timedelta(minutes=m), channel=c) for c, m in history]
    messages = [due(f"t{i}", channel=c, expiry=timedelta(days=30)) for i, c in enumerate(due_channels)]
    verdicts = decide_due(messages, sends, policy, CPH, NOON)
    handed = [
        sent(v.message.trigger_id, NOON, v.message.channel)
        for v in verdicts
        if v.outcome == "handed_to_delivery"
    ]
    today = NOON.astimezone(CPH).date()
    for cap in policy.caps:

        def counted(s: Sent, cap: FrequencyCap = cap) -> bool:
            in_window = (
                s.at.astimezone(CPH).date() == today if cap.rolling is None else s.at > NOON - cap.rolling
            )
            return cap.applies_to(s.channel) and in_window

        before = sum(map(counted, sends))
        assert sum(map(counted, handed)) <= max(0, cap.max_messages - before)
    for v in verdicts:
        assert v.outcome in ("handed_to_delivery", "capped")
        if v.outcome == "capped":
            assert v.until is not None and v.until > NOON


@given(
    now=st.datetimes(datetime(2026, 1, 1), datetime(2027, 12, 31), timezones=st.just(UTC)),
    tz=st.sampled_from([CPH, ZoneInfo("America/Los_Angeles"), ZoneInfo("Australia/Sydney")]),
    hours=st.sampled_from(
        [QuietHours(time(22), time(7)), QuietHours(time(1), time(3)), QuietHours(time(4), time(2, 30))]
    ),
)
def test_quiet_hours_defer_to_their_next_end_in_any_season(
    now: datetime, tz: ZoneInfo, hours: QuietHours
) -> None:
    [v] = decide_due([due("t", now, expiry=timedelta(days=2))], [], TenantPolicy(quiet_hours=hours), tz, now)
    inside = hours.contains(now.astimezone(tz).time())
    assert v.outcome == ("deferred" if inside else "handed_to_delivery")
    if v.until is not None:
        assert now < v.until <= now + timedelta(hours=25)
        # At the end itself the message goes; the end is the local end time (or, on the night
        # clocks skip it, the same time read with the offset before the change).
        assert not hours.contains(v.until.astimezone(tz).time())
        [after] = decide_due([due("t", v.until)], [], TenantPolicy(quiet_hours=hours), tz, v.until)
        assert after.outcome == "handed_to_delivery"
