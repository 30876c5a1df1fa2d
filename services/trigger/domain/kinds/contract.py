"""The contract every trigger condition kind implements, and what it answers with.

A kind is one module holding its definition (validated from what the client sent,
stored as JSON), the event types it reacts to, what an event means for a trigger of
that kind and the trigger's state for the event's person, and how two profiles'
states combine when they turn out to be one person. The planner, the validation,
the store and the servicer reach a kind only through the registry in
`services.trigger.domain.kinds`, by its name.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from relevans.kit.errors import Violations
from services.trigger.domain.events import EventFacts
from services.trigger.domain.intents import Intent, MergePlan, PendingTimer
from services.trigger.domain.triggers import Condition, RawCondition, TriggerDef


@dataclass(frozen=True, slots=True)
class Decision:
    """What one event means for one trigger and person: an intent, and the state to write back
    (None for either means nothing to do)."""

    intent: Intent | None = None
    state: Any = None


NOTHING = Decision()


class ConditionKind(Protocol):
    # The kind's name: the `condition` oneof field of the proto `Trigger`, the segment of
    # violation paths (`trigger.<name>.<field>`) and the stored `triggers.condition_kind`.
    name: str

    def validate(self, raw: RawCondition, field: str, v: Violations) -> Condition | None:
        """The normalised definition, or None with every problem added to `v` under `field`."""

    def to_json(self, condition: Condition) -> dict[str, Any]:
        """The definition as stored in `triggers.condition`; `from_json` reads it back equal."""

    def from_json(self, data: Mapping[str, Any]) -> Condition: ...

    def event_types(self, condition: Condition) -> frozenset[str]:
        """The event types a trigger of this kind reacts to; the consumer skips all others."""

    def decide(self, trigger: TriggerDef, event: EventFacts, state: Any | None) -> Decision:
        """What `event` (of one of `event_types`, not older than the trigger) means, given the
        trigger's stored state for the event's person (None when there is none yet)."""

    def plan_merge(
        self,
        survivor: Mapping[str, Any],
        merged: Mapping[str, Any],
        pending: Sequence[PendingTimer],
        *,
        merged_profile_id: str,
    ) -> MergePlan:
        """One person's states and pending timers from two profiles', for triggers of this kind
        (keyed by trigger id): the states to keep and the timers to retire."""
