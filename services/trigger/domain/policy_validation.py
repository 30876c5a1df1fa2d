"""A sending policy as a client sent it, checked: `validate_tenant_policy` and
`validate_trigger_policy` return the domain's policies (`policies`) or add every problem, named by
its field path, to the caller's violations."""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import time, timedelta
from typing import Final

from relevans.conditions import TRAIT_NAME_RE
from relevans.kit.errors import Violations
from services.trigger.domain.local_time import zone
from services.trigger.domain.policies import (
    ALL_CHANNELS,
    CAPPED_ACTIONS,
    CHANNELS,
    DEFAULT_EXPIRY,
    DEFAULT_LATE_EVENT_WINDOW,
    DEFAULT_TIME_ZONE,
    DEFAULT_TIME_ZONE_TRAIT,
    DEFER,
    EVERY_TIME,
    ONCE_EVER,
    ONCE_PER_PERIOD,
    REENTRY_MODES,
    FrequencyCap,
    QuietHours,
    Reentry,
    TenantPolicy,
    TriggerPolicy,
)

MAX_CAPS = 20
MAX_CAP_MESSAGES = 1000
MAX_WINDOW = timedelta(days=365)
MAX_REENTRY_PERIOD = timedelta(days=3660)
MAX_PRIORITY = 1000
_HH_MM = re.compile(r"([01][0-9]|2[0-3]):[0-5][0-9]")


class BadDuration:
    """The type of `BAD_DURATION`: a duration the client sent that no timedelta holds (mixed
    signs, nanos out of range, too large)."""

    __slots__ = ()

    def __repr__(self) -> str:
        return "BAD_DURATION"


BAD_DURATION: Final = BadDuration()

# A duration as the client sent it: None when unset.
RawDuration = timedelta | BadDuration | None


@dataclass(frozen=True, slots=True)
class RawQuietHours:
    start: str = ""
    end: str = ""


@dataclass(frozen=True, slots=True)
class RawReentry:
    # A name of REENTRY_MODES, "unspecified" (every time), or what else the client sent.
    mode: str = "unspecified"
    period: RawDuration = None


@dataclass(frozen=True, slots=True)
class RawTriggerPolicy:
    """A trigger's policy as the client sent it; enum values as their lower-case names."""

    priority: int = 0
    reentry: RawReentry | None = None
    capped_action: str = "unspecified"
    expiry: RawDuration = None
    quiet_hours: RawQuietHours | None = None
    ignore_quiet_hours: bool = False


@dataclass(frozen=True, slots=True)
class RawCap:
    # A name of CHANNELS, "unspecified" (all channels), or what else the client sent.
    channel: str = "unspecified"
    max_messages: int = 0
    calendar_day: bool = False
    rolling: RawDuration = None


@dataclass(frozen=True, slots=True)
class RawTenantPolicy:
    caps: tuple[RawCap, ...] = ()
    quiet_hours: RawQuietHours | None = None
    quiet_hours_include_transactional: bool = False
    default_time_zone: str = ""
    time_zone_trait: str = ""
    default_expiry: RawDuration = None
    late_event_window: RawDuration = None


def validate_tenant_policy(raw: RawTenantPolicy, field: str, v: Violations) -> TenantPolicy | None:
    """A normalised tenant policy, or None with every problem added to `v` under `field`."""
    before = len(v.items)
    caps: list[FrequencyCap] = []
    if len(raw.caps) > MAX_CAPS:
        v.add(f"{field}.caps", f"at most {MAX_CAPS} items, got {len(raw.caps)}")
    else:
        for i, raw_cap in enumerate(raw.caps):
            cap = _cap(raw_cap, f"{field}.caps[{i}]", v)
            if cap is not None:
                caps.append(cap)
    quiet_hours = _quiet_hours(raw.quiet_hours, f"{field}.quiet_hours", v)
    time_zone = raw.default_time_zone or DEFAULT_TIME_ZONE
    if zone(time_zone) is None:
        v.add(f"{field}.default_time_zone", f"{time_zone[:64]!r} is not an IANA time zone this service knows")
    trait = raw.time_zone_trait or DEFAULT_TIME_ZONE_TRAIT
    if not TRAIT_NAME_RE.fullmatch(trait):
        v.add(f"{field}.time_zone_trait", f"must be a trait name matching {TRAIT_NAME_RE.pattern}")
    expiry = _window(raw.default_expiry, f"{field}.default_expiry", v, DEFAULT_EXPIRY)
    late = _window(raw.late_event_window, f"{field}.late_event_window", v, DEFAULT_LATE_EVENT_WINDOW)
    if len(v.items) > before:
        return None
    assert expiry is not None and late is not None
    return TenantPolicy(
        caps=tuple(caps),
        quiet_hours=quiet_hours,
        quiet_hours_include_transactional=raw.quiet_hours_include_transactional,
        default_time_zone=time_zone,
        time_zone_trait=trait,
        default_expiry=expiry,
        late_event_window=late,
    )


