"""The trigger service's pure domain: validation, the planner (routing, order, state, notes), firing."""

from __future__ import annotations

from dataclasses import replace
from datetime import UTC, datetime, timedelta

import pytest

from relevans.conditions import ProfileView
from relevans.kit.errors import AlreadyExists, InvalidArgument
from relevans.kit.paging import encode_page_token
from services.trigger.domain import (
    TRIGGER_PAGES,
    CancelTimers,
    Context,
    EventFacts,
    Plan,
    RawTrigger,
    ScheduleTimer,
    StateKey,
    TriggerDef,
    check_trigger_id,
    page_after,
    plan_facts,
    relevant_facts,
    resolve_create,
    validate_trigger,
)
from services.trigger.domain.events import SegmentChange
from services.trigger.domain.kinds.absence import Absence, RawAbsence, TriggerState
from services.trigger.domain.kinds.common import INVALID_DURATION
from services.trigger.domain.kinds.event import Event
from services.trigger.domain.kinds.segment import Segment
from services.trigger.domain.kinds.threshold import ProfileValue, Threshold

T0 = datetime(2026, 1, 5, 9, 0, tzinfo=UTC)
DELAY = timedelta(hours=4)
TENANT = "shop"


def raw(**overrides: object) -> RawTrigger:
    base = RawTrigger(
        trigger_id="abandoned-cart",
        display_name="Abandoned cart",
        condition=RawAbsence("add_to_cart", "purchase", DELAY),
        channel="email",
        purpose="marketing",
        template_id="cart-reminder",
    )
    return replace(base, **overrides)  # type: ignore[arg-type]


def violations(r: RawTrigger | None) -> dict[str, str]:
    with pytest.raises(InvalidArgument) as caught:
        validate_trigger(r)
    return {v.field: v.description for v in caught.value.violations}


CART = TriggerDef(
    trigger_id="abandoned-cart",
    display_name="Abandoned cart",
    condition=Absence("add_to_cart", "purchase", DELAY),
    channel="email",
    purpose="marketing",
    template_id="cart-reminder",
    created_at=T0,
)


def ev(event_type: str, at: datetime, event_id: str, profile: str = "p1", **props: object) -> EventFacts:
    return EventFacts(TENANT, event_id, profile, event_type, at, dict(props))


# ---- validation ---------------------------------------------------------------------------------


def test_a_valid_trigger_is_normalised() -> None:
    d = validate_trigger(raw(display_name="  Abandoned cart  ", template_id=" cart-reminder "))
    assert d == replace(CART, created_at=None)


def test_missing_trigger_is_named() -> None:
    assert set(violations(None)) == {"trigger"}


@pytest.mark.parametrize(
    ("overrides", "field"),
    [
        ({"trigger_id": ""}, "trigger.trigger_id"),
        ({"trigger_id": "Abandoned"}, "trigger.trigger_id"),
        ({"trigger_id": "-cart"}, "trigger.trigger_id"),
        ({"trigger_id": "a" * 64}, "trigger.trigger_id"),
        ({"condition": RawAbsence("", "purchase", DELAY)}, "trigger.absence.start_event_type"),
        ({"condition": RawAbsence("add_to_cart", "", DELAY)}, "trigger.absence.cancel_event_type"),
        ({"condition": RawAbsence("add_to_cart", "add_to_cart", DELAY)}, "trigger.absence.cancel_event_type"),
        ({"condition": RawAbsence("Add To Cart", "purchase", DELAY)}, "trigger.absence.start_event_type"),
        ({"condition": RawAbsence("add_to_cart", "purchase", None)}, "trigger.absence.delay"),
        (
            {"condition": RawAbsence("add_to_cart", "purchase", timedelta(milliseconds=999))},
            "trigger.absence.delay",
        ),
        (
            {"condition": RawAbsence("add_to_cart", "purchase", timedelta(days=365, seconds=1))},
            "trigger.absence.delay",
        ),
        ({"condition": RawAbsence("add_to_cart", "purchase", -DELAY)}, "trigger.absence.delay"),
        ({"condition": RawAbsence("add_to_cart", "purchase", INVALID_DURATION)}, "trigger.absence.delay"),
        ({"condition": RawAbsence("add_to_cart\n", "purchase", DELAY)}, "trigger.absence.start_event_type"),
        ({"channel": "unspecified"}, "trigger.channel"),
        ({"channel": "42"}, "trigger.channel"),
        ({"purpose": "unspecified"}, "trigger.purpose"),
        ({"purpose": "profiling"}, "trigger.purpose"),
        ({"template_id": "  "}, "trigger.template_id"),
        ({"template_id": "t" * 64}, "trigger.template_id"),
        ({"template_id": "{{ ''.__class__.__mro__ }}"}, "trigger.template_id"),
        ({"template_id": "Cart Reminder"}, "trigger.template_id"),
        ({"template_id": "_cart"}, "trigger.template_id"),
        ({"display_name": "x" * 201}, "trigger.display_name"),
    ],
)
def test_each_invalid_field_is_named(overrides: dict[str, object], field: str) -> None:
    assert set(violations(raw(**overrides))) == {field}


