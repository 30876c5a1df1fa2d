"""The threshold kind: N matching events in a rolling window exact to the event time; a profile
value crossing from below."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta

import pytest

from relevans.conditions import ProfileView
from relevans.kit.errors import InvalidArgument
from services.trigger.domain import (
    Context,
    EventFacts,
    RawTrigger,
    ScheduleTimer,
    TriggerDef,
    validate_trigger,
)
from services.trigger.domain.kinds.threshold import (
    THRESHOLD,
    CountState,
    RawEventCount,
    RawProfileValue,
    RawThreshold,
    ValueState,
)

T0 = datetime(2026, 5, 1, 12, tzinfo=UTC)
WEEK = timedelta(days=7)
TOYS = {"compare": {"field": "event.category", "op": "eq", "value": "toys"}}


def trigger(raw: RawThreshold) -> TriggerDef:
    return validate_trigger(
        RawTrigger(trigger_id="toys", condition=raw, channel="email", purpose="marketing", template_id="t")
    )


ELEVEN = trigger(RawThreshold(event_count=RawEventCount("page_view", TOYS, 11, WEEK)))
SCORE = trigger(RawThreshold(profile_value=RawProfileValue("score", 100)))


def view(at: datetime, event_id: str, category: str = "toys", score: float = 0.0) -> EventFacts:
    return EventFacts(
        "shop", event_id, "p1", "page_view", at, {"category": category}, lambda: ProfileView(score=score)
    )


def run(t: TriggerDef, events: list[EventFacts], state: object = None, now: datetime | None = None):  # type: ignore[no-untyped-def]
    fired = []
    notes = []
    for e in events:
        d = THRESHOLD.decide(t, e, state, Context(now=now or e.occurred_at))
        fired += [i.occurrence for i in d.intents if isinstance(i, ScheduleTimer)]
        notes += d.notes
        state = d.state if d.state is not None else state
    return fired, notes, state


def test_ten_views_in_seven_days_fire_nothing_and_the_eleventh_fires() -> None:
    views = [view(T0 + timedelta(hours=15 * i), f"v{i}") for i in range(11)]
    fired, notes, state = run(ELEVEN, views[:10])
    assert fired == []
    assert {n.reason_code for n in notes} == {"condition_false"}
    fired, notes, state = run(ELEVEN, views[10:], state)
    assert fired == ["v10"]
    assert [(n.outcome, n.reason_code) for n in notes] == [("fired", "threshold_crossed")]
    # A twelfth in the window is not a crossing; once the first has left the window, the next
    # view brings the count from 10 back to 11: a crossing again (the re-entry rule decides).
    assert run(ELEVEN, [view(T0 + timedelta(days=6, hours=23), "v11")], state)[0] == []
    assert run(ELEVEN, [view(T0 + timedelta(days=7, hours=1), "v11")], state)[0] == ["v11"]


def test_eleven_views_over_eight_days_with_at_most_ten_in_any_seven_never_fire() -> None:
    # Day 0, then ten views from day 7 (exactly a week later: day 0 is out of (t - 7 days, t]).
    views = [view(T0, "v0")] + [view(T0 + WEEK + timedelta(hours=i), f"v{i + 1}") for i in range(10)]
    assert run(ELEVEN, views)[0] == []


def test_the_window_is_exact_to_the_event_time() -> None:
    views = [view(T0, "v0")] + [view(T0 + WEEK - timedelta(seconds=10 - i), f"v{i + 1}") for i in range(10)]
    assert run(ELEVEN, views)[0] == ["v10"]


def test_views_of_other_categories_do_not_count() -> None:
    views = [view(T0 + timedelta(hours=i), f"v{i}", "cars" if i == 5 else "toys") for i in range(11)]
    assert run(ELEVEN, views)[0] == []


def test_it_fires_again_after_falling_below_and_crossing_again() -> None:
    three = trigger(RawThreshold(event_count=RawEventCount("page_view", None, 3, timedelta(days=1))))
    views = [view(T0 + timedelta(hours=h), f"v{h}") for h in (0, 1, 2, 3, 48, 49, 50)]
    assert run(three, views)[0] == ["v2", "v50"]


def test_a_redelivered_event_is_counted_once() -> None:
    three = trigger(RawThreshold(event_count=RawEventCount("page_view", None, 3, timedelta(days=1))))
    views = [view(T0, "a"), view(T0 + timedelta(hours=1), "b"), view(T0 + timedelta(hours=1), "b")]
    fired, _, state = run(three, views)
    assert fired == [] and len(state.events) == 2


def test_an_out_of_order_event_is_inserted_by_time_and_fires_when_its_window_crosses() -> None:
    three = trigger(RawThreshold(event_count=RawEventCount("page_view", None, 3, timedelta(days=1))))
    views = [view(T0, "a"), view(T0 + timedelta(hours=2), "c"), view(T0 + timedelta(hours=3), "b")]
    fired, _, state = run(three, views)
    assert fired == ["b"]
    assert [e for _, e in state.events] == ["a", "c", "b"]
    fired, _, state = run(
        three, [view(T0 + timedelta(hours=1), "x")], CountState(((T0, "a"), (T0 + timedelta(hours=2), "c")))
    )
    assert fired == []  # the window ending at x holds a and x


def test_a_late_event_counts_but_fires_nothing() -> None:
    views = [view(T0 + timedelta(hours=i), f"v{i}") for i in range(11)]
    fired, notes, state = run(ELEVEN, views, now=T0 + timedelta(days=3))
    assert fired == []
    assert notes[-1].reason_code == "late_event"
    assert len(state.events) == 11


def test_the_profile_value_fires_when_it_reaches_the_value_from_below() -> None:
    events = [
        view(T0 + timedelta(minutes=i), f"e{i}", score=s) for i, s in enumerate([50, 100, 120, 90, 101])
    ]
    fired, _, state = run(SCORE, events)
    assert fired == ["e1", "e4"]
    assert state == ValueState(True)
    assert THRESHOLD.routes(SCORE.condition, Context(now=T0)) == {"event:*"}


def test_the_profile_value_state_is_written_only_when_it_flips() -> None:
    assert THRESHOLD.decide(SCORE, view(T0, "e", score=1), None, Context(now=T0)).state is None
    assert THRESHOLD.decide(
        SCORE, view(T0, "e", score=1), ValueState(True), Context(now=T0)
    ).state == ValueState(False)
    d = THRESHOLD.decide(SCORE, view(T0, "e", score=150), None, Context(now=T0 + timedelta(days=2)))
    assert d.state == ValueState(True) and d.intents == () and d.notes[0].reason_code == "late_event"


def test_a_counter_value() -> None:
    logins = trigger(RawThreshold(profile_value=RawProfileValue("counter.logins", 3)))
    e = EventFacts("shop", "e", "p1", "login", T0, {}, lambda: ProfileView(counters={"logins": 3.0}))
    assert THRESHOLD.decide(logins, e, None, Context(now=T0)).intents


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        (RawThreshold(), {"trigger.threshold.event_count", "trigger.threshold.profile_value"}),
        (
            RawThreshold(event_count=RawEventCount("page_view", None, 0, WEEK)),
            {"trigger.threshold.event_count.count"},
        ),
        (
            RawThreshold(event_count=RawEventCount("page_view", None, 3, None)),
            {"trigger.threshold.event_count.window"},
        ),
        (
            RawThreshold(event_count=RawEventCount("page_view", None, 3, timedelta(0))),
            {"trigger.threshold.event_count.window"},
        ),
        (
            RawThreshold(event_count=RawEventCount("page_view", None, 3, timedelta(days=366))),
            {"trigger.threshold.event_count.window"},
        ),
        (
            RawThreshold(event_count=RawEventCount("", None, 3, WEEK)),
            {"trigger.threshold.event_count.event_type"},
        ),
        (
            RawThreshold(
                event_count=RawEventCount(
                    "page_view", {"compare": {"field": "event.x", "op": "gt", "value": "a"}}, 3, WEEK
                )
            ),
            {"trigger.threshold.event_count.condition.compare.value"},
        ),
        (
            RawThreshold(profile_value=RawProfileValue("counter.", 1)),
            {"trigger.threshold.profile_value.field"},
        ),
        (
            RawThreshold(profile_value=RawProfileValue("trait.vip", 1)),
            {"trigger.threshold.profile_value.field"},
        ),
        (
            RawThreshold(profile_value=RawProfileValue("score", float("nan"))),
            {"trigger.threshold.profile_value.value"},
        ),
    ],
)
def test_validation_names_the_field(raw: RawThreshold, expected: set[str]) -> None:
    with pytest.raises(InvalidArgument) as caught:
        trigger(raw)
    assert {v.field for v in caught.value.violations} == expected


def test_states_round_trip_through_json() -> None:
    for state in (
        CountState(((T0, "a"), (T0 + WEEK, "b"))),
        CountState(),
        ValueState(True),
        ValueState(False),
    ):
        assert THRESHOLD.state_from_json(json.loads(json.dumps(THRESHOLD.state_to_json(state)))) == state


def test_a_merge_keeps_both_profiles_latest_events() -> None:
    a = CountState(((T0, "a"),))
    b = CountState(((T0 + timedelta(hours=1), "b"),))
    plan = THRESHOLD.plan_merge(
        {"toys": a, "score": ValueState(True)}, {"toys": b}, [], merged_profile_id="anon"
    )
    assert plan.states == {
        "toys": CountState(((T0, "a"), (T0 + timedelta(hours=1), "b"))),
        "score": ValueState(True),
    }
    assert plan.retire == []