def validate_trigger_policy(raw: RawTriggerPolicy | None, field: str, v: Violations) -> TriggerPolicy | None:
    """A normalised trigger policy (the defaults for None), or None with every problem added to `v`."""
    if raw is None:
        return TriggerPolicy()
    before = len(v.items)
    if not -MAX_PRIORITY <= raw.priority <= MAX_PRIORITY:
        v.add(f"{field}.priority", f"must be between {-MAX_PRIORITY} and {MAX_PRIORITY}")
    reentry = _reentry(raw.reentry or RawReentry(), f"{field}.reentry", v)
    action = DEFER if raw.capped_action == "unspecified" else raw.capped_action
    if action not in CAPPED_ACTIONS:
        v.add(f"{field}.capped_action", f"{raw.capped_action!r} is not a capped action this service knows")
    expiry = _window(raw.expiry, f"{field}.expiry", v, None)
    quiet_hours = _quiet_hours(raw.quiet_hours, f"{field}.quiet_hours", v)
    if len(v.items) > before:
        return None
    assert reentry is not None
    return TriggerPolicy(
        priority=raw.priority,
        reentry=reentry,
        capped_action=action,
        expiry=expiry,
        quiet_hours=quiet_hours,
        ignore_quiet_hours=raw.ignore_quiet_hours,
    )


def _cap(raw: RawCap, field: str, v: Violations) -> FrequencyCap | None:
    before = len(v.items)
    channel = ALL_CHANNELS if raw.channel == "unspecified" else raw.channel
    if channel != ALL_CHANNELS and channel not in CHANNELS:
        v.add(f"{field}.channel", f"{raw.channel!r} is not a channel this service knows")
    if raw.max_messages < 1:
        v.add(f"{field}.max_messages", "must be at least 1")
    elif raw.max_messages > MAX_CAP_MESSAGES:
        v.add(f"{field}.max_messages", f"must be at most {MAX_CAP_MESSAGES}")
    rolling: timedelta | None = None
    if raw.rolling is not None:
        rolling = _window(raw.rolling, f"{field}.rolling", v, None)
    elif not raw.calendar_day:
        v.add(f"{field}.calendar_day", "a window is required: calendar_day true or a rolling duration")
    if len(v.items) > before:
        return None
    return FrequencyCap(channel, raw.max_messages, rolling)


def _window(raw: RawDuration, field: str, v: Violations, unset: timedelta | None) -> timedelta | None:
    """A duration over zero and at most MAX_WINDOW; `unset` when the client set none."""
    if raw is None:
        return unset
    if isinstance(raw, BadDuration):
        v.add(field, "is not a valid duration")
    elif raw <= timedelta(0):
        v.add(field, "must be positive")
    elif raw > MAX_WINDOW:
        v.add(field, "must be at most 365 days")
    else:
        return raw
    return None


def _reentry(raw: RawReentry, field: str, v: Violations) -> Reentry | None:
    mode = EVERY_TIME if raw.mode == "unspecified" else raw.mode
    if mode not in REENTRY_MODES:
        v.add(f"{field}.mode", f"{raw.mode!r} is not a re-entry mode this service knows")
        return None
    period = raw.period
    if isinstance(period, BadDuration):
        v.add(f"{field}.period", "is not a valid duration")
        return None
    if mode == ONCE_EVER:
        if period:
            v.add(f"{field}.period", "must be unset for REENTRY_MODE_ONCE_EVER")
            return None
        return Reentry(ONCE_EVER)
    if period is None or (mode == EVERY_TIME and period == timedelta(0)):
        if mode == ONCE_PER_PERIOD:
            v.add(f"{field}.period", "is required for REENTRY_MODE_ONCE_PER_PERIOD")
            return None
        return Reentry(EVERY_TIME)
    if period < timedelta(0):
        v.add(f"{field}.period", "must not be negative")
    elif period == timedelta(0):
        v.add(f"{field}.period", "must be positive")
    elif period > MAX_REENTRY_PERIOD:
        v.add(f"{field}.period", "must be at most 3660 days")
    else:
        return Reentry(mode, period)
    return None


def _quiet_hours(raw: RawQuietHours | None, field: str, v: Violations) -> QuietHours | None:
    """Both ends or neither; "HH:MM", start != end."""
    if raw is None or (not raw.start and not raw.end):
        return None
    start = _time(raw.start, f"{field}.start", v)
    end = _time(raw.end, f"{field}.end", v)
    if start is None or end is None:
        return None
    if start == end:
        v.add(f"{field}.end", "quiet hours that start and end at the same minute are no span")
        return None
    return QuietHours(start, end)


def _time(text: str, field: str, v: Violations) -> time | None:
    if not text:
        v.add(field, "is required when quiet hours are set (both start and end, or neither)")
    elif not _HH_MM.fullmatch(text):
        v.add(field, 'must be a 24-hour time "HH:MM" from 00:00 to 23:59')
    else:
        return time(int(text[:2]), int(text[3:]))
    return None