@pytest.mark.parametrize("channel", ["email", "sms", "webhook", "web"])
def test_every_channel_is_supported(channel: str) -> None:
    assert validate_trigger(raw(channel=channel)).channel == channel


def test_delay_bounds_are_inclusive() -> None:
    for delay in (timedelta(seconds=1), timedelta(days=365)):
        assert (
            validate_trigger(raw(condition=RawAbsence("add_to_cart", "purchase", delay))).condition.delay
            == delay
        )


def test_all_violations_are_reported_together() -> None:
    found = violations(RawTrigger(trigger_id="BAD", condition=RawAbsence("a", "a", timedelta(0))))
    assert set(found) == {
        "trigger.trigger_id",
        "trigger.absence.cancel_event_type",
        "trigger.absence.delay",
        "trigger.channel",
        "trigger.purpose",
        "trigger.template_id",
    }


def test_check_trigger_id() -> None:
    assert check_trigger_id("abandoned-cart") == "abandoned-cart"
    for bad in ("", "UPPER", "a b"):
        with pytest.raises(InvalidArgument) as caught:
            check_trigger_id(bad)
        assert caught.value.violations[0].field == "trigger_id"


def test_create_is_idempotent_for_the_same_definition_only() -> None:
    requested = replace(CART, created_at=None)
    assert resolve_create(CART, requested) is CART
    with pytest.raises(AlreadyExists):
        resolve_create(CART, replace(requested, template_id="other"))
    with pytest.raises(AlreadyExists):
        resolve_create(CART, replace(requested, condition=replace(CART.condition, delay=DELAY * 2)))


def test_page_size_and_tokens() -> None:
    assert TRIGGER_PAGES.of(0) == 50
    assert TRIGGER_PAGES.of(7) == 7
    assert TRIGGER_PAGES.of(1000) == 100
    with pytest.raises(InvalidArgument):
        TRIGGER_PAGES.of(-1)
    assert page_after("") is None
    assert page_after(encode_page_token(after="abandoned-cart")) == "abandoned-cart"
    forged = (
        "nope",
        "!!!",
        encode_page_token(after="x").upper(),
        "eyJhZnRlciI6IDF9",
        encode_page_token(after="X Y"),
    )
    for token in forged:
        with pytest.raises(InvalidArgument) as caught:
            page_after(token)
        assert caught.value.violations[0].field == "page_token"


# ---- the planner (with absence decisions) -------------------------------------------------------

CTX = Context(now=T0 + timedelta(hours=3))


def plan(
    events: list[EventFacts],
    states: dict[StateKey, TriggerState] | None = None,
    triggers: list[TriggerDef] | None = None,
) -> Plan:
    return plan_facts(
        {TENANT: triggers if triggers is not None else [CART]}, events, states or {}, {TENANT: CTX}
    )


def test_start_event_schedules_a_timer_with_the_event_as_variables() -> None:
    at = T0 + timedelta(minutes=5)
    p = plan([ev("add_to_cart", at, "e1", product_name="Shoes", price=89.0)])
    assert p.intents == [
        ScheduleTimer(
            tenant_id=TENANT,
            trigger_id="abandoned-cart",
            profile_id="p1",
            occurrence="e1",
            started_at=at,
            due_at=at + DELAY,
            supersede=True,
            variables={
                "event": {"product_name": "Shoes", "price": 89.0},
                "event_type": "add_to_cart",
                "event_id": "e1",
                "event_time": at.isoformat(),
            },
        )
    ]
    assert p.states == {(TENANT, "abandoned-cart", "p1"): TriggerState(at, "e1")}
    assert [(n.trigger_id, n.outcome, n.reason_code) for n in p.notes] == [
        ("abandoned-cart", "fired", "start_event")
    ]


def test_unrelated_events_and_other_tenants_are_ignored() -> None:
    assert plan([ev("page_view", T0, "e1")]).intents == []
    other = EventFacts("other", "e2", "p1", "add_to_cart", T0, {})
    assert plan([other]).intents == []
    assert relevant_facts({TENANT: [CART]}, [ev("page_view", T0, "e1"), other], {TENANT: CTX}) == []


def test_events_from_before_the_trigger_was_created_count_the_late_rule_decides() -> None:
    # A backfill right after creating a trigger is handled like any other events.
    assert plan([ev("add_to_cart", T0 - timedelta(hours=1), "e3")]).schedules
    p = plan([ev("add_to_cart", T0 - timedelta(days=3), "e4")])
    assert p.schedules == []
    assert [(n.outcome, n.reason_code) for n in p.notes] == [("not_fired", "late_event")]


def test_cancel_event_cancels_timers_started_at_or_before_it_and_is_remembered() -> None:
    at = T0 + timedelta(hours=1)
    p = plan([ev("purchase", at, "e9")])
    assert p.intents == [CancelTimers(TENANT, "abandoned-cart", "p1", at, "cancelled by purchase e9")]
    assert p.states[(TENANT, "abandoned-cart", "p1")].cancels == (((), at),)


