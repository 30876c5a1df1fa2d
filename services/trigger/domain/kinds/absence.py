"""The absence kind ("A and then no B within a delay": the abandoned cart).

What each event means for an absence trigger and one person:

- a **start** event schedules a timer due at `event time + delay`, keyed by the
  start event's id (the occurrence), so a redelivered event schedules nothing new;
  it supersedes the profile's older pending timers of the same trigger (one
  reminder per trigger and person at a time, counted from the latest start);
- a **cancel** event cancels the profile's pending timers of that trigger that
  started at or before it, and is remembered, so a start event that arrives
  later but happened at or before the cancel is not scheduled (out-of-order
  delivery).

The state kept per (tenant, trigger, profile) is the latest start scheduled and
the latest cancel seen (`TriggerState`, the columns of `trigger_states`).
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from datetime import datetime, timedelta
from typing import Any, ClassVar

from relevans.kit.errors import Violations
from services.trigger.domain.durations import duration_text, parse_duration
from services.trigger.domain.events import EventFacts, timer_variables
from services.trigger.domain.intents import CancelTimers, MergePlan, PendingTimer, RetireTimer, ScheduleTimer
from services.trigger.domain.kinds.contract import NOTHING, Decision
from services.trigger.domain.triggers import Condition, RawCondition, TriggerDef

# The event types the profile service accepts; a trigger on any other type could never fire.
EVENT_TYPE_RE = re.compile(r"^[a-z][a-z0-9_.:-]{0,63}$")
MIN_DELAY = timedelta(seconds=1)
MAX_DELAY = timedelta(days=90)


@dataclass(frozen=True, slots=True)
class RawAbsence:
    kind: ClassVar[str] = "absence"

    start_event_type: str = ""
    cancel_event_type: str = ""
    delay: timedelta | None = None
    # True when the client sent a Duration that is not a valid duration (mixed signs, nanos overflow).
    bad_delay: bool = False


@dataclass(frozen=True, slots=True)
class Absence:
    """`start_event_type` not followed by `cancel_event_type` within `delay` (the abandoned cart)."""

    kind: ClassVar[str] = "absence"

    start_event_type: str
    cancel_event_type: str
    delay: timedelta


@dataclass(frozen=True, slots=True)
class TriggerState:
    """Per (tenant, trigger, profile): the latest start scheduled and the latest cancel seen."""

    last_start_at: datetime | None = None
    last_start_occurrence: str | None = None
    last_cancel_at: datetime | None = None

    def start_is_newer(self, at: datetime, occurrence: str) -> bool:
        """True unless a later start (or this very one) has already been scheduled."""
        if self.last_start_at is None or self.last_start_occurrence is None:
            return True
        return (at, occurrence) >= (self.last_start_at, self.last_start_occurrence)

    def cancelled_at_or_after(self, at: datetime) -> bool:
        return self.last_cancel_at is not None and at <= self.last_cancel_at


# ---- definition ----------------------------------------------------------------------------------


def _event_type(value: str, field: str, v: Violations) -> None:
    if not value:
        v.add(field, "is required")
    elif not EVENT_TYPE_RE.match(value):
        v.add(field, f"must be an event type matching {EVENT_TYPE_RE.pattern}")


def validate(raw: RawCondition, field: str, v: Violations) -> Absence | None:
    """A normalised absence, or None with every problem added to `v`."""
    assert isinstance(raw, RawAbsence)
    before = len(v.items)
    _event_type(raw.start_event_type, f"{field}.start_event_type", v)
    _event_type(raw.cancel_event_type, f"{field}.cancel_event_type", v)
    if raw.start_event_type and raw.start_event_type == raw.cancel_event_type:
        v.add(f"{field}.cancel_event_type", "must differ from start_event_type")
    if raw.bad_delay:
        v.add(f"{field}.delay", "is not a valid duration")
    elif raw.delay is None:
        v.add(f"{field}.delay", "is required")
    elif not MIN_DELAY <= raw.delay <= MAX_DELAY:
        v.add(f"{field}.delay", "must be between 1 second and 90 days")
    if len(v.items) > before or raw.delay is None:
        return None
    return Absence(raw.start_event_type, raw.cancel_event_type, raw.delay)


def to_json(condition: Condition) -> dict[str, Any]:
    a = _absence(condition)
    return {
        "start_event_type": a.start_event_type,
        "cancel_event_type": a.cancel_event_type,
        "delay": duration_text(a.delay),
    }


def from_json(data: Mapping[str, Any]) -> Absence:
    return Absence(data["start_event_type"], data["cancel_event_type"], parse_duration(data["delay"]))


def event_types(condition: Condition) -> frozenset[str]:
    a = _absence(condition)
    return frozenset((a.start_event_type, a.cancel_event_type))


def _absence(condition: Condition) -> Absence:
    assert isinstance(condition, Absence)
    return condition


# ---- events --------------------------------------------------------------------------------------


def decide(trigger: TriggerDef, event: EventFacts, stored: Any | None) -> Decision:
    """A start schedules (unless a cancel at or after it, or a newer start, was seen); a cancel cancels."""
    a = _absence(trigger.condition)
    state: TriggerState = stored or TriggerState()
    if event.event_type == a.start_event_type:
        if state.cancelled_at_or_after(event.occurred_at):
            return NOTHING
        if not state.start_is_newer(event.occurred_at, event.event_id):
            return NOTHING
        schedule = ScheduleTimer(
            tenant_id=event.tenant_id,
            trigger_id=trigger.trigger_id,
            profile_id=event.profile_id,
            occurrence=event.event_id,
            started_at=event.occurred_at,
            due_at=event.occurred_at + a.delay,
            variables=timer_variables(event),
        )
        if (state.last_start_at, state.last_start_occurrence) == (event.occurred_at, event.event_id):
            return Decision(schedule)
        return Decision(
            schedule, replace(state, last_start_at=event.occurred_at, last_start_occurrence=event.event_id)
        )
    cancel = CancelTimers(
        tenant_id=event.tenant_id,
        trigger_id=trigger.trigger_id,
        profile_id=event.profile_id,
        until=event.occurred_at,
        reason=f"cancelled by {event.event_type} {event.event_id}",
    )
    if state.cancelled_at_or_after(event.occurred_at):
        return Decision(cancel)
    return Decision(cancel, replace(state, last_cancel_at=event.occurred_at))


# ---- profile merges ------------------------------------------------------------------------------


def merge_states(a: TriggerState, b: TriggerState) -> TriggerState:
    """One person's state from two profiles' states: the latest start and the latest cancel of either."""
    start = a
    b_start, b_occurrence = b.last_start_at, b.last_start_occurrence
    if b_start is not None and b_occurrence is not None and a.start_is_newer(b_start, b_occurrence):
        start = b
    cancels = [s.last_cancel_at for s in (a, b) if s.last_cancel_at is not None]
    return TriggerState(
        last_start_at=start.last_start_at,
        last_start_occurrence=start.last_start_occurrence,
        last_cancel_at=max(cancels) if cancels else None,
    )


def plan_merge(
    survivor: Mapping[str, TriggerState],
    merged: Mapping[str, TriggerState],
    pending: Sequence[PendingTimer],
    *,
    merged_profile_id: str,
) -> MergePlan:
    """What merging a profile into another means for their absence triggers (keyed by trigger id).

    The merged state is what one profile would hold had it seen both profiles' events, and the
    pending timers (the survivor's and the moved ones) are settled by the rules events follow:
    a timer that started at or before the latest cancel of either profile is cancelled, and of
    the rest only the newest start (by start time, then occurrence) stays pending, the others are
    superseded — at most one reminder per trigger and person, for the newest cart.
    """
    why = f"merge of {merged_profile_id}"
    states = {
        t: merge_states(survivor.get(t, TriggerState()), merged.get(t, TriggerState()))
        for t in sorted({*survivor, *merged})
    }
    retire: list[RetireTimer] = []
    by_trigger: dict[str, list[PendingTimer]] = {}
    for p in pending:
        by_trigger.setdefault(p.trigger_id, []).append(p)
    for trigger_id, timers in by_trigger.items():
        state = states.get(trigger_id, TriggerState())
        live: list[PendingTimer] = []
        for t in timers:
            if state.cancelled_at_or_after(t.started_at):
                retire.append(RetireTimer(trigger_id, t.occurrence, "cancelled", f"cancelled on {why}"))
            else:
                live.append(t)
        if not live:
            continue
        newest = max(live, key=lambda t: (t.started_at, t.occurrence))
        if state.start_is_newer(newest.started_at, newest.occurrence):
            state = replace(state, last_start_at=newest.started_at, last_start_occurrence=newest.occurrence)
            states[trigger_id] = state
        winner = state.last_start_occurrence
        retire += [
            RetireTimer(trigger_id, t.occurrence, "superseded", f"superseded by {winner} on {why}")
            for t in live
            if t.occurrence != winner
        ]
    return MergePlan(states, retire)


class AbsenceKind:
    """The absence kind behind the registry's contract (its functions are this module's)."""

    name = "absence"

    validate = staticmethod(validate)
    to_json = staticmethod(to_json)
    from_json = staticmethod(from_json)
    event_types = staticmethod(event_types)
    decide = staticmethod(decide)
    plan_merge = staticmethod(plan_merge)


ABSENCE = AbsenceKind()
