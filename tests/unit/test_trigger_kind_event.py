"""The event kind: each matching event fires; the condition sees the event (and the profile if it asks)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from relevans.conditions import ProfileView
from relevans.conditions.parsing import TRIGGER_COUNT_PROBLEM
from relevans.kit.errors import InvalidArgument
from services.trigger.domain import (
    Context,
    EventFacts,
    RawTrigger,
    ScheduleTimer,
    TriggerDef,
    validate_trigger,
)
from services.trigger.domain.kinds.event import EVENT, RawEvent

NOW = datetime(2026, 5, 1, 12, tzinfo=UTC)
CTX = Context(now=NOW)


def trigger(condition: dict[str, object] | None) -> TriggerDef:
    return validate_trigger(
        RawTrigger(
            trigger_id="big-purchase",
            condition=RawEvent("purchase", condition),
            channel="email",
            purpose="marketing",
            template_id="thanks",
        )
    )


BIG = trigger({"compare": {"field": "event.amount", "op": "gt", "value": 10_000}})


def ev(
    at: datetime = NOW, event_id: str = "e1", profile: ProfileView | None = None, **props: object
) -> EventFacts:
    def decode() -> ProfileView:
        if profile is None:
            raise AssertionError("the profile was decoded though the condition does not need it")
        return profile

    return EventFacts("shop", event_id, "p1", "purchase", at, dict(props), decode)


def test_a_matching_event_fires_at_its_time_keyed_by_its_id() -> None:
    d = EVENT.decide(BIG, ev(amount=12_000), None, CTX)
    assert d.intents == (
        ScheduleTimer(
            "shop",
            "big-purchase",
            "p1",
            "e1",
            NOW,
            NOW,
            {
                "event": {"amount": 12_000},
                "event_type": "purchase",
                "event_id": "e1",
                "event_time": NOW.isoformat(),
            },
        ),
    )
    assert d.state is None
    assert [(n.outcome, n.reason_code, n.occurrence, n.until) for n in d.notes] == [
        ("fired", "event_matched", "e1", NOW)
    ]


def test_a_non_matching_event_fires_nothing_and_says_why() -> None:
    d = EVENT.decide(BIG, ev(amount=9_000), None, CTX)
    assert d.intents == ()
    assert [(n.outcome, n.reason_code, n.event_id) for n in d.notes] == [
        ("not_fired", "condition_false", "e1")
    ]


def test_no_condition_fires_on_every_event() -> None:
    assert len(EVENT.decide(trigger(None), ev(), None, CTX).intents) == 1


def test_the_profile_is_decoded_only_when_the_condition_names_it() -> None:
    vip = trigger(
        {
            "all": [
                {"compare": {"field": "event.amount", "op": "gt", "value": 100}},
                {"compare": {"field": "trait.vip", "op": "eq", "value": True}},
            ]
        }
    )
    assert EVENT.decide(vip, ev(amount=500, profile=ProfileView(traits={"vip": True})), None, CTX).intents
    assert not EVENT.decide(vip, ev(amount=500, profile=ProfileView(traits={"vip": 1})), None, CTX).intents


def test_a_late_event_fires_nothing_and_says_how_late() -> None:
    d = EVENT.decide(BIG, ev(NOW - timedelta(days=3, hours=2), amount=12_000), None, CTX)
    assert d.intents == ()
    (n,) = d.notes
    assert (n.outcome, n.reason_code) == ("not_fired", "late_event")
    assert "3 days 2 hours" in n.reason and "window of 1 day" in n.reason
    # Within the window it still fires, at the event's time.
    assert EVENT.decide(BIG, ev(NOW - timedelta(hours=23), amount=12_000), None, CTX).intents


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        (RawEvent(""), {"trigger.event.event_type": "is required"}),
        (RawEvent("Purchase"), {"trigger.event.event_type"}),
        (RawEvent("purchase\n"), {"trigger.event.event_type"}),
        (
            RawEvent("purchase", {"all": [{"compare": {"field": "event.", "op": "eq", "value": 1}}]}),
            {"trigger.event.condition.all[0].compare.field"},
        ),
        (
            RawEvent("purchase", {"count": {"event_type": "x", "window_days": 7, "op": "ge", "value": 1}}),
            {"trigger.event.condition.count": TRIGGER_COUNT_PROBLEM},
        ),
    ],
)
def test_validation_names_the_field(raw: RawEvent, expected: object) -> None:
    with pytest.raises(InvalidArgument) as caught:
        validate_trigger(
            RawTrigger(trigger_id="t", condition=raw, channel="email", purpose="marketing", template_id="x")
        )
    got = {v.field: v.description for v in caught.value.violations}
    if isinstance(expected, dict):
        assert got == expected
    else:
        assert set(got) == expected


def test_no_state_and_nothing_to_merge() -> None:
    assert EVENT.state_from_json(EVENT.state_to_json(None)) is None
    plan = EVENT.plan_merge({}, {}, [], merged_profile_id="anon")
    assert (plan.states, plan.retire) == ({}, [])


def test_evaluation_costs_microseconds() -> None:
    import time

    e = ev(amount=12_000)
    n = 5_000
    started = time.perf_counter()
    for _ in range(n):
        EVENT.decide(BIG, e, None, CTX)
    per = (time.perf_counter() - started) / n
    print(f"event kind decide: {per * 1e6:.1f} µs")
    assert per < 1e-3
