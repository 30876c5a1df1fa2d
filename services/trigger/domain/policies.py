"""Sending policies: re-entry, frequency caps, quiet hours, priority, expiry, as pure data and
functions: their validation, their stored JSON, and the decision at fire time (`decide_due`).

`decide_due` decides one person's messages that are due now together (the decision window), in
this order; a message leaves at the first step that stops it:

1. **expiry**: now past `first_due_at` + the trigger's expiry (else the tenant's default) ->
   expired, dropped, never sent late;
2. **consent**: a marketing message whose (purpose, channel) consent is known to be denied or
   withdrawn -> suppressed (delivery checks consent again at send time; unknown is not a no);
3. **re-entry**, against the person's sends of the same trigger: once ever (any send), once per
   period (a send within the period before now), every time with a minimum interval (a send
   within it) -> held back, dropped;
4. **quiet hours** in the person's time zone (the trigger's own, else the tenant's; none with
   `ignore_quiet_hours`; transactional messages exempt unless the tenant includes them): now
   inside [start, end) -> deferred to the end, or expired if the end is past the expiry;
5. **priority and caps**: the rest in order of priority (highest first), then first due, trigger
   id, occurrence. Each is checked against re-entry once more (two occurrences of one trigger
   due together) and, if marketing, against every cap of its channel or of all channels,
   counting the person's marketing sends plus those handed over earlier in this decision. Over a
   cap -> capped: dropped (`capped_action` DROP), or deferred to when every full cap frees a
   place, or expired if that is past the expiry. Otherwise handed to delivery, and it counts.

A calendar-day cap counts sends whose local date (the person's zone) is today's and frees at the
next local midnight; a rolling cap counts sends in (now - window, now] and frees when enough of
them have aged out. Local times become instants with `local_time.at_local` (daylight-saving safe).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, time, timedelta
from typing import Any, Final
from zoneinfo import ZoneInfo

from relevans.conditions import TRAIT_NAME_RE
from relevans.kit.errors import Violations
from services.trigger.domain.durations import duration_text, parse_duration
from services.trigger.domain.local_time import at_local, local_date, zone

ONCE_EVER, ONCE_PER_PERIOD, EVERY_TIME = "once_ever", "once_per_period", "every_time"
REENTRY_MODES = (ONCE_EVER, ONCE_PER_PERIOD, EVERY_TIME)
DEFER, DROP = "defer", "drop"
CAPPED_ACTIONS = (DEFER, DROP)
ALL_CHANNELS = ""
# The channels a cap may name (`relevans.common.v1.Channel` without its prefix).
CHANNELS = ("email", "sms", "web", "webhook")
MARKETING = "marketing"
NO_CONSENT = frozenset({"denied", "withdrawn"})

DEFAULT_EXPIRY = timedelta(hours=24)
DEFAULT_LATE_EVENT_WINDOW = timedelta(hours=24)
DEFAULT_TIME_ZONE = "UTC"
DEFAULT_TIME_ZONE_TRAIT = "time_zone"

MAX_CAPS = 20
MAX_CAP_MESSAGES = 1000
MAX_WINDOW = timedelta(days=365)
MAX_REENTRY_PERIOD = timedelta(days=3660)
MAX_PRIORITY = 1000
# How far back a calendar-day cap must look: the local day began at most a day (and a
# daylight-saving hour) ago, with room for any UTC offset.
CALENDAR_DAY_HORIZON = timedelta(days=1, hours=14)

# Outcomes and reason codes of a `Verdict` (the decision trace keeps them).
HANDED, DEFERRED, CAPPED, HELD_BACK, EXPIRED, SUPPRESSED = (
    "handed_to_delivery",
    "deferred",
    "capped",
    "held_back",
    "expired",
    "suppressed",
)

_HH_MM = re.compile(r"([01][0-9]|2[0-3]):[0-5][0-9]")


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

    def contains(self, at: time) -> bool:
        if self.start < self.end:
            return self.start <= at < self.end
        return at >= self.start or at < self.end

    def describe(self) -> str:
        return f"{_hh_mm(self.start)}-{_hh_mm(self.end)}"


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

    def applies_to(self, channel: str) -> bool:
        return self.channel in (ALL_CHANNELS, channel)

    def describe(self) -> str:
        what = f"{self.max_messages} {self.channel or 'marketing'} message{'s' * (self.max_messages != 1)}"
        window = "per calendar day" if self.rolling is None else f"per rolling {_span(self.rolling)}"
        across = " across all channels" if self.channel == ALL_CHANNELS else ""
        return f"cap of {what} {window}{across}"


@dataclass(frozen=True, slots=True)
class TenantPolicy:
    caps: tuple[FrequencyCap, ...] = ()
    quiet_hours: QuietHours | None = None
    quiet_hours_include_transactional: bool = False
    default_time_zone: str = DEFAULT_TIME_ZONE
    time_zone_trait: str = DEFAULT_TIME_ZONE_TRAIT
    default_expiry: timedelta = DEFAULT_EXPIRY
    late_event_window: timedelta = DEFAULT_LATE_EVENT_WINDOW
    updated_at: datetime | None = field(default=None, compare=False)


# ---- validation ------------------------------------------------------------------------------


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


# ---- stored JSON --------------------------------------------------------------------------------


def tenant_policy_to_json(p: TenantPolicy) -> dict[str, Any]:
    return {
        "caps": [
            {"channel": c.channel, "max_messages": c.max_messages}
            | ({"calendar_day": True} if c.rolling is None else {"rolling": duration_text(c.rolling)})
            for c in p.caps
        ],
        "quiet_hours": _quiet_hours_json(p.quiet_hours),
        "quiet_hours_include_transactional": p.quiet_hours_include_transactional,
        "default_time_zone": p.default_time_zone,
        "time_zone_trait": p.time_zone_trait,
        "default_expiry": duration_text(p.default_expiry),
        "late_event_window": duration_text(p.late_event_window),
        "updated_at": None if p.updated_at is None else p.updated_at.isoformat(),
    }


def tenant_policy_from_json(data: Mapping[str, Any]) -> TenantPolicy:
    """The inverse of `tenant_policy_to_json`; a key it lacks takes its default."""
    updated_at = data.get("updated_at")
    return TenantPolicy(
        caps=tuple(
            FrequencyCap(
                c["channel"],
                c["max_messages"],
                None if c.get("rolling") is None else parse_duration(c["rolling"]),
            )
            for c in data.get("caps", ())
        ),
        quiet_hours=_quiet_hours_from_json(data.get("quiet_hours")),
        quiet_hours_include_transactional=data.get("quiet_hours_include_transactional", False),
        default_time_zone=data.get("default_time_zone", DEFAULT_TIME_ZONE),
        time_zone_trait=data.get("time_zone_trait", DEFAULT_TIME_ZONE_TRAIT),
        default_expiry=parse_duration(data.get("default_expiry", duration_text(DEFAULT_EXPIRY))),
        late_event_window=parse_duration(
            data.get("late_event_window", duration_text(DEFAULT_LATE_EVENT_WINDOW))
        ),
        updated_at=None if updated_at is None else datetime.fromisoformat(updated_at),
    )


def trigger_policy_to_json(p: TriggerPolicy) -> dict[str, Any]:
    return {
        "priority": p.priority,
        "reentry": {"mode": p.reentry.mode, "period": duration_text(p.reentry.period)},
        "capped_action": p.capped_action,
        "expiry": None if p.expiry is None else duration_text(p.expiry),
        "quiet_hours": _quiet_hours_json(p.quiet_hours),
        "ignore_quiet_hours": p.ignore_quiet_hours,
    }


def trigger_policy_from_json(data: Mapping[str, Any] | None) -> TriggerPolicy:
    """The inverse of `trigger_policy_to_json`; None (a trigger stored before policies) or a key
    it lacks takes the default."""
    if not data:
        return TriggerPolicy()
    reentry = data.get("reentry") or {}
    expiry = data.get("expiry")
    return TriggerPolicy(
        priority=data.get("priority", 0),
        reentry=Reentry(reentry.get("mode", EVERY_TIME), parse_duration(reentry.get("period", "0s"))),
        capped_action=data.get("capped_action", DEFER),
        expiry=None if expiry is None else parse_duration(expiry),
        quiet_hours=_quiet_hours_from_json(data.get("quiet_hours")),
        ignore_quiet_hours=data.get("ignore_quiet_hours", False),
    )


def _quiet_hours_json(q: QuietHours | None) -> dict[str, str] | None:
    return None if q is None else {"start": _hh_mm(q.start), "end": _hh_mm(q.end)}


def _quiet_hours_from_json(data: Mapping[str, str] | None) -> QuietHours | None:
    return (
        None
        if data is None
        else QuietHours(time.fromisoformat(data["start"]), time.fromisoformat(data["end"]))
    )


def quiet_hours_text(q: QuietHours) -> tuple[str, str]:
    """(start, end) as "HH:MM", as the proto carries them."""
    return _hh_mm(q.start), _hh_mm(q.end)


def _hh_mm(t: time) -> str:
    return f"{t.hour:02d}:{t.minute:02d}"


# ---- the decision at fire time -----------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class DueMessage:
    trigger_id: str
    occurrence: str
    channel: str  # "email", "sms", "web", "webhook"
    purpose: str  # "marketing" | "transactional"
    policy: TriggerPolicy
    due_at: datetime  # its current due time
    first_due_at: datetime  # when it was first due: expiry counts from here


@dataclass(frozen=True, slots=True)
class Sent:
    """A message already handed to delivery for this person."""

    trigger_id: str
    channel: str
    purpose: str
    at: datetime


@dataclass(frozen=True, slots=True)
class Verdict:
    message: DueMessage
    # HANDED, DEFERRED, CAPPED, HELD_BACK, EXPIRED or SUPPRESSED.
    outcome: str
    # Stable: "sent", "quiet_hours", "cap", "reentry_once_ever", "reentry_once_per_period",
    # "reentry_min_interval", "expired", "no_consent".
    reason_code: str
    # In words, naming the cap, the hours, the times.
    reason: str
    # Deferred (or capped and deferred): the new due time.
    until: datetime | None = None


def person_zone(traits: Mapping[str, Any], policy: TenantPolicy) -> ZoneInfo:
    """The person's time zone: their time zone trait if it names an IANA zone, else the tenant's."""
    value = traits.get(policy.time_zone_trait)
    tz = zone(value) if isinstance(value, str) else None
    return tz or zone(policy.default_time_zone) or ZoneInfo(DEFAULT_TIME_ZONE)


def history_horizon(policy: TenantPolicy, triggers: Iterable[TriggerPolicy]) -> timedelta | None:
    """How far before now `decide_due` needs the person's sends: the longest cap window and
    re-entry period; None when a trigger's once-ever rule needs them all."""
    horizon = timedelta(0)
    for cap in policy.caps:
        horizon = max(horizon, CALENDAR_DAY_HORIZON if cap.rolling is None else cap.rolling)
    for t in triggers:
        if t.reentry.mode == ONCE_EVER:
            return None
        horizon = max(horizon, t.reentry.period)
    return horizon


