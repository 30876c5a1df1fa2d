"""Sending policies: re-entry, frequency caps, quiet hours, priority, expiry, as pure data and
functions (the decision at fire time lives in `decide_due`).

Types only so far; see the module's tests for the rules.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime, time, timedelta

ONCE_EVER, ONCE_PER_PERIOD, EVERY_TIME = "once_ever", "once_per_period", "every_time"
DEFER, DROP = "defer", "drop"
ALL_CHANNELS = ""

DEFAULT_EXPIRY = timedelta(hours=24)
DEFAULT_LATE_EVENT_WINDOW = timedelta(hours=24)


@dataclass(frozen=True, slots=True)
class Reentry:
    mode: str = EVERY_TIME
    # ONCE_PER_PERIOD: the period; EVERY_TIME: the minimum interval (zero: none).
    period: timedelta = timedelta(0)


@dataclass(frozen=True, slots=True)
class QuietHours:
    """Local [start, end); start > end spans midnight (22:00-07:00)."""

    start: time
    end: time


@dataclass(frozen=True, slots=True)
class TriggerPolicy:
    priority: int = 0
    reentry: Reentry = Reentry()
    capped_action: str = DEFER
    # None: the tenant's default expiry.
    expiry: timedelta | None = None
    # None: the tenant's quiet hours.
    quiet_hours: QuietHours | None = None
    ignore_quiet_hours: bool = False


@dataclass(frozen=True, slots=True)
class FrequencyCap:
    # ALL_CHANNELS or a channel name ("email").
    channel: str
    max_messages: int
    # None: the calendar day in the person's time zone.
    rolling: timedelta | None = None


@dataclass(frozen=True, slots=True)
class TenantPolicy:
    caps: tuple[FrequencyCap, ...] = ()
    quiet_hours: QuietHours | None = None
    quiet_hours_include_transactional: bool = False
    default_time_zone: str = "UTC"
    time_zone_trait: str = "time_zone"
    default_expiry: timedelta = DEFAULT_EXPIRY
    late_event_window: timedelta = DEFAULT_LATE_EVENT_WINDOW
    updated_at: datetime | None = field(default=None, compare=False)
