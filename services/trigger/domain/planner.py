"""What a batch of facts, or a merge of two profiles, means for a tenant's triggers, as pure functions.

`plan_facts` takes the tenants' trigger definitions, a batch of facts (events, segment changes,
trait changes), the stored per (tenant, trigger, profile) state and each tenant's decision
context, and returns the intents the store applies in one transaction, the state to write back
and the notes for the decision trace. What a fact means for one trigger is its condition kind's
decision (`kinds`); the planner only routes:

- a fact reaches the triggers of its tenant whose kind lists its route key (`event:<type>`,
  `segment:<id>`, `trait:<name>`), and every event reaches those that list `event:*`;
- facts are applied in the order given, the state each decision leaves carried to the next, so
  the result is the same whether a batch holds one fact or many;
- how old a fact may be is each kind's late rule (`Context.is_late`): an event from before the
  trigger was created counts like any other.

`plan_merge` settles two profiles' states and pending timers the same way, each trigger by its kind.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from services.trigger.domain.events import EventFacts, Fact
from services.trigger.domain.intents import (
    CancelTimers,
    Intent,
    MergePlan,
    Note,
    PendingTimer,
    ScheduleTimer,
    StateKey,
    WithdrawMessages,
)
from services.trigger.domain.kinds import KINDS
from services.trigger.domain.kinds.contract import EVERY_EVENT, ConditionKind, Context
from services.trigger.domain.triggers import TriggerDef


@dataclass(frozen=True, slots=True)
class Plan:
    intents: list[Intent]
    # The state to write back, only for the keys the batch changed.
    states: dict[StateKey, Any]
    notes: list[Note]

    @property
    def schedules(self) -> list[ScheduleTimer]:
        return [i for i in self.intents if isinstance(i, ScheduleTimer)]

    @property
    def cancels(self) -> list[CancelTimers]:
        return [i for i in self.intents if isinstance(i, CancelTimers)]

    @property
    def withdrawals(self) -> list[WithdrawMessages]:
        return [i for i in self.intents if isinstance(i, WithdrawMessages)]


def routes(trigger: TriggerDef, ctx: Context) -> frozenset[str]:
    """The route keys of the facts a trigger reacts to, as its kind says."""
    return KINDS[trigger.condition.kind].routes(trigger.condition, ctx)


class _Router:
    """One tenant's triggers by route key, in the order given; built once per batch."""

    def __init__(self, triggers: Sequence[TriggerDef], ctx: Context) -> None:
        self.by_route: dict[str, list[int]] = {}
        self.triggers = [(t, KINDS[t.condition.kind]) for t in triggers]
        for i, t in enumerate(triggers):
            for route in routes(t, ctx):
                self.by_route.setdefault(route, []).append(i)
        self.cache: dict[str, list[tuple[TriggerDef, ConditionKind]]] = {}

    def reacting(self, fact: Fact) -> list[tuple[TriggerDef, ConditionKind]]:
        route = fact.route
        found = self.cache.get(route)
        if found is None:
            indices = set(self.by_route.get(route, ()))
            if isinstance(fact, EventFacts):
                indices.update(self.by_route.get(EVERY_EVENT, ()))
            found = self.cache[route] = [self.triggers[i] for i in sorted(indices)]
        return found


def _routers(
    triggers_by_tenant: Mapping[str, Sequence[TriggerDef]], contexts_by_tenant: Mapping[str, Context]
) -> dict[str, _Router]:
    return {
        tenant: _Router(ts, contexts_by_tenant[tenant]) for tenant, ts in triggers_by_tenant.items() if ts
    }


def relevant_facts(
    triggers_by_tenant: Mapping[str, Sequence[TriggerDef]],
    facts: Sequence[Fact],
    contexts_by_tenant: Mapping[str, Context],
) -> list[Fact]:
    """The facts some trigger of their tenant reacts to (the store reads state only for these)."""
    routers = _routers(triggers_by_tenant, contexts_by_tenant)
    return [f for f in facts if (r := routers.get(f.tenant_id)) is not None and r.reacting(f)]


def plan_facts(
    triggers_by_tenant: Mapping[str, Sequence[TriggerDef]],
    facts: Sequence[Fact],
    states: Mapping[StateKey, Any],
    contexts_by_tenant: Mapping[str, Context],
) -> Plan:
    """The intents and notes for a batch of facts, applied in order, and the resulting state.
    `contexts_by_tenant` holds a context for every tenant with triggers."""
    routers = _routers(triggers_by_tenant, contexts_by_tenant)
    # The state each decision leaves, over the stored ones (read only for the keys decided).
    changed: dict[StateKey, Any] = {}
    intents: list[Intent] = []
    notes: list[Note] = []
    for fact in facts:
        router = routers.get(fact.tenant_id)
        if router is None:
            continue
        ctx = contexts_by_tenant[fact.tenant_id]
        for trigger, kind in router.reacting(fact):
            key = (fact.tenant_id, trigger.trigger_id, fact.profile_id)
            state = changed.get(key)
            decision = kind.decide(trigger, fact, states.get(key) if state is None else state, ctx)
            intents.extend(decision.intents)
            notes.extend(decision.notes)
            if decision.state is not None:
                changed[key] = decision.state
    return Plan(intents, changed, notes)


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