def decide_due(
    messages: Iterable[DueMessage],
    history: Sequence[Sent],
    policy: TenantPolicy,
    time_zone: ZoneInfo,
    now: datetime,
    consents: Mapping[tuple[str, str], str] | None = None,
) -> list[Verdict]:
    """One verdict per message, in the order given (the steps are in the module docstring).
    `history`: the person's sends as far back as `history_horizon`; `consents`: their known
    consent status by (purpose, channel)."""
    consents = consents or {}
    verdicts: dict[int, Verdict] = {}
    remaining: list[tuple[int, DueMessage, datetime]] = []
    due = list(messages)
    for i, m in enumerate(due):
        deadline = m.first_due_at + (m.policy.expiry or policy.default_expiry)
        verdict = (
            _expired(m, deadline, now)
            or _no_consent(m, consents)
            or _reentry_hold(m, history, now)
            or _quiet(m, policy, time_zone, now, deadline)
        )
        if verdict is None:
            remaining.append((i, m, deadline))
        else:
            verdicts[i] = verdict
    remaining.sort(key=lambda r: (-r[1].policy.priority, r[1].first_due_at, r[1].trigger_id, r[1].occurrence))
    counted = [s for s in history if s.purpose == MARKETING]
    handed: list[Sent] = []
    for i, m, deadline in remaining:
        verdict = _reentry_hold(m, handed, now) or (
            _capped(m, counted, policy, time_zone, now, deadline) if m.purpose == MARKETING else None
        )
        if verdict is None:
            sent = Sent(m.trigger_id, m.channel, m.purpose, now)
            handed.append(sent)
            if m.purpose == MARKETING:
                counted.append(sent)
            verdict = Verdict(m, HANDED, "sent", "handed to delivery")
        verdicts[i] = verdict
    return [verdicts[i] for i in range(len(due))]


