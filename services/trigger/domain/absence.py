"""Absence triggers ("A and then no B within a delay"): what each event means, as pure functions.

`plan_events` takes the tenants' trigger definitions, a batch of events and the
stored per (tenant, trigger, profile) state, and returns the intents the store
applies in one transaction, plus the state to write back:

- a **start** event schedules a timer due at `event time + delay`, keyed by the
  start event's id (the occurrence), so a redelivered event schedules nothing new;
  it supersedes the profile's older pending timers of the same trigger (one
  reminder per trigger and person at a time, measured from the latest start);
- a **cancel** event cancels the profile's pending timers of that trigger that
  started at or before it, and is remembered, so a start event that arrives
  later but happened at or before the cancel is not scheduled (out-of-order
  delivery);
- events that happened before the trigger was created are ignored: creating a
  trigger does not reach back into history (a replayed stream stays quiet).

Events are applied in the order given; the state carried between them makes the
result the same whether a batch holds one event or many.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime
from typing import Any

from services.trigger.domain.triggers import TriggerDef

# (tenant_id, trigger_id, profile_id)
StateKey = tuple[str, str, str]


@dataclass(frozen=True, slots=True)
class EventFacts:
    """What the trigger service needs of an enriched event."""

    tenant_id: str
    event_id: str
    profile_id: str
    event_type: str
    occurred_at: datetime
    properties: dict[str, Any] = field(default_factory=dict)


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


@dataclass(frozen=True, slots=True)
class ScheduleTimer:
    """Insert a pending timer (nothing if it exists) and supersede older pending ones."""

    tenant_id: str
    trigger_id: str
    profile_id: str
    occurrence: str
    started_at: datetime
    due_at: datetime
    variables: dict[str, Any]


@dataclass(frozen=True, slots=True)
class CancelTimers:
    """Cancel the profile's pending timers of the trigger that started at or before `until`."""

    tenant_id: str
    trigger_id: str
    profile_id: str
    until: datetime
    reason: str


Intent = ScheduleTimer | CancelTimers


@dataclass(frozen=True, slots=True)
class Plan:
    intents: list[Intent]
    # The state to write back, only for the keys the batch changed.
    states: dict[StateKey, TriggerState]

    @property
    def schedules(self) -> list[ScheduleTimer]:
        return [i for i in self.intents if isinstance(i, ScheduleTimer)]

    @property
    def cancels(self) -> list[CancelTimers]:
        return [i for i in self.intents if isinstance(i, CancelTimers)]


def timer_variables(event: EventFacts) -> dict[str, Any]:
    """The template variables a timer carries to its delivery request."""
    return {
        "event": dict(event.properties),
        "event_type": event.event_type,
        "event_id": event.event_id,
        "event_time": event.occurred_at.isoformat(),
    }


def relevant_types(triggers: Sequence[TriggerDef]) -> set[str]:
    """The event types any of these triggers reacts to."""
    out: set[str] = set()
    for t in triggers:
        out.add(t.absence.start_event_type)
        out.add(t.absence.cancel_event_type)
    return out


def relevant_events(
    triggers_by_tenant: Mapping[str, Sequence[TriggerDef]], events: Sequence[EventFacts]
) -> list[EventFacts]:
    """The events some trigger of their tenant starts or cancels on."""
    types = {tenant: relevant_types(ts) for tenant, ts in triggers_by_tenant.items()}
    return [e for e in events if e.event_type in types.get(e.tenant_id, ())]


def plan_events(
    triggers_by_tenant: Mapping[str, Sequence[TriggerDef]],
    events: Sequence[EventFacts],
    states: Mapping[StateKey, TriggerState],
) -> Plan:
    """The intents for a batch of events, applied in order, and the resulting state."""
    current: dict[StateKey, TriggerState] = dict(states)
    changed: dict[StateKey, TriggerState] = {}
    intents: list[Intent] = []
    for event in events:
        for trigger in triggers_by_tenant.get(event.tenant_id, ()):
            intent, new_state = decide(trigger, event, current.get(_key(trigger, event), TriggerState()))
            if intent is not None:
                intents.append(intent)
            if new_state is not None:
                current[_key(trigger, event)] = new_state
                changed[_key(trigger, event)] = new_state
    return Plan(intents, changed)


def _key(trigger: TriggerDef, event: EventFacts) -> StateKey:
    return (event.tenant_id, trigger.trigger_id, event.profile_id)


def decide(
    trigger: TriggerDef, event: EventFacts, state: TriggerState
) -> tuple[Intent | None, TriggerState | None]:
    """What one event means for one trigger and the event's profile: an intent and the new state."""
    a = trigger.absence
    if event.event_type not in (a.start_event_type, a.cancel_event_type):
        return None, None
    if trigger.created_at is not None and event.occurred_at < trigger.created_at:
        return None, None
    if event.event_type == a.start_event_type:
        if state.cancelled_at_or_after(event.occurred_at):
            return None, None
        if not state.start_is_newer(event.occurred_at, event.event_id):
            return None, None
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
            return schedule, None
        return schedule, replace(state, last_start_at=event.occurred_at, last_start_occurrence=event.event_id)
    cancel = CancelTimers(
        tenant_id=event.tenant_id,
        trigger_id=trigger.trigger_id,
        profile_id=event.profile_id,
        until=event.occurred_at,
        reason=f"cancelled by {event.event_type} {event.event_id}",
    )
    if state.cancelled_at_or_after(event.occurred_at):
        return cancel, None
    return cancel, replace(state, last_cancel_at=event.occurred_at)


# ---- profile merges ------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class PendingTimer:
    """A pending timer of the surviving profile after a merge moved the other profile's timers to it."""

    trigger_id: str
    occurrence: str
    started_at: datetime


@dataclass(frozen=True, slots=True)
class RetireTimer:
    """Take a pending timer out of the race: `cancelled` or `superseded`, with the reason."""

    trigger_id: str
    occurrence: str
    status: str
    reason: str


@dataclass(frozen=True, slots=True)
class MergePlan:
    # The survivor's state per trigger, for every trigger either profile had state for.
    states: dict[str, TriggerState]
    retire: list[RetireTimer]


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
    """What merging a profile into another means for their triggers (both keyed by trigger id).

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
