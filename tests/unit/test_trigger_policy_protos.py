"""Policy and TriggerPolicy messages <-> the domain: every rule named by its field path, and round
trips that lose nothing."""

from __future__ import annotations

from datetime import UTC, datetime, time, timedelta
from typing import Any

import pytest
from google.protobuf import duration_pb2
from hypothesis import given
from hypothesis import strategies as st

from relevans.common.v1 import common_pb2
from relevans.kit.errors import InvalidArgument, Violations
from relevans.kit.proto import checked_duration
from relevans.trigger.v1 import trigger_pb2 as pb
from services.trigger.domain.policies import (
    ALL_CHANNELS,
    CHANNELS,
    DEFER,
    DROP,
    EVERY_TIME,
    ONCE_EVER,
    ONCE_PER_PERIOD,
    FrequencyCap,
    QuietHours,
    Reentry,
    TenantPolicy,
    TriggerPolicy,
)
from services.trigger.policy_protos import (
    policy_message,
    raw_trigger_policy,
    tenant_policy,
    trigger_policy,
    trigger_policy_message,
)

DAY = 86_400
# Enum numbers a newer client might send (typed Any: each generated enum types its own numbers).
NINE: Any = 9
EIGHT: Any = 8
NINETY_NINE: Any = 99


def seconds(n: int, nanos: int = 0) -> duration_pb2.Duration:
    return duration_pb2.Duration(seconds=n, nanos=nanos)


def violations_of_policy(**fields: Any) -> dict[str, str]:
    with pytest.raises(InvalidArgument) as e:
        tenant_policy(pb.Policy(**fields))
    return {v.field: v.description for v in e.value.violations}


def violations_of_trigger_policy(**fields: Any) -> dict[str, str]:
    v = Violations()
    assert trigger_policy(pb.TriggerPolicy(**fields), v) is None
    return {x.field: x.description for x in v.items}


# ---- SetPolicy -------------------------------------------------------------------------------


def test_an_empty_policy_is_the_defaults() -> None:
    assert tenant_policy(pb.Policy()) == TenantPolicy()
    out = policy_message(TenantPolicy())
    assert (out.default_time_zone, out.time_zone_trait) == ("UTC", "time_zone")
    assert out.default_expiry.ToTimedelta() == out.late_event_window.ToTimedelta() == timedelta(hours=24)
    assert not out.HasField("quiet_hours") and not out.HasField("update_time")


def test_a_full_policy_reads_as_the_domain_policy() -> None:
    msg = pb.Policy(
        caps=[
            pb.FrequencyCap(channel=common_pb2.CHANNEL_EMAIL, max_messages=3, calendar_day=True),
            pb.FrequencyCap(max_messages=6, rolling=seconds(7 * DAY)),
        ],
        quiet_hours=pb.QuietHours(start="22:00", end="07:00"),
        quiet_hours_include_transactional=True,
        default_time_zone="Europe/Copenhagen",
        time_zone_trait="tz",
        default_expiry=seconds(6 * 3600),
        late_event_window=seconds(3600),
    )
    assert tenant_policy(msg) == TenantPolicy(
        caps=(FrequencyCap("email", 3), FrequencyCap(ALL_CHANNELS, 6, timedelta(days=7))),
        quiet_hours=QuietHours(time(22), time(7)),
        quiet_hours_include_transactional=True,
        default_time_zone="Europe/Copenhagen",
        time_zone_trait="tz",
        default_expiry=timedelta(hours=6),
        late_event_window=timedelta(hours=1),
    )
    assert policy_message(tenant_policy(msg)) == msg


