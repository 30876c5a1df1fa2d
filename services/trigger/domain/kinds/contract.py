"""The contract every trigger condition kind implements, and what it answers with.

A kind is one module holding its definition (validated from what the client sent, stored as
JSON), the facts it reacts to (route keys: `event:<type>`, `event:*`, `segment:<id>`, `trait:<name>`),
what a fact means for a trigger of that kind and the trigger's state for the fact's person, how
its state is stored, what follows a firing (a yearly date schedules the next year), and how two
profiles' states combine when they turn out to be one person. The planner, the validation, the
store and the servicer reach a kind only through the registry in
`services.trigger.domain.kinds`, by its name.

Kinds are pure: they see the clock and the tenant's settings through `Context` and speak in
intents (`domain.intents`); the store applies them.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, Protocol

from relevans.kit.errors import Violations
from services.trigger.domain.events import Fact
from services.trigger.domain.intents import Intent, MergePlan, Note, PendingTimer, ScheduleTimer
from services.trigger.domain.triggers import Condition, RawCondition, TriggerDef

DEFAULT_LATE_EVENT_WINDOW = timedelta(hours=24)

# The route of a kind that must see every event (a threshold on the lead score).
EVERY_EVENT = "event:*"


@dataclass(frozen=True, slots=True)
class Context:
    """What a decision may depend on besides the fact and the state: the time it is made and
    the tenant's settings."""

    now: datetime
    # A fact that happened longer ago than this when it is decided is late: it still counts
    # toward windows and moves deadlines, but fires nothing on its own.
    late_event_window: timedelta = DEFAULT_LATE_EVENT_WINDOW
    default_time_zone: str = "UTC"
    time_zone_trait: str = "time_zone"

    def is_late(self, occurred_at: datetime) -> bool:
        return occurred_at < self.now - self.late_event_window


@dataclass(frozen=True, slots=True)
class Decision:
    """What one fact means for one trigger and person: intents, the state to write back (None:
    unchanged) and notes for the decision trace."""

    intents: tuple[Intent, ...] = ()
    state: Any = None
    notes: tuple[Note, ...] = ()


NOTHING = Decision()


@dataclass(frozen=True, slots=True)
class FiredTimer:
    """A timer that has just been handed to delivery, as a kind with recurring timers sees it."""

    tenant_id: str
    trigger_id: str
    profile_id: str
    occurrence: str
    due_at: datetime
    variables: Mapping[str, Any]


class ConditionKind(Protocol):
    # The kind's name: the `condition` oneof field of the proto `Trigger`, the segment of
    # violation paths (`trigger.<name>.<field>`) and the stored `triggers.condition_kind`.
    name: str

    def validate(self, raw: RawCondition, field: str, v: Violations) -> Condition | None:
        """The normalised definition, or None with every problem added to `v` under `field`."""

    def to_json(self, condition: Condition) -> dict[str, Any]:
        """The definition as stored in `triggers.condition`; `from_json` reads it back equal."""

    def from_json(self, data: Mapping[str, Any]) -> Condition: ...

    def routes(self, condition: Condition, ctx: Context) -> frozenset[str]:
        """The route keys of the facts a trigger of this kind reacts to; it sees no others
        (`event:*`: every event). `ctx` for what the tenant's settings name (the time zone trait)."""

    def decide(self, trigger: TriggerDef, fact: Fact, state: Any | None, ctx: Context) -> Decision:
        """What `fact` (on one of `routes`) means, given the trigger's stored state for the
        fact's person (None when there is none yet)."""

    def state_to_json(self, state: Any) -> dict[str, Any]:
        """A state as stored in `trigger_states.state`; `state_from_json` reads it back equal."""

    def state_from_json(self, data: Mapping[str, Any]) -> Any: ...

    def arming_trait(self, condition: Condition) -> str | None:
        """The trait whose known values schedule timers the moment a trigger is created (a date
        kind's date trait: people already holding a date get their timer), or None."""

    def after_fire(self, trigger: TriggerDef, fired: FiredTimer, ctx: Context) -> ScheduleTimer | None:
        """The timer that follows a firing (a yearly date's next year), or None."""

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