def test_start_then_cancel_in_one_batch() -> None:
    p = plan([ev("add_to_cart", T0, "e1"), ev("purchase", T0 + timedelta(hours=1), "e2")])
    assert [type(i) for i in p.intents] == [ScheduleTimer, CancelTimers]
    assert p.states[(TENANT, "abandoned-cart", "p1")] == TriggerState(
        T0, "e1", (), (((), T0 + timedelta(hours=1)),)
    )
    assert [n.outcome for n in p.notes] == ["fired", "cancelled"]


def test_out_of_order_cancel_prevents_an_earlier_start_from_being_scheduled() -> None:
    cancel_at = T0 + timedelta(hours=2)
    # The purchase arrives first; the add_to_cart that happened before it arrives later.
    p = plan([ev("purchase", cancel_at, "e2"), ev("add_to_cart", T0 + timedelta(hours=1), "e1")])
    assert p.schedules == []
    # Same across batches, through the stored state.
    state = {(TENANT, "abandoned-cart", "p1"): TriggerState(cancels=(((), cancel_at),))}
    assert plan([ev("add_to_cart", T0 + timedelta(hours=1), "e1")], state).intents == []
    assert plan([ev("add_to_cart", cancel_at, "e1")], state).intents == []  # same instant: cancelled
    later = plan([ev("add_to_cart", cancel_at + timedelta(seconds=1), "e3")], state)
    assert [i.occurrence for i in later.schedules] == ["e3"]


def test_an_older_cancel_does_not_move_the_remembered_cancel_back() -> None:
    state = {(TENANT, "abandoned-cart", "p1"): TriggerState(cancels=(((), T0 + timedelta(hours=3)),))}
    p = plan([ev("purchase", T0 + timedelta(hours=1), "e2")], state)
    assert p.cancels and p.states == {}


def test_a_newer_start_supersedes_and_an_older_one_arriving_late_is_ignored() -> None:
    first, second = T0 + timedelta(minutes=1), T0 + timedelta(minutes=10)
    p = plan([ev("add_to_cart", first, "e1"), ev("add_to_cart", second, "e2")])
    assert [i.occurrence for i in p.schedules] == ["e1", "e2"]
    assert p.states[(TENANT, "abandoned-cart", "p1")] == TriggerState(second, "e2")
    late = plan(
        [ev("add_to_cart", first, "e1")], {(TENANT, "abandoned-cart", "p1"): TriggerState(second, "e2")}
    )
    assert late.intents == []


def test_a_redelivered_start_schedules_the_same_timer_again_without_changing_state() -> None:
    state = {(TENANT, "abandoned-cart", "p1"): TriggerState(T0, "e1")}
    p = plan([ev("add_to_cart", T0, "e1")], state)
    assert [i.occurrence for i in p.schedules] == ["e1"]  # the store's ON CONFLICT makes it a no-op
    assert p.states == {}


def test_profiles_and_triggers_are_independent() -> None:
    signup = TriggerDef(
        trigger_id="no-activation",
        display_name="",
        condition=Absence("signup", "purchase", timedelta(days=3)),
        channel="email",
        purpose="marketing",
        template_id="welcome",
        created_at=T0,
    )
    p = plan(
        [
            ev("add_to_cart", T0, "e1", profile="p1"),
            ev("signup", T0, "e2", profile="p1"),
            ev("purchase", T0 + timedelta(hours=1), "e3", profile="p2"),
        ],
        triggers=[CART, signup],
    )
    assert [(type(i).__name__, i.trigger_id, i.profile_id) for i in p.intents] == [
        ("ScheduleTimer", "abandoned-cart", "p1"),
        ("ScheduleTimer", "no-activation", "p1"),
        ("CancelTimers", "abandoned-cart", "p2"),
        ("CancelTimers", "no-activation", "p2"),
    ]


def test_every_event_reaches_event_star_triggers_once_in_trigger_order() -> None:
    score = replace(CART, trigger_id="score", condition=Threshold(ProfileValue("score", 10)))
    purchase = replace(CART, trigger_id="purchase", condition=Event("add_to_cart"))
    e = EventFacts(
        TENANT,
        "e1",
        "p1",
        "add_to_cart",
        T0,
        {},
        lambda: ProfileView(score=50),
    )
    p = plan_facts({TENANT: [score, CART, purchase]}, [e], {}, {TENANT: CTX})
    assert [i.trigger_id for i in p.intents] == ["score", "abandoned-cart", "purchase"]
    assert relevant_facts({TENANT: [score]}, [ev("page_view", T0, "x")], {TENANT: CTX})


def test_segment_changes_reach_segment_triggers_only() -> None:
    vip = replace(CART, trigger_id="vip", condition=Segment("vips", "entered"))
    change = SegmentChange(TENANT, "p1", "vips", True, "e1", T0)
    p = plan_facts({TENANT: [CART, vip]}, [change, ev("add_to_cart", T0, "e2")], {}, {TENANT: CTX})
    assert [i.trigger_id for i in p.intents] == ["vip", "abandoned-cart"]
