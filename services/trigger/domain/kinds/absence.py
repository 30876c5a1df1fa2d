"""The absence kind ("A and then no B within a delay": the abandoned cart).

What each event means for an absence trigger and one person:

- a **start** event schedules a timer due at `event time + delay`, keyed by the start event's id
  (the occurrence), carrying the start event's properties (`event.<property>` in the template); it
  supersedes the profile's older pending timers of the trigger (one reminder per trigger and person
  at a time, for the newest start). A start older than the newest one scheduled is ignored;
- a **cancel** event (matching `cancel_condition`, when set; one that does not is ignored) cancels
  the pending timers that started at or before it; with `match_properties` (["cart_id"]) only those
  whose start event had the same values of those properties (a missing property counts as null).
  It is remembered per match key, so a start that arrives later but happened at or before a cancel
  for its key is not scheduled (out-of-order delivery). The memory keeps the
  `MAX_REMEMBERED_CANCELS` latest keys. On a trigger whose channel is the web (a banner that
  waits for the person's next visit), a cancel not seen before also asks delivery to withdraw
  the banners of reminders it covers that have fired (`WithdrawMessages`);
- a late start (older than the late-event window) whose reminder would already be due schedules
  nothing; a late cancel still cancels.

The state kept per (tenant, trigger, profile) is `TriggerState`: the latest start scheduled and
the latest cancel seen per match key.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from datetime import datetime, timedelta
from typing import Any, ClassVar

from relevans.conditions import PROPERTY_NAME_RE
from relevans.kit.errors import Violations
from services.trigger.domain.durations import duration_text, parse_duration
from services.trigger.domain.events import EventFacts, Fact, event_route, timer_variables
from services.trigger.domain.intents import (
    CancelTimers,
    MergePlan,
    Note,
    PendingTimer,
    RetireTimer,
    ScheduleTimer,
    WithdrawMessages,
)
from services.trigger.domain.kinds.common import (
    CANCELLED,
    FIRED,
    Matcher,
    OneShotTimers,
    RawDuration,
    check_duration,
    check_event_type,
    check_matcher,
    late_note,
    matcher_from_json,
    matcher_to_json,
    note,
    parse_time,
    time_text,
)
from services.trigger.domain.kinds.contract import NOTHING, Context, Decision
from services.trigger.domain.triggers import Condition, RawCondition, TriggerDef

MAX_MATCH_PROPERTIES = 10
# The channel whose messages wait to be seen (a banner), so a cancel can still take them back.
WAITING_CHANNEL = "web"
# The reason code of a withdrawal asked for by a cancel event.
WITHDRAWN_BY_CANCEL = "cancelled"
MAX_REMEMBERED_CANCELS = 32

# The values of the match properties of an event, in the order the definition names them.
Key = tuple[Any, ...]


@dataclass(frozen=True, slots=True)
class RawAbsence:
    kind: ClassVar[str] = "absence"

    start_event_type: str = ""
    cancel_event_type: str = ""
    delay: RawDuration = None
    cancel_condition: dict[str, Any] | None = None
    match_properties: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class Absence:
    """`start_event_type` not followed by a matching `cancel_event_type` within `delay`."""

    kind: ClassVar[str] = "absence"

    start_event_type: str
    cancel_event_type: str
    delay: timedelta
    cancel_condition: Matcher | None = None
    match_properties: tuple[str, ...] = ()

    def key(self, event: EventFacts) -> Key:
        return tuple(event.properties.get(p) for p in self.match_properties)


@dataclass(frozen=True, slots=True)
class TriggerState:
    """Per (tenant, trigger, profile): the latest start scheduled (with its match key) and the
    latest cancel seen per match key, oldest first."""

    last_start_at: datetime | None = None
    last_start_occurrence: str | None = None
    last_start_key: Key = ()
    cancels: tuple[tuple[Key, datetime], ...] = ()

    def start_is_newer(self, at: datetime, occurrence: str) -> bool:
        """True unless a later start (or this very one) has already been scheduled."""
        if self.last_start_at is None or self.last_start_occurrence is None:
            return True
        return (at, occurrence) >= (self.last_start_at, self.last_start_occurrence)

    def cancelled_at_or_after(self, at: datetime, key: Key) -> bool:
        return any(k == key and at <= when for k, when in self.cancels)

    def with_cancel(self, key: Key, at: datetime) -> TriggerState:
        """This state remembering a cancel (the later of it and one already seen for its key)."""
        kept = [(k, when) for k, when in self.cancels if k != key]
        latest = max([at, *(when for k, when in self.cancels if k == key)])
        kept.append((key, latest))
        kept.sort(key=lambda c: c[1])
        return replace(self, cancels=tuple(kept[-MAX_REMEMBERED_CANCELS:]))


def _absence(condition: Condition) -> Absence:
    assert isinstance(condition, Absence)
    return condition


def merge_states(a: TriggerState, b: TriggerState) -> TriggerState:
    """One person's state from two profiles' states: the latest start and every key's latest cancel."""
    start = a
    b_start, b_occurrence = b.last_start_at, b.last_start_occurrence
    if b_start is not None and b_occurrence is not None and a.start_is_newer(b_start, b_occurrence):
        start = b
    out = TriggerState(start.last_start_at, start.last_start_occurrence, start.last_start_key)
    for key, at in (*a.cancels, *b.cancels):
        out = out.with_cancel(key, at)
    return out