def _expired(m: DueMessage, deadline: datetime, now: datetime) -> Verdict | None:
    if now <= deadline:
        return None
    return Verdict(
        m, EXPIRED, "expired", f"its expiry passed at {_utc(deadline)} (first due {_utc(m.first_due_at)})"
    )


def _no_consent(m: DueMessage, consents: Mapping[tuple[str, str], str]) -> Verdict | None:
    if m.purpose != MARKETING:
        return None
    status = consents.get((m.purpose, m.channel))
    if status not in NO_CONSENT:
        return None
    return Verdict(m, SUPPRESSED, "no_consent", f"{m.purpose} consent on {m.channel} is {status}")


def _reentry_hold(m: DueMessage, sends: Sequence[Sent], now: datetime) -> Verdict | None:
    rule = m.policy.reentry
    mine = [s.at for s in sends if s.trigger_id == m.trigger_id]
    if not mine:
        return None
    last = max(mine)
    if rule.mode == ONCE_EVER:
        return Verdict(m, HELD_BACK, "reentry_once_ever", f"sent once ever already, at {_utc(last)}")
    if rule.period <= timedelta(0) or last <= now - rule.period:
        return None
    span = _span(rule.period)
    if rule.mode == ONCE_PER_PERIOD:
        return Verdict(m, HELD_BACK, "reentry_once_per_period", f"once per {span}: last sent at {_utc(last)}")
    return Verdict(m, HELD_BACK, "reentry_min_interval", f"at least {span} apart: last sent at {_utc(last)}")