@pytest.mark.parametrize(
    ("fields", "path", "problem"),
    [
        (
            {"caps": [pb.FrequencyCap(max_messages=0, calendar_day=True)]},
            "policy.caps[0].max_messages",
            "must be at least 1",
        ),
        (
            {"caps": [pb.FrequencyCap(max_messages=-3, calendar_day=True)]},
            "policy.caps[0].max_messages",
            "must be at least 1",
        ),
        (
            {"caps": [pb.FrequencyCap(max_messages=1001, calendar_day=True)]},
            "policy.caps[0].max_messages",
            "at most 1000",
        ),
        ({"caps": [pb.FrequencyCap(max_messages=1)]}, "policy.caps[0].calendar_day", "a window is required"),
        (
            {"caps": [pb.FrequencyCap(max_messages=1, calendar_day=False)]},
            "policy.caps[0].calendar_day",
            "a window is required",
        ),
        (
            {
                "caps": [
                    pb.FrequencyCap(max_messages=1, calendar_day=True),
                    pb.FrequencyCap(max_messages=1, rolling=seconds(0)),
                ]
            },
            "policy.caps[1].rolling",
            "must be positive",
        ),
        (
            {"caps": [pb.FrequencyCap(max_messages=1, rolling=seconds(-60))]},
            "policy.caps[0].rolling",
            "must be positive",
        ),
        (
            {"caps": [pb.FrequencyCap(max_messages=1, rolling=seconds(366 * DAY))]},
            "policy.caps[0].rolling",
            "at most 365 days",
        ),
        (
            {"caps": [pb.FrequencyCap(max_messages=1, rolling=seconds(1, -5))]},
            "policy.caps[0].rolling",
            "is not a valid duration",
        ),
        (
            {"caps": [pb.FrequencyCap(channel=NINETY_NINE, max_messages=1, calendar_day=True)]},
            "policy.caps[0].channel",
            "'99' is not a channel",
        ),
        (
            {"quiet_hours": pb.QuietHours(start="22:00", end="22:00")},
            "policy.quiet_hours.end",
            "start and end at the same minute",
        ),
        ({"quiet_hours": pb.QuietHours(start="24:00", end="07:00")}, "policy.quiet_hours.start", '"HH:MM"'),
        ({"quiet_hours": pb.QuietHours(start="7:00", end="22:00")}, "policy.quiet_hours.start", '"HH:MM"'),
        ({"quiet_hours": pb.QuietHours(start="22:00", end="07:60")}, "policy.quiet_hours.end", '"HH:MM"'),
        ({"quiet_hours": pb.QuietHours(start="22:00", end="07:00:00")}, "policy.quiet_hours.end", '"HH:MM"'),
        (
            {"quiet_hours": pb.QuietHours(start="22:00")},
            "policy.quiet_hours.end",
            "both start and end, or neither",
        ),
        (
            {"quiet_hours": pb.QuietHours(end="07:00")},
            "policy.quiet_hours.start",
            "both start and end, or neither",
        ),
        (
            {"default_time_zone": "Mars/Olympus"},
            "policy.default_time_zone",
            "'Mars/Olympus' is not an IANA time zone",
        ),
        ({"default_time_zone": " UTC"}, "policy.default_time_zone", "is not an IANA time zone"),
        ({"time_zone_trait": "time zone"}, "policy.time_zone_trait", "must be a trait name"),
        ({"time_zone_trait": "x" * 65}, "policy.time_zone_trait", "must be a trait name"),
        ({"default_expiry": seconds(0)}, "policy.default_expiry", "must be positive"),
        ({"default_expiry": seconds(366 * DAY)}, "policy.default_expiry", "at most 365 days"),
        ({"late_event_window": seconds(-1)}, "policy.late_event_window", "must be positive"),
        (
            {"late_event_window": seconds(0, 1_000_000_000)},
            "policy.late_event_window",
            "is not a valid duration",
        ),
    ],
)
def test_each_rule_of_a_policy_is_named_by_its_path(fields: dict[str, Any], path: str, problem: str) -> None:
    found = violations_of_policy(**fields)
    assert list(found) == [path]
    assert problem in found[path]


def test_every_problem_is_reported_at_once_and_more_than_20_caps_are_refused_before_reading_them() -> None:
    found = violations_of_policy(
        caps=[pb.FrequencyCap(max_messages=0)],
        quiet_hours=pb.QuietHours(start="1", end="2"),
        default_time_zone="Nowhere",
    )
    assert set(found) == {
        "policy.caps[0].max_messages",
        "policy.caps[0].calendar_day",
        "policy.quiet_hours.start",
        "policy.quiet_hours.end",
        "policy.default_time_zone",
    }
    assert violations_of_policy(caps=[pb.FrequencyCap()] * 21) == {"policy.caps": "at most 20 items, got 21"}
    assert (
        len(tenant_policy(pb.Policy(caps=[pb.FrequencyCap(max_messages=1, calendar_day=True)] * 20)).caps)
        == 20
    )


def test_an_empty_quiet_hours_message_is_no_quiet_hours() -> None:
    assert tenant_policy(pb.Policy(quiet_hours=pb.QuietHours())).quiet_hours is None


# ---- a trigger's policy ---------------------------------------------------------------------------


def test_an_unset_or_empty_trigger_policy_is_the_defaults() -> None:
    v = Violations()
    assert trigger_policy(None, v) == trigger_policy(pb.TriggerPolicy(), v) == TriggerPolicy()
    assert trigger_policy(pb.TriggerPolicy(reentry=pb.ReentryRule()), v) == TriggerPolicy()
    assert not v


