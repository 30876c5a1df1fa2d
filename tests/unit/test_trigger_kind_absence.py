"""The absence kind: start, cancel (with a condition and match properties), out of order, late, merges."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from relevans.kit.errors import InvalidArgument
from services.trigger.domain import (
    CancelTimers,
    Context,
    EventFacts,
    PendingTimer,
    RawTrigger,
    RetireTimer,
    ScheduleTimer,
    TriggerDef,
    WithdrawMessages,
    validate_trigger,
)
from services.trigger.domain.kinds.absence import (
    ABSENCE,
    MAX_REMEMBERED_CANCELS,
    RawAbsence,
    TriggerState,
    merge_states,
)

T0 = datetime(2026, 5, 1, 12, tzinfo=UTC)
DELAY = timedelta(hours=4)
CTX = Context(now=T0)


def trigger(channel: str = "email", **overrides: object) -> TriggerDef:
    raw = RawAbsence(
        **{"start_event_type": "add_to_cart", "cancel_event_type": "purchase", "delay": DELAY, **overrides}
    )  # type: ignore[arg-type]
    return validate_trigger(
        RawTrigger(trigger_id="cart", condition=raw, channel=channel, purpose="marketing", template_id="t")
    )


CART = trigger()
PER_CART = trigger(
    match_properties=("cart_id",),
    cancel_condition={"compare": {"field": "event.status", "op": "eq", "value": "paid"}},
)


def ev(event_type: str, at: datetime, event_id: str, **props: object) -> EventFacts:
    return EventFacts("shop", event_id, "p1", event_type, at, dict(props))


def run(t: TriggerDef, events: list[EventFacts], state: TriggerState | None = None, ctx: Context = CTX):  # type: ignore[no-untyped-def]
    intents, notes = [], []
    for e in events:
        d = ABSENCE.decide(t, e, state, ctx)
        intents += d.intents
        notes += d.notes
        state = d.state if d.state is not None else state
    return intents, notes, state


def test_a_start_schedules_a_superseding_timer_and_notes_it() -> None:
    intents, notes, state = run(CART, [ev("add_to_cart", T0, "e1", sku="A")])
    (s,) = intents
    assert isinstance(s, ScheduleTimer)
    assert (s.occurrence, s.started_at, s.due_at, s.supersede, s.variables["event"]) == (
        "e1",
        T0,
        T0 + DELAY,
        True,
        {"sku": "A"},
    )
    assert [(n.outcome, n.reason_code, n.until) for n in notes] == [("fired", "start_event", T0 + DELAY)]
    assert state == TriggerState(T0, "e1", ())


def test_a_cancel_cancels_pending_starts_and_notes_the_one_state_knows() -> None:
    intents, notes, state = run(
        CART, [ev("add_to_cart", T0, "e1"), ev("purchase", T0 + timedelta(hours=1), "p")]
    )
    assert intents[1] == CancelTimers(
        "shop", "cart", "p1", T0 + timedelta(hours=1), "cancelled by purchase p"
    )
    assert [(n.outcome, n.reason_code, n.occurrence) for n in notes][1:] == [
        ("cancelled", "cancel_event", "e1")
    ]
    assert state is not None and state.cancels == (((), T0 + timedelta(hours=1)),)


def test_a_cancel_after_the_reminder_was_due_notes_nothing() -> None:
    later = Context(now=T0 + timedelta(hours=5))
    _, notes, _ = run(
        CART, [ev("add_to_cart", T0, "e1"), ev("purchase", T0 + timedelta(hours=5), "p")], ctx=later
    )
    assert [n.outcome for n in notes] == ["fired"]


def test_an_out_of_order_start_before_a_remembered_cancel_is_not_scheduled() -> None:
    intents, notes, _ = run(
        CART, [ev("purchase", T0, "p"), ev("add_to_cart", T0 - timedelta(minutes=1), "e1")]
    )
    assert [type(i) for i in intents] == [CancelTimers]
    assert [(n.outcome, n.reason_code) for n in notes] == [("cancelled", "cancel_event")]


def test_a_newer_start_wins_and_an_older_one_arriving_late_is_ignored() -> None:
    intents, _, state = run(
        CART, [ev("add_to_cart", T0, "e2"), ev("add_to_cart", T0 - timedelta(hours=1), "e1")]
    )
    assert [i.occurrence for i in intents if isinstance(i, ScheduleTimer)] == ["e2"]
    assert state == TriggerState(T0, "e2")


def test_a_redelivered_start_schedules_again_without_state_or_note() -> None:
    _, _, state = run(CART, [ev("add_to_cart", T0, "e1")])
    d = ABSENCE.decide(CART, ev("add_to_cart", T0, "e1"), state, CTX)
    assert len(d.intents) == 1 and d.state is None and d.notes == ()


def test_a_cancel_condition_ignores_cancels_that_do_not_match() -> None:
    d = ABSENCE.decide(PER_CART, ev("purchase", T0, "p", cart_id="c1", status="failed"), None, CTX)
    assert d.intents == () and d.state is None


def test_match_properties_cancel_only_the_same_cart_and_are_remembered_per_cart() -> None:
    intents, notes, state = run(
        PER_CART,
        [
            ev("add_to_cart", T0, "e1", cart_id="c1"),
            ev("purchase", T0 + timedelta(minutes=5), "p2", cart_id="c2", status="paid"),
        ],
    )
    assert intents[1] == CancelTimers(
        "shop", "cart", "p1", T0 + timedelta(minutes=5), "cancelled by purchase p2", (("cart_id", "c2"),)
    )
    assert [n.outcome for n in notes] == ["fired"]  # c1 is still pending
    # A late-arriving start of cart c2 from before its purchase is not scheduled; one of c3 is.
    d = ABSENCE.decide(PER_CART, ev("add_to_cart", T0, "e2", cart_id="c2"), state, CTX)
    assert d.intents == ()
    d = ABSENCE.decide(PER_CART, ev("add_to_cart", T0, "e3", cart_id="c3"), state, CTX)
    assert len(d.intents) == 1


def test_the_cancel_memory_is_bounded() -> None:
    state = TriggerState()
    for i in range(MAX_REMEMBERED_CANCELS + 5):
        state = state.with_cancel((f"c{i}",), T0 + timedelta(minutes=i))
    assert len(state.cancels) == MAX_REMEMBERED_CANCELS
    assert state.cancels[0][0] == ("c5",)
    # The later of two cancels of a key is kept.
    assert state.with_cancel(("c36",), T0).cancels[-1] == (("c36",), T0 + timedelta(minutes=36))


def test_a_late_start_whose_reminder_is_already_due_schedules_nothing() -> None:
    late = Context(now=T0 + timedelta(days=2))
    _, notes, state = run(CART, [ev("add_to_cart", T0, "e1")], ctx=late)
    assert [(n.outcome, n.reason_code) for n in notes] == [("not_fired", "late_event")]
    assert state == TriggerState(T0, "e1")
    # A late start with a long delay still has its reminder ahead.
    long = trigger(delay=timedelta(days=30))
    assert ABSENCE.decide(long, ev("add_to_cart", T0, "e1"), None, late).intents


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        ({"start_event_type": ""}, {"trigger.absence.start_event_type": "is required"}),
        (
            {"cancel_event_type": "add_to_cart"},
            {"trigger.absence.cancel_event_type": "must differ from start_event_type"},
        ),
        ({"delay": None}, {"trigger.absence.delay": "is required"}),
        ({"delay": timedelta(0)}, {"trigger.absence.delay": "must be between 1 second and 365 days"}),
        ({"delay": -DELAY}, {"trigger.absence.delay": "must be between 1 second and 365 days"}),
        (
            {"delay": timedelta(days=365, seconds=1)},
            {"trigger.absence.delay": "must be between 1 second and 365 days"},
        ),
        (
            {"match_properties": ("cart_id", "cart_id")},
            {"trigger.absence.match_properties[1]": "is named twice"},
        ),
        ({"match_properties": ("9",)}, {"trigger.absence.match_properties[0]"}),
        ({"cancel_condition": {"not": {}}}, {"trigger.absence.cancel_condition.not"}),
    ],
)
def test_validation_names_the_field(overrides: dict[str, object], expected: object) -> None:
    base = {"start_event_type": "add_to_cart", "cancel_event_type": "purchase", "delay": DELAY}
    with pytest.raises(InvalidArgument) as caught:
        validate_trigger(
            RawTrigger(
                trigger_id="t",
                condition=RawAbsence(**{**base, **overrides}),
                channel="email",
                purpose="marketing",
                template_id="x",
            )  # type: ignore[arg-type]
        )
    got = {v.field: v.description for v in caught.value.violations}
    assert (got if isinstance(expected, dict) else set(got)) == expected


def test_a_year_is_the_longest_delay() -> None:
    assert trigger(delay=timedelta(days=365)).condition.delay == timedelta(days=365)  # type: ignore[attr-defined]


def test_state_round_trips_through_json() -> None:
    import json

    state = TriggerState(T0, "e1", ("c1", 2), ((("c1", 2), T0), (("c2", None), T0 + DELAY)))
    assert ABSENCE.state_from_json(json.loads(json.dumps(ABSENCE.state_to_json(state)))) == state
    assert ABSENCE.state_from_json(ABSENCE.state_to_json(TriggerState())) == TriggerState()


# ---- merges -------------------------------------------------------------------------------------


def started(at: datetime, occurrence: str) -> TriggerState:
    return TriggerState(last_start_at=at, last_start_occurrence=occurrence)


def test_merged_state_takes_the_latest_start_and_the_latest_cancel_of_each_key() -> None:
    a = TriggerState(T0, "e1", cancels=(((), T0 + timedelta(hours=2)),))
    b = TriggerState(T0 + timedelta(hours=1), "e2", cancels=(((), T0 - timedelta(days=1)),))
    assert merge_states(a, b) == TriggerState(
        T0 + timedelta(hours=1), "e2", (), (((), T0 + timedelta(hours=2)),)
    )
    assert merge_states(b, a) == merge_states(a, b)
    assert merge_states(TriggerState(), a) == a
    assert merge_states(started(T0, "b"), started(T0, "a")) == started(T0, "b")


def test_the_newest_pending_timer_stays_and_the_older_is_superseded_whichever_profile_had_it() -> None:
    older, newer = PendingTimer("cart", "e1", T0), PendingTimer("cart", "e2", T0 + timedelta(hours=1))
    for survivor, gone in ((older, newer), (newer, older)):
        plan = ABSENCE.plan_merge(
            {"cart": started(survivor.started_at, survivor.occurrence)},
            {"cart": started(gone.started_at, gone.occurrence)},
            [older, newer],
            merged_profile_id="anon",
        )
        assert plan.retire == [RetireTimer("cart", "e1", "superseded", "superseded by e2 on merge of anon")]
        assert plan.states == {"cart": started(newer.started_at, "e2")}


def test_a_later_cancel_of_the_other_profile_cancels_the_pending_timer() -> None:
    plan = ABSENCE.plan_merge(
        {"cart": TriggerState(cancels=(((), T0 + timedelta(minutes=5)),))},
        {"cart": started(T0, "e1")},
        [PendingTimer("cart", "e1", T0)],
        merged_profile_id="anon",
    )
    assert plan.retire == [RetireTimer("cart", "e1", "cancelled", "cancelled on merge of anon")]


def test_a_cancel_of_another_cart_leaves_the_pending_one() -> None:
    plan = ABSENCE.plan_merge(
        {"cart": TriggerState(cancels=((("c2",), T0 + timedelta(minutes=5)),))},
        {"cart": TriggerState(T0, "e1", ("c1",))},
        [PendingTimer("cart", "e1", T0)],
        merged_profile_id="anon",
    )
    assert plan.retire == []


# ---- a banner's withdrawal --------------------------------------------------------------------------

BANNER = trigger(channel="web", match_properties=("cart_id",))


def test_a_cancel_on_a_web_trigger_asks_to_withdraw_the_banners_it_covers() -> None:
    intents, _, _ = run(
        BANNER,
        [ev("add_to_cart", T0, "e1", cart_id="c1"), ev("purchase", T0 + DELAY * 2, "p", cart_id="c1")],
    )
    assert intents[2] == WithdrawMessages(
        "shop", "cart", "p1", T0 + DELAY * 2, "cancelled", (("cart_id", "c1"),)
    )


def test_a_redelivered_cancel_withdraws_nothing_again() -> None:
    purchase = ev("purchase", T0 + DELAY * 2, "p", cart_id="c1")
    _, _, state = run(BANNER, [ev("add_to_cart", T0, "e1", cart_id="c1"), purchase])
    again = ABSENCE.decide(BANNER, purchase, state, CTX)
    assert [type(i) for i in again.intents] == [CancelTimers]


def test_a_cancel_on_an_email_trigger_withdraws_nothing() -> None:
    intents, _, _ = run(CART, [ev("add_to_cart", T0, "e1"), ev("purchase", T0 + DELAY * 2, "p")])
    assert not [i for i in intents if isinstance(i, WithdrawMessages)]