def _quiet(
    m: DueMessage, policy: TenantPolicy, tz: ZoneInfo, now: datetime, deadline: datetime
) -> Verdict | None:
    hours = m.policy.quiet_hours or policy.quiet_hours
    if hours is None or m.policy.ignore_quiet_hours:
        return None
    if m.purpose != MARKETING and not policy.quiet_hours_include_transactional:
        return None
    local = now.astimezone(tz)
    if not hours.contains(local.time().replace(tzinfo=None)):
        return None
    day = local.date()
    if local.time() >= hours.end:
        day += timedelta(days=1)
    until = at_local(day, hours.end, tz)
    where = f"quiet hours {hours.describe()} in {tz.key}"
    if until > deadline:
        return Verdict(
            m,
            EXPIRED,
            "expired",
            f"{where} end at {_local(until, tz)}, after its expiry at {_local(deadline, tz)}",
        )
    return Verdict(m, DEFERRED, "quiet_hours", f"{where}: deferred to {_local(until, tz)}", until)


def _capped(
    m: DueMessage,
    counted: Sequence[Sent],
    policy: TenantPolicy,
    tz: ZoneInfo,
    now: datetime,
    deadline: datetime,
) -> Verdict | None:
    full: list[tuple[FrequencyCap, datetime]] = []
    today = local_date(now, tz)
    for cap in policy.caps:
        if not cap.applies_to(m.channel):
            continue
        sends = [s.at for s in counted if cap.applies_to(s.channel)]
        if cap.rolling is None:
            in_window = [at for at in sends if local_date(at, tz) == today]
        else:
            in_window = sorted(at for at in sends if at > now - cap.rolling)
        if len(in_window) < cap.max_messages:
            continue
        if cap.rolling is None:
            full.append((cap, at_local(today + timedelta(days=1), time(0), tz)))
        else:
            # A place frees when all but max - 1 of the counted sends have aged out.
            full.append((cap, in_window[len(in_window) - cap.max_messages] + cap.rolling))
    if not full:
        return None
    caps = "; ".join(f"{cap.describe()} reached" for cap, _ in full)
    if m.policy.capped_action == DROP:
        return Verdict(m, CAPPED, "cap", f"{caps}: dropped")
    until = max(frees for _, frees in full)
    if until > deadline:
        return Verdict(
            m,
            EXPIRED,
            "expired",
            f"{caps}: the next place at {_local(until, tz)} is after its expiry at {_local(deadline, tz)}",
        )
    return Verdict(m, CAPPED, "cap", f"{caps}: deferred to {_local(until, tz)}", until)


def _utc(at: datetime) -> str:
    return at.isoformat(timespec="seconds")


def _local(at: datetime, tz: ZoneInfo) -> str:
    return f"{at.astimezone(tz).isoformat(timespec='minutes')} {tz.key}"


def _span(d: timedelta) -> str:
    """A window in words ("7 days", "6 hours", "90 minutes", "45s")."""
    seconds = int(d.total_seconds())
    for unit, size in (("day", 86_400), ("hour", 3_600), ("minute", 60)):
        if seconds % size == 0 and seconds >= size:
            n = seconds // size
            return f"{n} {unit}{'s' * (n != 1)}"
    return duration_text(d)