class AbsenceKind(OneShotTimers):
    name = "absence"

    def validate(self, raw: RawCondition, field: str, v: Violations) -> Absence | None:
        assert isinstance(raw, RawAbsence)
        before = len(v.items)
        check_event_type(raw.start_event_type, f"{field}.start_event_type", v)
        check_event_type(raw.cancel_event_type, f"{field}.cancel_event_type", v)
        if raw.start_event_type and raw.start_event_type == raw.cancel_event_type:
            v.add(f"{field}.cancel_event_type", "must differ from start_event_type")
        delay = check_duration(raw.delay, f"{field}.delay", v)
        cancel_condition = check_matcher(raw.cancel_condition, f"{field}.cancel_condition", v)
        if len(raw.match_properties) > MAX_MATCH_PROPERTIES:
            v.add(f"{field}.match_properties", f"must have at most {MAX_MATCH_PROPERTIES} names")
        else:
            for i, name in enumerate(raw.match_properties):
                if not PROPERTY_NAME_RE.fullmatch(name):
                    v.add(f"{field}.match_properties[{i}]", f"must match {PROPERTY_NAME_RE.pattern}")
                elif name in raw.match_properties[:i]:
                    v.add(f"{field}.match_properties[{i}]", "is named twice")
        if len(v.items) > before or delay is None:
            return None
        return Absence(
            raw.start_event_type, raw.cancel_event_type, delay, cancel_condition, tuple(raw.match_properties)
        )

    def to_json(self, condition: Condition) -> dict[str, Any]:
        a = _absence(condition)
        return {
            "start_event_type": a.start_event_type,
            "cancel_event_type": a.cancel_event_type,
            "delay": duration_text(a.delay),
            "cancel_condition": matcher_to_json(a.cancel_condition),
            "match_properties": list(a.match_properties),
        }

    def from_json(self, data: Mapping[str, Any]) -> Absence:
        return Absence(
            data["start_event_type"],
            data["cancel_event_type"],
            parse_duration(data["delay"]),
            matcher_from_json(data.get("cancel_condition")),
            tuple(data.get("match_properties", ())),
        )

    def routes(self, condition: Condition, ctx: Context) -> frozenset[str]:
        a = _absence(condition)
        return frozenset((event_route(a.start_event_type), event_route(a.cancel_event_type)))

    def decide(self, trigger: TriggerDef, fact: Fact, state: Any | None, ctx: Context) -> Decision:
        a = _absence(trigger.condition)
        if not isinstance(fact, EventFacts):
            return NOTHING
        current: TriggerState = state or TriggerState()
        if fact.event_type == a.start_event_type:
            return self._start(trigger, a, fact, current, ctx)
        return self._cancel(trigger, a, fact, current, ctx)

    def _start(
        self, trigger: TriggerDef, a: Absence, e: EventFacts, state: TriggerState, ctx: Context
    ) -> Decision:
        key = a.key(e)
        if state.cancelled_at_or_after(e.occurred_at, key):
            reason = f"a {a.cancel_event_type} event at or after it was seen first"
            return Decision(
                notes=(note(trigger, e, ctx, CANCELLED, "cancel_event", reason, occurrence=e.event_id),)
            )
        if not state.start_is_newer(e.occurred_at, e.event_id):
            return NOTHING
        redelivered = (state.last_start_at, state.last_start_occurrence) == (e.occurred_at, e.event_id)
        new_state = (
            None
            if redelivered
            else replace(
                state, last_start_at=e.occurred_at, last_start_occurrence=e.event_id, last_start_key=key
            )
        )
        due = e.occurred_at + a.delay
        if ctx.is_late(e.occurred_at) and due <= ctx.now:
            return Decision(state=new_state, notes=(late_note(trigger, e, ctx, occurrence=e.event_id),))
        schedule = ScheduleTimer(
            tenant_id=e.tenant_id,
            trigger_id=trigger.trigger_id,
            profile_id=e.profile_id,
            occurrence=e.event_id,
            started_at=e.occurred_at,
            due_at=due,
            variables=timer_variables(e),
            supersede=True,
        )
        if redelivered:  # the first delivery's note is in the trace already
            return Decision((schedule,))
        reason = f"{a.start_event_type} with no {a.cancel_event_type} within {duration_text(a.delay)} yet"
        fired = note(trigger, e, ctx, FIRED, "start_event", reason, occurrence=e.event_id, until=due)
        return Decision((schedule,), new_state, (fired,))

    def _cancel(
        self, trigger: TriggerDef, a: Absence, e: EventFacts, state: TriggerState, ctx: Context
    ) -> Decision:
        if a.cancel_condition is not None and not a.cancel_condition.matches(e):
            return NOTHING
        key = a.key(e)
        cancel = CancelTimers(
            tenant_id=e.tenant_id,
            trigger_id=trigger.trigger_id,
            profile_id=e.profile_id,
            until=e.occurred_at,
            reason=f"cancelled by {e.event_type} {e.event_id}",
            match=tuple(zip(a.match_properties, key, strict=True)),
        )
        notes: tuple[Note, ...] = ()
        start_at, occurrence = state.last_start_at, state.last_start_occurrence
        if (
            start_at is not None
            and occurrence is not None
            and state.last_start_key == key
            and start_at <= e.occurred_at
            and start_at + a.delay > max(e.occurred_at, ctx.now)
            and not state.cancelled_at_or_after(start_at, key)
        ):
            reason = f"{e.event_type} {e.event_id} came before the reminder was due"
            notes = (note(trigger, e, ctx, CANCELLED, "cancel_event", reason, occurrence=occurrence),)
        if state.cancelled_at_or_after(e.occurred_at, key):
            return Decision((cancel,), None, notes)
        intents: tuple[CancelTimers | WithdrawMessages, ...] = (cancel,)
        if trigger.channel == WAITING_CHANNEL:
            withdraw = WithdrawMessages(
                tenant_id=e.tenant_id,
                trigger_id=trigger.trigger_id,
                profile_id=e.profile_id,
                until=e.occurred_at,
                reason=WITHDRAWN_BY_CANCEL,
                match=cancel.match,
            )
            intents = (cancel, withdraw)
        return Decision(intents, state.with_cancel(key, e.occurred_at), notes)

    def state_to_json(self, state: Any) -> dict[str, Any]:
        assert isinstance(state, TriggerState)
        return {
            "last_start_at": time_text(state.last_start_at),
            "last_start_occurrence": state.last_start_occurrence,
            "last_start_key": list(state.last_start_key),
            "cancels": [{"key": list(key), "at": at.isoformat()} for key, at in state.cancels],
        }

    def state_from_json(self, data: Mapping[str, Any]) -> TriggerState:
        return TriggerState(
            last_start_at=parse_time(data.get("last_start_at")),
            last_start_occurrence=data.get("last_start_occurrence"),
            last_start_key=tuple(data.get("last_start_key", ())),
            cancels=tuple(
                (tuple(c["key"]), datetime.fromisoformat(c["at"])) for c in data.get("cancels", ())
            ),
        )

    def plan_merge(
        self,
        survivor: Mapping[str, Any],
        merged: Mapping[str, Any],
        pending: Sequence[PendingTimer],
        *,
        merged_profile_id: str,
    ) -> MergePlan:
        """What merging a profile into another means for their absence triggers (keyed by trigger id).

        The merged state is what one profile would hold had it seen both profiles' events, and the
        pending timers (the survivor's and the moved ones) are settled by the rules events follow:
        of the pending timers only the newest start (by start time, then occurrence) stays, the
        others are superseded — at most one reminder per trigger and person, for the newest start —
        and it is cancelled when a cancel for its key (known from the state that scheduled it)
        happened at or after it.
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
            newest = max(timers, key=lambda t: (t.started_at, t.occurrence))
            if state.start_is_newer(newest.started_at, newest.occurrence):
                key = next(
                    (
                        s.last_start_key
                        for s in (survivor.get(trigger_id), merged.get(trigger_id))
                        if s is not None and s.last_start_occurrence == newest.occurrence
                    ),
                    state.last_start_key,
                )
                state = replace(
                    state,
                    last_start_at=newest.started_at,
                    last_start_occurrence=newest.occurrence,
                    last_start_key=key,
                )
                states[trigger_id] = state
            winner = state.last_start_occurrence
            for t in timers:
                if t.occurrence != winner:
                    retire.append(
                        RetireTimer(
                            trigger_id, t.occurrence, "superseded", f"superseded by {winner} on {why}"
                        )
                    )
                elif state.cancelled_at_or_after(t.started_at, state.last_start_key):
                    retire.append(RetireTimer(trigger_id, t.occurrence, "cancelled", f"cancelled on {why}"))
        return MergePlan(states, retire)


ABSENCE = AbsenceKind()
