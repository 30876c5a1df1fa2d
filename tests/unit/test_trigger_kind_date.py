"""The date kind: offset from a date trait or yearly, at a local time in the person's zone."""

from __future__ import annotations

import json
from datetime import UTC, date, datetime, time, timedelta
from typing import Any

import pytest

from relevans.kit.errors import InvalidArgument
from services.trigger.domain import (
    CancelTimers,
    Context,
    FiredTimer,
    RawTrigger,
    ScheduleTimer,
    TraitChange,
    TriggerDef,
    validate_trigger,
)
from services.trigger.domain.kinds.date import DATE, DateState, RawDate, anniversary, trait_date

NOW = datetime(2026, 3, 1, 12, tzinfo=UTC)
CTX = Context(now=NOW, default_time_zone="Europe/Copenhagen")


def trigger(raw: RawDate) -> TriggerDef:
    return validate_trigger(
        RawTrigger(trigger_id="d", condition=raw, channel="email", purpose="marketing", template_id="t")
    )


BIRTHDAY = trigger(RawDate("birthday", 0, True, "10:00"))
RENEWAL = trigger(RawDate("renewal_date", -7, False, "09:30"))


def change(traits: dict[str, Any], name: str = "birthday", at: datetime = NOW) -> TraitChange:
    return TraitChange("shop", "p1", "ch1", name, None, traits.get(name), traits, at)


def schedule(d: Any) -> ScheduleTimer:
    (s,) = d.intents
    assert isinstance(s, ScheduleTimer)
    return s


@pytest.mark.parametrize(
    ("zone", "due"),
    [
        ("Europe/Copenhagen", datetime(2026, 3, 14, 9, tzinfo=UTC)),
        ("America/Los_Angeles", datetime(2026, 3, 14, 17, tzinfo=UTC)),  # PDT from 8 March
        ("Australia/Sydney", datetime(2026, 3, 13, 23, tzinfo=UTC)),  # AEDT
    ],
)
def test_a_birthday_is_at_ten_local_in_each_persons_zone(zone: str, due: datetime) -> None:
    s = schedule(DATE.decide(BIRTHDAY, change({"birthday": "1990-03-14", "time_zone": zone}), None, CTX))
    assert (s.occurrence, s.due_at, s.supersede, s.move) == ("2026-03-14", due, True, True)
    assert s.variables == {
        "date": "1990-03-14",
        "target_date": "2026-03-14",
        "time_zone": zone,
        "trait": "birthday",
    }


def test_without_a_valid_zone_the_tenant_default_applies() -> None:
    s = schedule(
        DATE.decide(BIRTHDAY, change({"birthday": "1990-03-14", "time_zone": "Mars/Olympus"}), None, CTX)
    )
    assert (
        s.due_at == datetime(2026, 3, 14, 9, tzinfo=UTC) and s.variables["time_zone"] == "Europe/Copenhagen"
    )


def test_a_birthday_already_past_this_year_is_next_year() -> None:
    assert (
        schedule(DATE.decide(BIRTHDAY, change({"birthday": "1990-01-14"}), None, CTX)).occurrence
        == "2027-01-14"
    )


def test_29_february_is_28_february_in_a_year_without_one() -> None:
    assert anniversary(date(2000, 2, 29), 2027) == date(2027, 2, 28)
    assert anniversary(date(2000, 2, 29), 2028) == date(2028, 2, 29)
    assert (
        schedule(DATE.decide(BIRTHDAY, change({"birthday": "2000-02-29"}), None, CTX)).occurrence
        == "2027-02-28"
    )


def test_a_renewal_a_week_before_on_the_night_clocks_change_is_at_its_local_time() -> None:
    # Europe/Copenhagen moves from +01:00 to +02:00 on 29 March 2026.
    s = schedule(
        DATE.decide(RENEWAL, change({"renewal_date": "2026-04-05T00:00:00+02:00"}, "renewal_date"), None, CTX)
    )
    assert (s.occurrence, s.due_at) == ("2026-03-29", datetime(2026, 3, 29, 7, 30, tzinfo=UTC))


def test_a_one_off_date_passed_schedules_nothing_and_says_so() -> None:
    d = DATE.decide(RENEWAL, change({"renewal_date": "2026-03-01"}, "renewal_date"), None, CTX)
    assert [type(i) for i in d.intents] == [CancelTimers]
    assert [(n.outcome, n.reason_code) for n in d.notes] == [("not_fired", "date_passed")]