def test_a_full_trigger_policy_reads_as_the_domain_policy() -> None:
    msg = pb.TriggerPolicy(
        priority=-7,
        reentry=pb.ReentryRule(mode=pb.REENTRY_MODE_ONCE_PER_PERIOD, period=seconds(30 * DAY)),
        capped_action=pb.CAPPED_ACTION_DROP,
        expiry=seconds(6 * 3600),
        quiet_hours=pb.QuietHours(start="21:30", end="08:15"),
        ignore_quiet_hours=True,
    )
    domain = TriggerPolicy(
        priority=-7,
        reentry=Reentry(ONCE_PER_PERIOD, timedelta(days=30)),
        capped_action=DROP,
        expiry=timedelta(hours=6),
        quiet_hours=QuietHours(time(21, 30), time(8, 15)),
        ignore_quiet_hours=True,
    )
    assert trigger_policy(msg, Violations()) == domain
    assert trigger_policy_message(domain) == msg


def test_unspecified_enums_are_every_time_and_defer() -> None:
    p = trigger_policy(pb.TriggerPolicy(reentry=pb.ReentryRule(period=seconds(3600))), Violations())
    assert p == TriggerPolicy(reentry=Reentry(EVERY_TIME, timedelta(hours=1)), capped_action=DEFER)
    out = trigger_policy_message(TriggerPolicy())
    assert (out.reentry.mode, out.capped_action) == (pb.REENTRY_MODE_EVERY_TIME, pb.CAPPED_ACTION_DEFER)
    assert not out.reentry.HasField("period") and not out.HasField("expiry")


def test_raw_trigger_policy_is_what_validation_checks() -> None:
    raw = raw_trigger_policy(pb.TriggerPolicy(reentry=pb.ReentryRule(mode=NINE), capped_action=EIGHT))
    assert raw.reentry is not None
    assert (raw.reentry.mode, raw.capped_action) == ("9", "8")


@pytest.mark.parametrize(
    ("fields", "path", "problem"),
    [
        ({"priority": 1001}, "trigger.policy.priority", "between -1000 and 1000"),
        ({"priority": -1001}, "trigger.policy.priority", "between -1000 and 1000"),
        (
            {"reentry": pb.ReentryRule(mode=pb.REENTRY_MODE_ONCE_PER_PERIOD)},
            "trigger.policy.reentry.period",
            "is required",
        ),
        (
            {"reentry": pb.ReentryRule(mode=pb.REENTRY_MODE_ONCE_PER_PERIOD, period=seconds(0))},
            "trigger.policy.reentry.period",
            "must be positive",
        ),
        (
            {"reentry": pb.ReentryRule(mode=pb.REENTRY_MODE_ONCE_PER_PERIOD, period=seconds(-DAY))},
            "trigger.policy.reentry.period",
            "must not be negative",
        ),
        (
            {"reentry": pb.ReentryRule(mode=pb.REENTRY_MODE_EVERY_TIME, period=seconds(-1))},
            "trigger.policy.reentry.period",
            "must not be negative",
        ),
        (
            {"reentry": pb.ReentryRule(mode=pb.REENTRY_MODE_ONCE_PER_PERIOD, period=seconds(3661 * DAY))},
            "trigger.policy.reentry.period",
            "at most 3660 days",
        ),
        (
            {"reentry": pb.ReentryRule(period=seconds(-1, 5))},
            "trigger.policy.reentry.period",
            "is not a valid duration",
        ),
        (
            {"reentry": pb.ReentryRule(mode=pb.REENTRY_MODE_ONCE_EVER, period=seconds(60))},
            "trigger.policy.reentry.period",
            "must be unset for REENTRY_MODE_ONCE_EVER",
        ),
        ({"reentry": pb.ReentryRule(mode=NINE)}, "trigger.policy.reentry.mode", "'9' is not a re-entry mode"),
        ({"capped_action": EIGHT}, "trigger.policy.capped_action", "'8' is not a capped action"),
        ({"expiry": seconds(0)}, "trigger.policy.expiry", "must be positive"),
        ({"expiry": seconds(-5)}, "trigger.policy.expiry", "must be positive"),
        ({"expiry": seconds(365 * DAY + 1)}, "trigger.policy.expiry", "at most 365 days"),
        ({"expiry": seconds(10**14)}, "trigger.policy.expiry", "is not a valid duration"),
        (
            {"quiet_hours": pb.QuietHours(start="22:00", end="")},
            "trigger.policy.quiet_hours.end",
            "is required",
        ),
        (
            {"quiet_hours": pb.QuietHours(start="06:00", end="06:00")},
            "trigger.policy.quiet_hours.end",
            "same minute",
        ),
    ],
)
def test_each_rule_of_a_trigger_policy_is_named_by_its_path(
    fields: dict[str, Any], path: str, problem: str
) -> None:
    found = violations_of_trigger_policy(**fields)
    assert list(found) == [path]
    assert problem in found[path]


