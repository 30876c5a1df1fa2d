"""The inactivity kind: no event of the given types for a duration, after at least one (no gym
check-in for 14 days).

Each such event at t moves the deadline to t + duration: the timer of the current lapse (its
occurrence, the id of the event that began it) is moved (`ScheduleTimer.move`). An event at or
after the deadline of the previous lapse (whose message is then due or sent) begins a new lapse
with a new occurrence: one message per lapse. An event older than the latest one seen changes
nothing. A late event still moves the deadline; when the deadline it sets has already passed,
nothing is scheduled (`late_event`).

The state is the latest activity time and the current lapse's occurrence.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, ClassVar

from relevans.kit.errors import Violations
from services.trigger.domain.durations import duration_text, parse_duration
from services.trigger.domain.events import EventFacts, Fact, event_route, timer_variables
from services.trigger.domain.intents import MergePlan, PendingTimer, RetireTimer, ScheduleTimer
from services.trigger.domain.kinds.common import (
    FIRED,
    OneShotTimers,
    RawDuration,
    check_duration,
    check_event_type,
    in_words,
    late_note,
    note,
)
from services.trigger.domain.kinds.contract import NOTHING, Context, Decision
from services.trigger.domain.triggers import Condition, RawCondition, TriggerDef

MAX_EVENT_TYPES = 20


@dataclass(frozen=True, slots=True)
class RawInactivity:
    kind: ClassVar[str] = "inactivity"

    event_types: tuple[str, ...] = ()
    duration: RawDuration = None


@dataclass(frozen=True, slots=True)
class Inactivity:
    kind: ClassVar[str] = "inactivity"

    event_types: tuple[str, ...]
    duration: timedelta


@dataclass(frozen=True, slots=True)
class InactivityState:
    last_at: datetime
    # The id of the event that began the current lapse: the occurrence of its timer.
    occurrence: str


def _inactivity(condition: Condition) -> Inactivity:
    assert isinstance(condition, Inactivity)
    return condition


class InactivityKind(OneShotTimers):
    name = "inactivity"

    def validate(self, raw: RawCondition, field: str, v: Violations) -> Inactivity | None:
        assert isinstance(raw, RawInactivity)
        before = len(v.items)
        if not raw.event_types:
            v.add(f"{field}.event_types", "at least one event type is required")
        elif len(raw.event_types) > MAX_EVENT_TYPES:
            v.add(f"{field}.event_types", f"must have at most {MAX_EVENT_TYPES} event types")
        else:
            for i, event_type in enumerate(raw.event_types):
                if (
                    check_event_type(event_type, f"{field}.event_types[{i}]", v)
                    and event_type in raw.event_types[:i]
                ):
                    v.add(f"{field}.event_types[{i}]", "is named twice")
        duration = check_duration(raw.duration, f"{field}.duration", v)
        if len(v.items) > before or duration is None:
            return None
        return Inactivity(tuple(raw.event_types), duration)

    def to_json(self, condition: Condition) -> dict[str, Any]:
        i = _inactivity(condition)
        return {"event_types": list(i.event_types), "duration": duration_text(i.duration)}

    def from_json(self, data: Mapping[str, Any]) -> Inactivity:
        return Inactivity(tuple(data["event_types"]), parse_duration(data["duration"]))

    def routes(self, condition: Condition, ctx: Context) -> frozenset[str]:
        return frozenset(event_route(t) for t in _inactivity(condition).event_types)

    def decide(self, trigger: TriggerDef, fact: Fact, state: Any | None, ctx: Context) -> Decision:
        i = _inactivity(trigger.condition)
        if not isinstance(fact, EventFacts):
            return NOTHING
        t = fact.occurred_at
        if state is not None and t <= state.last_at:
            return NOTHING  # older than (or the same as) the latest activity: nothing moves
        new_lapse = state is None or t >= state.last_at + i.duration
        occurrence: str = fact.event_id if state is None or new_lapse else state.occurrence
        new_state = InactivityState(t, occurrence)
        due = t + i.duration
        if ctx.is_late(t) and due <= ctx.now:
            return Decision(state=new_state, notes=(late_note(trigger, fact, ctx, occurrence=occurrence),))
        schedule = ScheduleTimer(
            tenant_id=fact.tenant_id,
            trigger_id=trigger.trigger_id,
            profile_id=fact.profile_id,
            occurrence=occurrence,
            started_at=t,
            due_at=due,
            variables=timer_variables(fact),
            move=True,
        )
        if not new_lapse:
            return Decision((schedule,), new_state)
        reason = f"no {' or '.join(i.event_types)} event for {in_words(i.duration)} after this one sends it"
        return Decision(
            (schedule,),
            new_state,
            (note(trigger, fact, ctx, FIRED, "deadline_set", reason, occurrence=occurrence, until=due),),
        )

    def state_to_json(self, state: Any) -> dict[str, Any]:
        assert isinstance(state, InactivityState)
        return {"last_at": state.last_at.isoformat(), "occurrence": state.occurrence}

    def state_from_json(self, data: Mapping[str, Any]) -> InactivityState:
        return InactivityState(datetime.fromisoformat(data["last_at"]), data["occurrence"])

    def plan_merge(
        self,
        survivor: Mapping[str, Any],
        merged: Mapping[str, Any],
        pending: Sequence[PendingTimer],
        *,
        merged_profile_id: str,
    ) -> MergePlan:
        """One person's latest activity: the later state of the two stays, with its lapse's timer
        (whose deadline is the later one); the other lapse's pending timer is superseded."""
        states: dict[str, Any] = {}
        for t in sorted({*survivor, *merged}):
            candidates = [s for s in (survivor.get(t), merged.get(t)) if s is not None]
            states[t] = max(candidates, key=lambda s: (s.last_at, s.occurrence))
        why = f"merge of {merged_profile_id}"
        retire = [
            RetireTimer(p.trigger_id, p.occurrence, "superseded", f"superseded by {winner} on {why}")
            for p in pending
            if (winner := getattr(states.get(p.trigger_id), "occurrence", None)) is not None
            and p.occurrence != winner
        ]
        return MergePlan(states, retire)


INACTIVITY = InactivityKind()
