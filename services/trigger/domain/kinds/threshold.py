"""The threshold kind: a measure crossing a value from below.

- **event_count**: `count` events of a type matching a condition within a rolling `window`, exact
  to the event time: the window ending at an event at t is (t - window, t]. The trigger fires
  when the count in the window ending at a matching event goes from count - 1 to count (11 toy
  page views within 7 days: the 11th in 7 days fires, a 12th does not; 11 spread so that at most
  10 fall in any 7 days never fire). It crosses again once the count has fallen below and comes
  back, as the trigger's re-entry rule allows. The state is the latest `count` matching events
  (time, id), so a redelivered event is not counted twice. An out-of-order event is inserted by
  its time and fires when the window ending at it crosses; the windows ending at later events it
  joins are not re-examined, and when older events may have been forgotten (the state is full
  and the oldest kept event is in its window) it does not fire (`out_of_order`): a message is
  rather missed than sent twice.
- **profile_value**: the profile's lead score or a counter ("score", "counter.<name>") reaching
  `value` from below, looked at on every event of the person (route `event:*`). The state is only
  whether it is at or above the value, written only when that flips.

A firing is a message due at the crossing event's time, keyed by its id. A late event counts (and
flips the state) but fires nothing.
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, ClassVar

from relevans.conditions import COUNTER_NAME_RE
from relevans.kit.errors import Violations
from services.trigger.domain.durations import duration_text, parse_duration
from services.trigger.domain.events import EventFacts, Fact, event_route
from services.trigger.domain.intents import MergePlan, PendingTimer
from services.trigger.domain.kinds.common import (
    CONDITION_FALSE,
    NOT_FIRED,
    Matcher,
    OneShotTimers,
    RawDuration,
    check_duration,
    check_event_type,
    check_matcher,
    in_words,
    matcher_from_json,
    matcher_to_json,
    note,
)
from services.trigger.domain.kinds.contract import EVERY_EVENT, NOTHING, Context, Decision
from services.trigger.domain.kinds.event import fired
from services.trigger.domain.triggers import Condition, RawCondition, TriggerDef

MAX_COUNT = 1000
MAX_VALUE = 1e15


@dataclass(frozen=True, slots=True)
class RawEventCount:
    event_type: str = ""
    condition: dict[str, Any] | None = None
    count: int = 0
    window: RawDuration = None


@dataclass(frozen=True, slots=True)
class RawProfileValue:
    field: str = ""
    value: float = 0.0


@dataclass(frozen=True, slots=True)
class RawThreshold:
    kind: ClassVar[str] = "threshold"

    event_count: RawEventCount | None = None
    profile_value: RawProfileValue | None = None


@dataclass(frozen=True, slots=True)
class EventCount:
    event_type: str
    count: int
    window: timedelta
    condition: Matcher | None = None


@dataclass(frozen=True, slots=True)
class ProfileValue:
    field: str
    value: float


@dataclass(frozen=True, slots=True)
class Threshold:
    kind: ClassVar[str] = "threshold"

    measure: EventCount | ProfileValue


@dataclass(frozen=True, slots=True)
class CountState:
    """The latest matching events (time, event id), oldest first, at most `count` of them."""

    events: tuple[tuple[datetime, str], ...] = ()


@dataclass(frozen=True, slots=True)
class ValueState:
    above: bool = False


def _threshold(condition: Condition) -> Threshold:
    assert isinstance(condition, Threshold)
    return condition


def _count_problem(value: int) -> str | None:
    if not 1 <= value <= MAX_COUNT:
        return f"must be between 1 and {MAX_COUNT}"
    return None


def _validate_count(raw: RawEventCount, field: str, v: Violations) -> EventCount | None:
    before = len(v.items)
    check_event_type(raw.event_type, f"{field}.event_type", v)
    condition = check_matcher(raw.condition, f"{field}.condition", v)
    problem = _count_problem(raw.count)
    if problem:
        v.add(f"{field}.count", problem)
    window = check_duration(raw.window, f"{field}.window", v)
    if len(v.items) > before or window is None:
        return None
    return EventCount(raw.event_type, raw.count, window, condition)


def _validate_value(raw: RawProfileValue, field: str, v: Violations) -> ProfileValue | None:
    before = len(v.items)
    name = raw.field.removeprefix("counter.")
    if raw.field != "score" and (name == raw.field or not COUNTER_NAME_RE.fullmatch(name)):
        v.add(
            f"{field}.field",
            f'must be "score" or counter.<name> with a name matching {COUNTER_NAME_RE.pattern}',
        )
    if not math.isfinite(raw.value) or abs(raw.value) > MAX_VALUE:
        v.add(f"{field}.value", f"must be a finite number between -{MAX_VALUE:.0e} and {MAX_VALUE:.0e}")
    if len(v.items) > before:
        return None
    return ProfileValue(raw.field, raw.value)


class ThresholdKind(OneShotTimers):
    name = "threshold"

    def validate(self, raw: RawCondition, field: str, v: Violations) -> Threshold | None:
        assert isinstance(raw, RawThreshold)
        if raw.event_count is not None:
            count = _validate_count(raw.event_count, f"{field}.event_count", v)
            return None if count is None else Threshold(count)
        if raw.profile_value is not None:
            value = _validate_value(raw.profile_value, f"{field}.profile_value", v)
            return None if value is None else Threshold(value)
        for measure in ("event_count", "profile_value"):
            v.add(f"{field}.{measure}", "a measure is required: one of event_count, profile_value")
        return None

    def to_json(self, condition: Condition) -> dict[str, Any]:
        m = _threshold(condition).measure
        if isinstance(m, EventCount):
            return {
                "event_count": {
                    "event_type": m.event_type,
                    "count": m.count,
                    "window": duration_text(m.window),
                    "condition": matcher_to_json(m.condition),
                }
            }
        return {"profile_value": {"field": m.field, "value": m.value}}

    def from_json(self, data: Mapping[str, Any]) -> Threshold:
        if "event_count" in data:
            c = data["event_count"]
            return Threshold(
                EventCount(
                    c["event_type"],
                    c["count"],
                    parse_duration(c["window"]),
                    matcher_from_json(c.get("condition")),
                )
            )
        p = data["profile_value"]
        return Threshold(ProfileValue(p["field"], float(p["value"])))

    def routes(self, condition: Condition, ctx: Context) -> frozenset[str]:
        m = _threshold(condition).measure
        return frozenset((event_route(m.event_type) if isinstance(m, EventCount) else EVERY_EVENT,))

    def decide(self, trigger: TriggerDef, fact: Fact, state: Any | None, ctx: Context) -> Decision:
        m = _threshold(trigger.condition).measure
        if not isinstance(fact, EventFacts):
            return NOTHING
        if isinstance(m, EventCount):
            return _decide_count(trigger, m, fact, state or CountState(), ctx)
        return _decide_value(trigger, m, fact, state or ValueState(), ctx)

    def state_to_json(self, state: Any) -> dict[str, Any]:
        if isinstance(state, CountState):
            return {"events": [[at.isoformat(), event_id] for at, event_id in state.events]}
        assert isinstance(state, ValueState)
        return {"above": state.above}

    def state_from_json(self, data: Mapping[str, Any]) -> Any:
        if "events" in data:
            return CountState(
                tuple((datetime.fromisoformat(at), event_id) for at, event_id in data["events"])
            )
        return ValueState(bool(data["above"]))

    def plan_merge(
        self,
        survivor: Mapping[str, Any],
        merged: Mapping[str, Any],
        pending: Sequence[PendingTimer],
        *,
        merged_profile_id: str,
    ) -> MergePlan:
        """Counts: both profiles' events, the latest kept (a crossing either had stays its own
        occurrence). Values: the survivor's (the merged profile's score is recomputed by the
        profile service, the next event tells where it stands)."""
        states: dict[str, Any] = {}
        for t in sorted({*survivor, *merged}):
            a, b = survivor.get(t), merged.get(t)
            if isinstance(a, CountState) or isinstance(b, CountState):
                events = sorted({*(a.events if a else ()), *(b.events if b else ())})
                states[t] = CountState(tuple(events[-MAX_COUNT:]))
            else:
                states[t] = a if a is not None else b
        return MergePlan(states, [])


def _decide_count(
    trigger: TriggerDef, m: EventCount, e: EventFacts, state: CountState, ctx: Context
) -> Decision:
    if m.condition is not None and not m.condition.matches(e):
        reason = f"the {e.event_type} event did not match the condition"
        return Decision(notes=(note(trigger, e, ctx, NOT_FIRED, CONDITION_FALSE, reason),))
    entry = (e.occurred_at, e.event_id)
    events = list(state.events)
    if any(event_id == e.event_id for _, event_id in events):
        return NOTHING  # redelivered: counted once
    start = e.occurred_at - m.window
    before = sum(1 for at, _ in events if start < at <= e.occurred_at)
    full = len(events) >= m.count
    bisect.insort(events, entry)
    new_state = CountState(tuple(events[-m.count :]))
    if before != m.count - 1:
        reason = (
            f"{before + 1} matching {m.event_type} events within {in_words(m.window)}; "
            f"it fires when that count reaches {m.count} from below"
        )
        return Decision(state=new_state, notes=(note(trigger, e, ctx, NOT_FIRED, CONDITION_FALSE, reason),))
    if full and state.events and state.events[0][0] > start and e.occurred_at < state.events[-1][0]:
        reason = "the event arrived out of order and older events it would count with are no longer known"
        return Decision(state=new_state, notes=(note(trigger, e, ctx, NOT_FIRED, "out_of_order", reason),))
    decision = fired(
        trigger,
        e,
        ctx,
        "threshold_crossed",
        f"{m.count} matching {m.event_type} events within {in_words(m.window)}",
    )
    return Decision(decision.intents, new_state, decision.notes)


def _decide_value(
    trigger: TriggerDef, m: ProfileValue, e: EventFacts, state: ValueState, ctx: Context
) -> Decision:
    profile = e.profile()
    current = (
        profile.score if m.field == "score" else profile.counters.get(m.field.removeprefix("counter."), 0.0)
    )
    above = current >= m.value
    if above == state.above:
        return NOTHING
    if not above:
        return Decision(state=ValueState(False))
    decision = fired(
        trigger, e, ctx, "threshold_crossed", f"{m.field} reached {current:g} (at least {m.value:g})"
    )
    return Decision(decision.intents, ValueState(True), decision.notes)


THRESHOLD = ThresholdKind()