def test_a_trigger_policy_reports_under_the_prefix_given() -> None:
    v = Violations()
    trigger_policy(pb.TriggerPolicy(priority=5000, expiry=seconds(0)), v, "policy")
    assert [x.field for x in v.items] == ["policy.priority", "policy.expiry"]


def test_the_longest_periods_and_windows_are_accepted() -> None:
    p = trigger_policy(
        pb.TriggerPolicy(
            priority=1000,
            reentry=pb.ReentryRule(mode=pb.REENTRY_MODE_ONCE_PER_PERIOD, period=seconds(3660 * DAY)),
            expiry=seconds(365 * DAY),
            quiet_hours=pb.QuietHours(start="00:00", end="23:59"),
        ),
        Violations(),
    )
    assert p is not None and p.reentry.period == timedelta(days=3660)
    policy = tenant_policy(
        pb.Policy(
            caps=[pb.FrequencyCap(max_messages=1000, rolling=seconds(365 * DAY))],
            default_expiry=seconds(0, 1000),
        )
    )
    assert policy.default_expiry == timedelta(microseconds=1)


# ---- round trips and the duration check ---------------------------------------------------------

durations = st.timedeltas(min_value=timedelta(microseconds=1), max_value=timedelta(days=365))
minutes = st.times().map(lambda t: t.replace(second=0, microsecond=0))
quiet_hours = st.none() | st.builds(QuietHours, minutes, minutes).filter(lambda q: q.start != q.end)
reentries = st.one_of(
    st.just(Reentry(ONCE_EVER)),
    st.builds(
        Reentry, st.just(ONCE_PER_PERIOD), st.timedeltas(timedelta(microseconds=1), timedelta(days=3660))
    ),
    st.builds(Reentry, st.just(EVERY_TIME), st.timedeltas(timedelta(0), timedelta(days=3660))),
)


@given(
    st.builds(
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
        default_time_zone=st.sampled_from(("UTC", "Europe/Copenhagen", "Australia/Sydney")),
        time_zone_trait=st.sampled_from(("time_zone", "tz", "_Zone-1")),
        default_expiry=durations,
        late_event_window=durations,
        updated_at=st.none() | st.datetimes(timezones=st.just(UTC)),
    )
)
def test_a_tenant_policy_round_trips_through_its_message(policy: TenantPolicy) -> None:
    msg = policy_message(policy)
    assert tenant_policy(pb.Policy.FromString(msg.SerializeToString())) == policy
    if policy.updated_at is not None:
        assert msg.update_time.ToDatetime(tzinfo=UTC) == policy.updated_at


@given(
    st.builds(
        TriggerPolicy,
        priority=st.integers(-1000, 1000),
        reentry=reentries,
        capped_action=st.sampled_from((DEFER, DROP)),
        expiry=st.none() | durations,
        quiet_hours=quiet_hours,
        ignore_quiet_hours=st.booleans(),
    )
)
def test_a_trigger_policy_round_trips_through_its_message(policy: TriggerPolicy) -> None:
    v = Violations()
    assert (
        trigger_policy(pb.TriggerPolicy.FromString(trigger_policy_message(policy).SerializeToString()), v)
        == policy
    )
    assert not v


@given(st.integers(-(2**40), 2**40), st.integers(-(2**31), 2**31 - 1))
def test_checked_duration_takes_only_durations_protobuf_calls_valid(secs: int, nanos: int) -> None:
    value, bad = checked_duration(seconds(secs, nanos))
    valid = abs(nanos) < 1_000_000_000 and not (secs > 0 > nanos or nanos > 0 > secs)
    if not valid:
        assert (value, bad) == (None, True)
    elif not bad:
        assert value == timedelta(
            seconds=secs, microseconds=nanos // 1000 if nanos >= 0 else -(-nanos // 1000)
        )


def test_update_time_is_output_only() -> None:
    stamped = tenant_policy(
        pb.Policy(update_time=policy_message(TenantPolicy(updated_at=datetime.now(UTC))).update_time)
    )
    assert stamped.updated_at is None
