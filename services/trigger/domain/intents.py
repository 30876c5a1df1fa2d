"""What the domain asks the store to do: schedule and cancel timers, settle them on a merge.

Every condition kind speaks in these intents; the store applies them without knowing the kind.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

# (tenant_id, trigger_id, profile_id): the key of a trigger's state for one person.
StateKey = tuple[str, str, str]


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
