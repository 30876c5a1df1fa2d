"""What the kinds share: checks of event types and durations, trigger conditions compiled once,
timestamps and durations in stored JSON, and notes for the decision trace."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from relevans.conditions import (
    EVENT_TYPE_RE,
    Condition,
    Predicate,
    ProfileView,
    compile_condition,
    needs_profile,
    parse_condition,
    to_dict,
)
from relevans.kit.errors import InvalidArgument, Violations
from services.trigger.domain.events import EventFacts, Fact, SegmentChange
from services.trigger.domain.intents import MergePlan, Note, PendingTimer, ScheduleTimer
from services.trigger.domain.kinds.contract import Context, FiredTimer
from services.trigger.domain.triggers import Condition as Definition
from services.trigger.domain.triggers import TriggerDef

MIN_DURATION = timedelta(seconds=1)
MAX_DURATION = timedelta(days=365)

FIRED, NOT_FIRED, CANCELLED = "fired", "not_fired", "cancelled"
CONDITION_FALSE, LATE_EVENT = "condition_false", "late_event"


class InvalidDuration:
    """A proto Duration the client sent that is no duration (mixed signs, nanos out of range)."""

    __slots__ = ()


INVALID_DURATION = InvalidDuration()
RawDuration = timedelta | InvalidDuration | None


def check_event_type(value: str, path: str, v: Violations) -> bool:
    if not value:
        v.add(path, "is required")
        return False
    if not EVENT_TYPE_RE.fullmatch(value):  # fullmatch: "$" alone would pass "page_view\n"
        v.add(path, f"must be an event type matching {EVENT_TYPE_RE.pattern}")
        return False
    return True


def check_duration(value: RawDuration, path: str, v: Violations) -> timedelta | None:
    """A duration between 1 second and 365 days, or None with the problem added."""
    if isinstance(value, InvalidDuration):
        v.add(path, "is not a valid duration")
    elif value is None:
        v.add(path, "is required")
    elif not MIN_DURATION <= value <= MAX_DURATION:
        v.add(path, "must be between 1 second and 365 days")
    else:
        return value
    return None


@dataclass(frozen=True, slots=True)
class Matcher:
    """A trigger condition, parsed and compiled once when its definition is made or loaded.

    Equal when their trees are; the closure is not compared."""

    tree: Condition
    predicate: Predicate = field(init=False, compare=False, repr=False)
    # False for a condition only on `event.*` fields: the profile is then never decoded.
    profiled: bool = field(init=False, compare=False, repr=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "predicate", compile_condition(self.tree))
        object.__setattr__(self, "profiled", needs_profile(self.tree))

    def matches(self, event: EventFacts) -> bool:
        if self.profiled:
            profile = event.profile()
            view = ProfileView(
                traits=profile.traits,
                tags=profile.tags,
                counters=profile.counters,
                score=profile.score,
                consents=profile.consents,
                last_seen=profile.last_seen,
                window_counts=profile.window_counts,
                event=event.properties,
            )
        else:
            view = ProfileView(event=event.properties)
        return self.predicate(view)

    def to_json(self) -> dict[str, object]:
        return to_dict(self.tree)


def check_matcher(data: dict[str, Any] | None, path: str, v: Violations) -> Matcher | None:
    """The condition at `path` (None when unset: every event matches), its violations added to `v`."""
    if data is None:
        return None
    try:
        return Matcher(parse_condition(data, path, trigger=True))
    except InvalidArgument as e:
        v.items.extend(e.violations)
        return None


def matcher_from_json(data: dict[str, Any] | None) -> Matcher | None:
    return None if data is None else Matcher(parse_condition(data, "condition", trigger=True))


def matcher_to_json(m: Matcher | None) -> dict[str, object] | None:
    return None if m is None else m.to_json()


# ---- stored JSON ---------------------------------------------------------------------------------


def time_text(at: datetime | None) -> str | None:
    return None if at is None else at.isoformat()


def parse_time(text: str | None) -> datetime | None:
    return None if text is None else datetime.fromisoformat(text)


# ---- the decision trace --------------------------------------------------------------------------


def fact_event_id(fact: Fact) -> str:
    """The event (or profile change) a decision is about, as the trace names it."""
    if isinstance(fact, EventFacts | SegmentChange):
        return fact.event_id
    return fact.change_id


def note(
    trigger: TriggerDef,
    fact: Fact,
    ctx: Context,
    outcome: str,
    reason_code: str,
    reason: str,
    *,
    occurrence: str = "",
    until: datetime | None = None,
) -> Note:
    return Note(
        tenant_id=fact.tenant_id,
        trigger_id=trigger.trigger_id,
        profile_id=fact.profile_id,
        outcome=outcome,
        reason_code=reason_code,
        reason=reason,
        at=ctx.now,
        event_id=fact_event_id(fact),
        occurrence=occurrence,
        until=until,
    )


def in_words(d: timedelta) -> str:
    """A duration for people: "3 days 4 hours", "25 minutes", "12 seconds"."""
    seconds = int(d.total_seconds())
    parts = []
    for unit, size in (("day", 86_400), ("hour", 3_600), ("minute", 60), ("second", 1)):
        n, seconds = divmod(seconds, size)
        if n:
            parts.append(f"{n} {unit}{'' if n == 1 else 's'}")
        if len(parts) == 2:
            break
    return " ".join(parts) or "0 seconds"


def late_note(trigger: TriggerDef, fact: Fact, ctx: Context, *, occurrence: str = "") -> Note:
    """The trace entry of a late fact: it counted, but fires nothing on its own."""
    return note(
        trigger,
        fact,
        ctx,
        NOT_FIRED,
        LATE_EVENT,
        f"it happened {in_words(ctx.now - fact.occurred_at)} before it reached the trigger, more than the "
        f"late-event window of {in_words(ctx.late_event_window)}: it counts, but fires nothing",
        occurrence=occurrence,
    )


class OneShotTimers:
    """What most kinds answer: no timer is armed when a trigger is created, none follows a firing."""

    def arming_trait(self, condition: Definition) -> str | None:
        return None

    def after_fire(self, trigger: TriggerDef, fired: FiredTimer, ctx: Context) -> ScheduleTimer | None:
        return None


class Stateless(OneShotTimers):
    """A kind whose facts each fire on their own: no per-person state, nothing to settle on a merge
    (each fact is its own occurrence)."""

    def state_to_json(self, state: Any) -> dict[str, Any]:
        return {}

    def state_from_json(self, data: Mapping[str, Any]) -> Any:
        return None

    def plan_merge(
        self,
        survivor: Mapping[str, Any],
        merged: Mapping[str, Any],
        pending: Sequence[PendingTimer],
        *,
        merged_profile_id: str,
    ) -> MergePlan:
        return MergePlan({}, [])
