"""What the domain asks the store to do: schedule, move and cancel timers, settle them on a
merge, and note decisions in the trace.

Every condition kind speaks in these intents; the store applies them without knowing the kind.
A timer is one message that will be due for one (trigger, profile, occurrence); when it is due,
the policies (`domain.policies`) decide whether it goes, waits or is dropped.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any, NamedTuple

# (tenant_id, trigger_id, profile_id): the key of a trigger's state for one person.
StateKey = tuple[str, str, str]


@dataclass(frozen=True, slots=True)
class ScheduleTimer:
    """Insert a pending timer (nothing if one with its key exists).

    `supersede`: the profile's older pending timers of the trigger (by start time, then
    occurrence) are superseded (absence: one reminder at a time, for the newest cart).
    `move`: a pending timer with this key already there takes the new due time, start and
    variables (inactivity: each event moves the deadline); a fired or cancelled one stays.
    """

    tenant_id: str
    trigger_id: str
    profile_id: str
    occurrence: str
    started_at: datetime
    due_at: datetime
    variables: dict[str, Any]
    supersede: bool = False
    move: bool = False


@dataclass(frozen=True, slots=True)
class CancelTimers:
    """Cancel the profile's pending timers of the trigger that started at or before `until`;
    with `match`, only those whose start event's properties (`variables.event`) have these
    values."""

    tenant_id: str
    trigger_id: str
    profile_id: str
    until: datetime
    reason: str
    match: tuple[tuple[str, Any], ...] = ()


@dataclass(frozen=True, slots=True)
class WithdrawMessages:
    """Tell delivery the moment has passed (a cancel event): if a timer of the trigger that
    started at or before `until` (with `match`, as `CancelTimers`) has fired, its banner may be
    waiting, and delivery withdraws the person's waiting banners of the trigger."""

    tenant_id: str
    trigger_id: str
    profile_id: str
    until: datetime
    reason: str
    match: tuple[tuple[str, Any], ...] = ()


Intent = ScheduleTimer | CancelTimers | WithdrawMessages


class Note(NamedTuple):
    """An entry for the decision trace (`DecisionOutcome` without its prefix, lower-case:
    "fired", "not_fired", "cancelled", ...). A named tuple, not a frozen dataclass: a batch makes
    several per event (most of them condition-false, counted and dropped), and a tuple is made in
    a third of the time."""

    tenant_id: str
    trigger_id: str
    profile_id: str
    outcome: str
    reason_code: str
    reason: str
    at: datetime
    event_id: str = ""
    occurrence: str = ""
    until: datetime | None = None


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
    states: dict[str, Any]
    retire: list[RetireTimer]
