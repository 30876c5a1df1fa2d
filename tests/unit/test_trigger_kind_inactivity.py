"""The inactivity kind: each event moves the deadline; one message per lapse."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta

import pytest

from relevans.kit.errors import InvalidArgument
from services.trigger.domain import (
    Context,
    EventFacts,
    PendingTimer,
    RawTrigger,
    RetireTimer,
    ScheduleTimer,
    TriggerDef,
    validate_trigger,
)
from services.trigger.domain.kinds.common import INVALID_DURATION
from services.trigger.domain.kinds.inactivity import INACTIVITY, InactivityState, RawInactivity

T0 = datetime(2026, 5, 1, 7, tzinfo=UTC)
DAYS14 = timedelta(days=14)


def trigger(raw: RawInactivity) -> TriggerDef:
    return validate_trigger(
        RawTrigger(trigger_id="gym", condition=raw, channel="sms", purpose="marketing", template_id="t")
    )


GYM = trigger(RawInactivity(("gym_check_in",), DAYS14))


def check_in(day: float, event_id: str) -> EventFacts:
    return EventFacts("gym", event_id, "p1", "gym_check_in", T0 + timedelta(days=day), {})


def decide(e: EventFacts, state: InactivityState | None, now: datetime | None = None):  # type: ignore[no-untyped-def]
    return INACTIVITY.decide(GYM, e, state, Context(now=now or e.occurred_at))


def test_the_first_event_sets_a_deadline_and_begins_a_lapse() -> None:
    d = decide(check_in(0, "c0"), None)
    (s,) = d.intents
    assert isinstance(s, ScheduleTimer)
    assert (s.occurrence, s.started_at, s.due_at, s.move) == ("c0", T0, T0 + DAYS14, True)
    assert d.state == InactivityState(T0, "c0")
    assert [(n.outcome, n.reason_code, n.until) for n in d.notes] == [("fired", "deadline_set", T0 + DAYS14)]


def test_an_event_on_day_13_moves_the_deadline_of_the_same_lapse() -> None:
    state = decide(check_in(0, "c0"), None).state
    d = decide(check_in(13, "c13"), state)
    (s,) = d.intents
    assert (s.occurrence, s.due_at, s.move) == ("c0", T0 + timedelta(days=27), True)
    assert d.state == InactivityState(T0 + timedelta(days=13), "c0")
    assert d.notes == ()


def test_after_a_lapse_the_next_event_begins_a_new_one_and_no_second_message_before_it() -> None:
    state = decide(check_in(0, "c0"), None).state
    d = decide(check_in(14, "c14"), state)  # the deadline of c0 has come: c0's message is due
    assert [i.occurrence for i in d.intents] == ["c14"]
    assert d.state == InactivityState(T0 + timedelta(days=14), "c14")


def test_an_older_or_redelivered_event_changes_nothing() -> None:
    state = InactivityState(T0 + timedelta(days=5), "c0")
    assert decide(check_in(3, "old"), state).intents == ()
    assert decide(check_in(5, "same"), state).state is None


def test_a_late_event_moves_the_state_but_schedules_nothing_once_its_deadline_passed() -> None:
    now = T0 + timedelta(days=20)
    d = decide(check_in(0, "c0"), None, now)
    assert d.intents == () and d.state == InactivityState(T0, "c0")
    assert [n.reason_code for n in d.notes] == ["late_event"]
    # Late, but its deadline is ahead: it moves it.
    d = decide(check_in(10, "c10"), InactivityState(T0, "c0"), now)
    assert [i.due_at for i in d.intents] == [T0 + timedelta(days=24)]


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        (RawInactivity((), DAYS14), {"trigger.inactivity.event_types"}),
        (RawInactivity(("a", "a"), DAYS14), {"trigger.inactivity.event_types[1]"}),
        (RawInactivity(("ok", "Bad"), DAYS14), {"trigger.inactivity.event_types[1]"}),
        (RawInactivity(("a",), None), {"trigger.inactivity.duration"}),
        (RawInactivity(("a",), INVALID_DURATION), {"trigger.inactivity.duration"}),
        (RawInactivity(("a",), timedelta(days=400)), {"trigger.inactivity.duration"}),
    ],
)
def test_validation_names_the_field(raw: RawInactivity, expected: set[str]) -> None:
    with pytest.raises(InvalidArgument) as caught:
        trigger(raw)
    assert {v.field for v in caught.value.violations} == expected


def test_routes_and_state_round_trip() -> None:
    two = trigger(RawInactivity(("gym_check_in", "class_booked"), DAYS14))
    assert INACTIVITY.routes(two.condition, Context(now=T0)) == {"event:gym_check_in", "event:class_booked"}
    state = InactivityState(T0, "c0")
    assert INACTIVITY.state_from_json(json.loads(json.dumps(INACTIVITY.state_to_json(state)))) == state


def test_a_merge_keeps_the_latest_activity_and_its_lapse() -> None:
    a, b = InactivityState(T0, "a1"), InactivityState(T0 + timedelta(days=4), "b1")
    plan = INACTIVITY.plan_merge(
        {"gym": a},
        {"gym": b},
        [PendingTimer("gym", "a1", T0), PendingTimer("gym", "b1", b.last_at)],
        merged_profile_id="anon",
    )
    assert plan.states == {"gym": b}
    assert plan.retire == [RetireTimer("gym", "a1", "superseded", "superseded by b1 on merge of anon")]
