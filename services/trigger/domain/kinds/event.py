"""The event kind: each event of a type that matches a condition fires (a purchase above 10,000, a
white paper download, a page view of a category).

The condition sees the event's properties (`event.<property>`) and the profile right after the
event; the profile is decoded only when the condition names one of its fields. A firing is a
timer due at the event's time, keyed by the event's id, so a redelivered event sends nothing new.
A late event (older than the tenant's late-event window) fires nothing. No state is kept.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

from relevans.kit.errors import Violations
from services.trigger.domain.events import EventFacts, Fact, event_route, timer_variables
from services.trigger.domain.intents import ScheduleTimer
from services.trigger.domain.kinds.common import (
    CONDITION_FALSE,
    FIRED,
    NOT_FIRED,
    Matcher,
    Stateless,
    check_event_type,
    check_matcher,
    late_note,
    matcher_from_json,
    matcher_to_json,
    note,
)
from services.trigger.domain.kinds.contract import NOTHING, Context, Decision
from services.trigger.domain.triggers import Condition, RawCondition, TriggerDef


@dataclass(frozen=True, slots=True)
class RawEvent:
    kind: ClassVar[str] = "event"

    event_type: str = ""
    condition: dict[str, Any] | None = None


@dataclass(frozen=True, slots=True)
class Event:
    """Every `event_type` event matching `condition` (None: every one)."""

    kind: ClassVar[str] = "event"

    event_type: str
    condition: Matcher | None = None


def _event(condition: Condition) -> Event:
    assert isinstance(condition, Event)
    return condition


def fired(trigger: TriggerDef, event: EventFacts, ctx: Context, reason_code: str, reason: str) -> Decision:
    """A message due at the event's time (the event kind's and a threshold's firing), or a late note."""
    if ctx.is_late(event.occurred_at):
        return Decision(notes=(late_note(trigger, event, ctx),))
    schedule = ScheduleTimer(
        tenant_id=event.tenant_id,
        trigger_id=trigger.trigger_id,
        profile_id=event.profile_id,
        occurrence=event.event_id,
        started_at=event.occurred_at,
        due_at=event.occurred_at,
        variables=timer_variables(event),
    )
    return Decision(
        (schedule,),
        notes=(
            note(
                trigger,
                event,
                ctx,
                FIRED,
                reason_code,
                reason,
                occurrence=event.event_id,
                until=event.occurred_at,
            ),
        ),
    )


class EventKind(Stateless):
    name = "event"

    def validate(self, raw: RawCondition, field: str, v: Violations) -> Event | None:
        assert isinstance(raw, RawEvent)
        before = len(v.items)
        check_event_type(raw.event_type, f"{field}.event_type", v)
        condition = check_matcher(raw.condition, f"{field}.condition", v)
        if len(v.items) > before:
            return None
        return Event(raw.event_type, condition)

    def to_json(self, condition: Condition) -> dict[str, Any]:
        e = _event(condition)
        return {"event_type": e.event_type, "condition": matcher_to_json(e.condition)}

    def from_json(self, data: Mapping[str, Any]) -> Event:
        return Event(data["event_type"], matcher_from_json(data.get("condition")))

    def routes(self, condition: Condition, ctx: Context) -> frozenset[str]:
        return frozenset((event_route(_event(condition).event_type),))

    def decide(self, trigger: TriggerDef, fact: Fact, state: Any | None, ctx: Context) -> Decision:
        e = _event(trigger.condition)
        if not isinstance(fact, EventFacts):
            return NOTHING
        if e.condition is not None and not e.condition.matches(fact):
            reason = f"the {fact.event_type} event did not match the condition"
            return Decision(notes=(note(trigger, fact, ctx, NOT_FIRED, CONDITION_FALSE, reason),))
        return fired(trigger, fact, ctx, "event_matched", f"a matching {fact.event_type} event")


EVENT = EventKind()