def test_a_removed_or_unparseable_date_cancels_the_pending_timer() -> None:
    state = DATE.decide(BIRTHDAY, change({"birthday": "1990-03-14"}), None, CTX).state
    d = DATE.decide(BIRTHDAY, change({}, at=NOW + timedelta(hours=1)), state, CTX)
    assert d.intents == (
        CancelTimers("shop", "d", "p1", NOW + timedelta(hours=1), "the trait birthday has no value"),
    )
    assert [(n.outcome, n.reason_code, n.occurrence) for n in d.notes] == [
        ("cancelled", "date_removed", "2026-03-14")
    ]
    d = DATE.decide(BIRTHDAY, change({"birthday": "soon"}), None, CTX)
    assert [(n.outcome, n.reason_code) for n in d.notes] == [("not_fired", "date_invalid")]


def test_a_moved_date_supersedes_the_pending_one_and_an_older_change_is_ignored() -> None:
    state = DATE.decide(BIRTHDAY, change({"birthday": "1990-03-14"}), None, CTX).state
    d = DATE.decide(BIRTHDAY, change({"birthday": "1990-03-20"}, at=NOW + timedelta(hours=1)), state, CTX)
    assert schedule(d).occurrence == "2026-03-20"
    assert [(n.outcome, n.reason_code) for n in d.notes] == [
        ("cancelled", "date_moved"),
        ("fired", "date_scheduled"),
    ]
    assert (
        DATE.decide(
            BIRTHDAY, change({"birthday": "1990-05-01"}, at=NOW - timedelta(hours=1)), d.state, CTX
        ).intents
        == ()
    )


def test_a_time_zone_change_moves_the_same_dates_timer() -> None:
    state = DATE.decide(BIRTHDAY, change({"birthday": "1990-03-14"}), None, CTX).state
    moved = change(
        {"birthday": "1990-03-14", "time_zone": "America/Los_Angeles"}, "time_zone", NOW + timedelta(hours=1)
    )
    d = DATE.decide(BIRTHDAY, moved, state, CTX)
    assert (schedule(d).occurrence, schedule(d).due_at, schedule(d).move) == (
        "2026-03-14",
        datetime(2026, 3, 14, 17, tzinfo=UTC),
        True,
    )
    assert DATE.routes(BIRTHDAY.condition, CTX) == {"trait:birthday", "trait:time_zone"}


def test_after_a_yearly_firing_the_next_year_is_scheduled() -> None:
    s = schedule(
        DATE.decide(BIRTHDAY, change({"birthday": "2000-02-29", "time_zone": "Australia/Sydney"}), None, CTX)
    )
    fired = FiredTimer("shop", "d", "p1", s.occurrence, s.due_at, s.variables)
    after = DATE.after_fire(BIRTHDAY, fired, Context(now=s.due_at + timedelta(minutes=1)))
    assert after is not None
    assert (after.occurrence, after.due_at) == ("2028-02-29", datetime(2028, 2, 28, 23, tzinfo=UTC))
    assert DATE.after_fire(RENEWAL, fired, CTX) is None


def test_trait_dates() -> None:
    assert trait_date("2026-04-05") == date(2026, 4, 5)
    assert trait_date("2026-04-05T23:30:00-08:00") == date(2026, 4, 5)
    assert trait_date("2026-04-05T23:30:00Z") == date(2026, 4, 5)
    for bad in ("2026-04-05T23:30:00", "2026-13-01", 20260405, None, "x" * 50):
        assert trait_date(bad) is None


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        (RawDate("", 0, False, "10:00"), {"trigger.date.date_trait"}),
        (RawDate("bad name", 0, False, "10:00"), {"trigger.date.date_trait"}),
        (RawDate("b", 366, False, "10:00"), {"trigger.date.offset_days"}),
        (RawDate("b", -366, False, "10:00"), {"trigger.date.offset_days"}),
        (RawDate("b", 0, False, ""), {"trigger.date.local_time"}),
        (RawDate("b", 0, False, "24:00"), {"trigger.date.local_time"}),
        (RawDate("b", 0, False, "9:00"), {"trigger.date.local_time"}),
        (RawDate("b", 0, False, "09:00\n"), {"trigger.date.local_time"}),
    ],
)
def test_validation_names_the_field(raw: RawDate, expected: set[str]) -> None:
    with pytest.raises(InvalidArgument) as caught:
        trigger(raw)
    assert {v.field for v in caught.value.violations} == expected


def test_state_round_trips_and_merges_keep_the_survivors() -> None:
    for state in (DateState(NOW, "2026-03-14", NOW + timedelta(days=13)), DateState(NOW)):
        assert DATE.state_from_json(json.loads(json.dumps(DATE.state_to_json(state)))) == state
    a, b = DateState(NOW), DateState(NOW + timedelta(hours=1))
    assert DATE.plan_merge({"d": a}, {"d": b, "e": b}, [], merged_profile_id="x").states == {"d": a, "e": b}
    assert BIRTHDAY.condition.local_time == time(10, 0)  # type: ignore[attr-defined]
