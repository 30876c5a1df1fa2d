"""Sending policies: re-entry, frequency caps, quiet hours, priority, expiry, as pure data and
functions: their stored JSON and the decision at fire time (`decide_due`); their validation is
`policy_validation`.

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

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, time, timedelta
from typing import Any
from zoneinfo import ZoneInfo

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
