"""Merging two profiles' trigger state: one person, at most one pending reminder per trigger."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from services.trigger.domain import PendingTimer, RetireTimer
from services.trigger.domain.kinds.absence import TriggerState, merge_states, plan_merge

T0 = datetime(2026, 5, 1, 12, tzinfo=UTC)
CART = "abandoned-cart"


def started(at: datetime, occurrence: str) -> TriggerState:
    return TriggerState(last_start_at=at, last_start_occurrence=occurrence)


def test_merged_state_takes_the_latest_start_and_the_latest_cancel_of_either() -> None:
    a = TriggerState(T0, "e1", last_cancel_at=T0 + timedelta(hours=2))
    b = TriggerState(T0 + timedelta(hours=1), "e2", last_cancel_at=T0 - timedelta(days=1))
    assert merge_states(a, b) == TriggerState(T0 + timedelta(hours=1), "e2", T0 + timedelta(hours=2))
    assert merge_states(b, a) == merge_states(a, b)
    assert merge_states(TriggerState(), a) == a
    assert merge_states(a, TriggerState()) == a
    # The same start time: the occurrence decides, as for events.
    assert merge_states(started(T0, "b"), started(T0, "a")) == started(T0, "b")


def test_the_newest_pending_timer_stays_and_the_older_is_superseded_whichever_profile_had_it() -> None:
    older, newer = PendingTimer(CART, "e1", T0), PendingTimer(CART, "e2", T0 + timedelta(hours=1))
    for survivor, gone in ((older, newer), (newer, older)):
        plan = plan_merge(
            {CART: started(survivor.started_at, survivor.occurrence)},
            {CART: started(gone.started_at, gone.occurrence)},
            [older, newer],
            merged_profile_id="anon",
        )
        assert plan.retire == [RetireTimer(CART, "e1", "superseded", "superseded by e2 on merge of anon")]
        assert plan.states == {CART: started(newer.started_at, "e2")}


def test_a_pending_timer_older_than_a_fired_newer_start_is_superseded() -> None:
    plan = plan_merge(
        {CART: started(T0 + timedelta(hours=1), "fired")},
        {CART: started(T0, "e1")},
        [PendingTimer(CART, "e1", T0)],
        merged_profile_id="anon",
    )
    assert plan.retire == [RetireTimer(CART, "e1", "superseded", "superseded by fired on merge of anon")]


def test_a_later_cancel_of_the_other_profile_cancels_the_pending_timer() -> None:
    plan = plan_merge(
        {CART: TriggerState(last_cancel_at=T0 + timedelta(minutes=5))},
        {CART: started(T0, "e1")},
        [PendingTimer(CART, "e1", T0)],
        merged_profile_id="anon",
    )
    assert plan.retire == [RetireTimer(CART, "e1", "cancelled", "cancelled on merge of anon")]
    assert plan.states[CART] == TriggerState(T0, "e1", T0 + timedelta(minutes=5))


def test_an_earlier_cancel_leaves_the_newer_cart_pending_and_other_triggers_alone() -> None:
    plan = plan_merge(
        {CART: TriggerState(last_cancel_at=T0 - timedelta(days=30)), "renewal": started(T0, "r1")},
        {CART: started(T0, "e1")},
        [PendingTimer(CART, "e1", T0), PendingTimer("renewal", "r1", T0)],
        merged_profile_id="anon",
    )
    assert plan.retire == []
    assert set(plan.states) == {CART, "renewal"}
