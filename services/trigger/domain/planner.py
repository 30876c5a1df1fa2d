"""What a batch of events, or a merge of two profiles, means for a tenant's triggers, as pure functions.

`plan_events` takes the tenants' trigger definitions, a batch of events and the
stored per (tenant, trigger, profile) state, and returns the intents the store
applies in one transaction, plus the state to write back. What an event means for
one trigger is its condition kind's decision (`kinds`); the planner only routes:

- an event reaches the triggers of its tenant whose kind reacts to its type;
- events that happened before the trigger was created are ignored: creating a
  trigger does not reach back into history (a replayed stream stays quiet);
- events are applied in the order given, the state each decision leaves carried
  to the next, so the result is the same whether a batch holds one event or many.

`plan_merge` settles two profiles' states and pending timers the same way, each
trigger by its kind.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from services.trigger.domain.events import EventFacts
from services.trigger.domain.intents import (
    CancelTimers,
    Intent,
    MergePlan,
    PendingTimer,
    ScheduleTimer,
    StateKey,
)
from services.trigger.domain.kinds import KINDS
from services.trigger.domain.triggers import TriggerDef


@dataclass(frozen=True, slots=True)
class Plan:
    intents: list[Intent]
    # The state to write back, only for the keys the batch changed.
    states: dict[StateKey, Any]

    @property
    def schedules(self) -> list[ScheduleTimer]:
        return [i for i in self.intents if isinstance(i, ScheduleTimer)]

    @property
    def cancels(self) -> list[CancelTimers]:
        return [i for i in self.intents if isinstance(i, CancelTimers)]


def event_types(trigger: TriggerDef) -> frozenset[str]:
    """The event types a trigger reacts to, as its kind says."""
    return KINDS[trigger.condition.kind].event_types(trigger.condition)


def relevant_events(
    triggers_by_tenant: Mapping[str, Sequence[TriggerDef]], events: Sequence[EventFacts]
) -> list[EventFacts]:
    """The events some trigger of their tenant reacts to."""
    types = {tenant: set().union(*map(event_types, ts)) for tenant, ts in triggers_by_tenant.items()}
    return [e for e in events if e.event_type in types.get(e.tenant_id, ())]


def plan_events(
    triggers_by_tenant: Mapping[str, Sequence[TriggerDef]],
    events: Sequence[EventFacts],
    states: Mapping[StateKey, Any],
) -> Plan:
    """The intents for a batch of events, applied in order, and the resulting state."""
    reacting = {
        tenant: [(t, KINDS[t.condition.kind], event_types(t)) for t in ts]
        for tenant, ts in triggers_by_tenant.items()
    }
    current: dict[StateKey, Any] = dict(states)
    changed: dict[StateKey, Any] = {}
    intents: list[Intent] = []
    for event in events:
        for trigger, kind, types in reacting.get(event.tenant_id, ()):
            if event.event_type not in types:
                continue
            if trigger.created_at is not None and event.occurred_at < trigger.created_at:
                continue
            key = (event.tenant_id, trigger.trigger_id, event.profile_id)
            decision = kind.decide(trigger, event, current.get(key))
            if decision.intent is not None:
                intents.append(decision.intent)
            if decision.state is not None:
                current[key] = changed[key] = decision.state
    return Plan(intents, changed)


def plan_merge(
    kinds: Mapping[str, str],
    survivor: Mapping[str, Any],
    merged: Mapping[str, Any],
    pending: Sequence[PendingTimer],
    *,
    merged_profile_id: str,
) -> MergePlan:
    """What merging a profile into another means for their triggers (states keyed by trigger id).

    `kinds` maps each existing trigger to its kind name; each kind settles its own triggers.
    The state and timers of a trigger that no longer exists are left out: deleting a trigger
    deletes its states and cancels its timers (a timer that raced the delete is cancelled when due).
    """
    states: dict[str, Any] = {}
    retire = []
    for name in sorted(set(kinds.values())):
        mine = {t for t, k in kinds.items() if k == name}
        part = KINDS[name].plan_merge(
            {t: s for t, s in survivor.items() if t in mine},
            {t: s for t, s in merged.items() if t in mine},
            [p for p in pending if p.trigger_id in mine],
            merged_profile_id=merged_profile_id,
        )
        states.update(part.states)
        retire += part.retire
    return MergePlan(states, retire)
