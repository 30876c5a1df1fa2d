"""What a person's due timers come to (`settle_person`): delivery requests keyed once per
occurrence, the policies' verdicts with their notes, the next year's timer of a yearly date."""

from __future__ import annotations

from dataclasses import replace
from datetime import UTC, datetime, time, timedelta

from services.trigger.domain import ScheduleTimer, TriggerDef
from services.trigger.domain.events import TraitChange
from services.trigger.domain.firing import DueTimer, settle_person
from services.trigger.domain.kinds import KINDS
from services.trigger.domain.kinds.absence import Absence
from services.trigger.domain.kinds.contract import Context
from services.trigger.domain.kinds.date import DateCondition
from services.trigger.domain.policies import FrequencyCap, Sent, TenantPolicy, TriggerPolicy

T0 = datetime(2026, 5, 4, 12, tzinfo=UTC)
CART = TriggerDef(
    trigger_id="abandoned-cart",
    display_name="",
    condition=Absence("add_to_cart", "purchase", timedelta(hours=4)),
    channel="email",
    purpose="marketing",
    template_id="cart",
)


def due(trigger: TriggerDef | None, occurrence: str = "e1", trigger_id: str = "abandoned-cart") -> DueTimer:
    return DueTimer("shop", trigger_id, "p1", occurrence, {"event": {"x": 1}}, T0, T0, trigger)


def test_a_handed_timer_is_keyed_by_trigger_profile_and_occurrence() -> None:
    settled = settle_person([due(CART)], [], TenantPolicy(), {}, {}, T0)
    [(_, firing)] = settled.handed
    assert firing.idempotency_key == "abandoned-cart:p1:e1"
    assert (firing.channel, firing.purpose, firing.template_id, firing.variables) == (
        "email",
        "marketing",
        "cart",
        {"event": {"x": 1}},
    )
    [note] = settled.notes
    assert (note.outcome, note.reason_code, note.occurrence) == ("handed_to_delivery", "sent", "e1")
    assert settled.note_keys == ["abandoned-cart:p1:e1"]


def test_a_timer_of_a_deleted_trigger_is_cancelled_and_says_so() -> None:
    settled = settle_person([due(None)], [], TenantPolicy(), {}, {}, T0)
    assert not settled.handed
    [(_, status, reason)] = settled.retired
    assert (status, reason) == ("cancelled", "trigger deleted")
    assert [(n.outcome, n.reason_code) for n in settled.notes] == [("cancelled", "trigger_deleted")]


def test_a_capped_timer_is_deferred_with_its_new_due_time() -> None:
    policy = TenantPolicy(caps=(FrequencyCap("", 1),))
    history = [Sent("other", "email", "marketing", T0 - timedelta(hours=1))]
    settled = settle_person([due(CART)], history, policy, {}, {}, T0)
    [(_, until)] = settled.deferred
    assert until == datetime(2026, 5, 5, tzinfo=UTC)
    assert [(n.outcome, n.until) for n in settled.notes] == [("capped", until)]


def test_a_dropped_timer_is_retired_as_dropped() -> None:
    policy = TenantPolicy(caps=(FrequencyCap("", 1),))
    dropping = replace(CART, policy=TriggerPolicy(capped_action="drop"))
    history = [Sent("other", "email", "marketing", T0 - timedelta(hours=1))]
    settled = settle_person([due(dropping)], history, policy, {}, {}, T0)
    [(_, status, _)] = settled.retired
    assert status == "dropped"


def test_a_yearly_date_schedules_next_years_timer_when_it_is_handed() -> None:
    birthday = TriggerDef(
        trigger_id="birthday",
        display_name="",
        condition=DateCondition("birthday", 0, True, time(10)),
        channel="email",
        purpose="marketing",
        template_id="greeting",
    )
    change = TraitChange("shop", "p1", "c1", "birthday", None, "1990-07-15", {"birthday": "1990-07-15"}, T0)
    decision = KINDS["date"].decide(birthday, change, None, Context(now=T0))
    [schedule] = [i for i in decision.intents if isinstance(i, ScheduleTimer)]
    assert schedule.due_at == datetime(2026, 7, 15, 10, tzinfo=UTC)
    timer = DueTimer(
        "shop",
        "birthday",
        "p1",
        schedule.occurrence,
        schedule.variables,
        schedule.due_at,
        schedule.due_at,
        birthday,
    )
    settled = settle_person([timer], [], TenantPolicy(), {}, {}, schedule.due_at)
    [follow] = settled.follow_ups
    assert follow.due_at == datetime(2027, 7, 15, 10, tzinfo=UTC)


def test_a_firing_carries_the_triggers_priority_and_its_own_expiry() -> None:
    ranked = replace(CART, policy=TriggerPolicy(priority=7, expiry=timedelta(hours=6)))
    [(_, firing)] = settle_person([due(ranked)], [], TenantPolicy(), {}, {}, T0).handed
    assert (firing.priority, firing.expire_at) == (7, T0 + timedelta(hours=6))


def test_a_firing_without_an_expiry_of_its_triggers_own_has_none() -> None:
    [(_, firing)] = settle_person([due(CART)], [], TenantPolicy(), {}, {}, T0).handed
    assert (firing.priority, firing.expire_at) == (0, None)
