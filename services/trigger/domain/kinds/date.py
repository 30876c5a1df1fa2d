"""The date kind: `offset_days` from a date held in a trait (a renewal, a voucher's expiry), or
yearly on its month and day (a birthday), at `local_time` in the person's time zone.

- The date is the trait's "YYYY-MM-DD", or the date of an RFC 3339 time as written.
- The person's zone is the IANA zone in the tenant's time zone trait, else the tenant's default.
  The local time follows `domain.local_time`: daylight saving never shifts or skips a send.
- Yearly on 29 February: in a year without one, on 28 February.
- A change of the date trait or the time zone trait computes the next due instant strictly after
  now and schedules its timer, keyed by the local target date: it supersedes an older pending
  date timer and, for the same date in another zone, moves it. A trait that is removed or no
  longer a date cancels the pending timer; a one-off date already passed schedules nothing
  (`date_passed`).
- When a yearly timer fires, `after_fire` schedules the next year from the date and zone the
  timer carries in its variables.
- Lateness does not apply: a due instant is always after now.

The state is the latest change seen (older ones change nothing) and the timer it scheduled.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import date, datetime, time, timedelta
from typing import Any, ClassVar
from zoneinfo import ZoneInfo

from relevans.conditions import TRAIT_NAME_RE
from relevans.kit.errors import Violations
from services.trigger.domain.events import Fact, TraitChange, trait_route
from services.trigger.domain.intents import CancelTimers, MergePlan, PendingTimer, ScheduleTimer
from services.trigger.domain.kinds.common import CANCELLED, FIRED, NOT_FIRED, note, parse_time, time_text
from services.trigger.domain.kinds.contract import NOTHING, Context, Decision, FiredTimer
from services.trigger.domain.local_time import at_local, local_date, zone
from services.trigger.domain.triggers import Condition, RawCondition, TriggerDef

MAX_OFFSET_DAYS = 365
LOCAL_TIME_RE = re.compile(r"([01][0-9]|2[0-3]):[0-5][0-9]")


@dataclass(frozen=True, slots=True)
class RawDate:
    kind: ClassVar[str] = "date"

    date_trait: str = ""
    offset_days: int = 0
    yearly: bool = False
    local_time: str = ""


@dataclass(frozen=True, slots=True)
class DateCondition:
    kind: ClassVar[str] = "date"

    date_trait: str
    offset_days: int
    yearly: bool
    local_time: time


@dataclass(frozen=True, slots=True)
class DateState:
    changed_at: datetime
    # The timer the latest change scheduled (None: it scheduled none).
    occurrence: str | None = None
    due_at: datetime | None = None


def _date(condition: Condition) -> DateCondition:
    assert isinstance(condition, DateCondition)
    return condition


def trait_date(value: object) -> date | None:
    """The date a trait holds: "YYYY-MM-DD", or an RFC 3339 time's date as written; None otherwise."""
    if not isinstance(value, str) or not 10 <= len(value) <= 40:
        return None
    try:
        if len(value) == 10:
            return date.fromisoformat(value)
        parsed = datetime.fromisoformat(value.replace("Z", "+00:00").replace("z", "+00:00"))
    except ValueError:
        return None
    return parsed.date() if parsed.tzinfo is not None else None


def anniversary(base: date, year: int) -> date:
    """`base`'s month and day in `year`; 29 February is 28 February in a year without one."""
    try:
        return base.replace(year=year)
    except ValueError:
        return date(year, 2, 28)


def person_zone(traits: Mapping[str, Any], ctx: Context) -> tuple[str, ZoneInfo]:
    name = traits.get(ctx.time_zone_trait)
    tz = zone(name) if isinstance(name, str) else None
    if tz is not None and isinstance(name, str):
        return name, tz
    return ctx.default_time_zone, zone(ctx.default_time_zone) or ZoneInfo("UTC")


def next_due(d: DateCondition, base: date, tz: ZoneInfo, after: datetime) -> tuple[date, datetime] | None:
    """(local target date, UTC instant) of the first send strictly after `after`; None when a
    one-off date has passed."""
    if not d.yearly:
        target = base + timedelta(days=d.offset_days)
        due = at_local(target, d.local_time, tz)
        return (target, due) if due > after else None
    year = local_date(after, tz).year
    for y in range(year - 2, year + 3):  # an offset of up to a year moves it at most one year
        try:
            target = anniversary(base, y) + timedelta(days=d.offset_days)
        except OverflowError:
            continue
        due = at_local(target, d.local_time, tz)
        if due > after:
            return target, due
    return None


class DateKind:
    name = "date"

    def validate(self, raw: RawCondition, field: str, v: Violations) -> DateCondition | None:
        assert isinstance(raw, RawDate)
        before = len(v.items)
        if not raw.date_trait:
            v.add(f"{field}.date_trait", "is required")
        elif not TRAIT_NAME_RE.fullmatch(raw.date_trait):
            v.add(f"{field}.date_trait", f"must be a trait name matching {TRAIT_NAME_RE.pattern}")
        if not -MAX_OFFSET_DAYS <= raw.offset_days <= MAX_OFFSET_DAYS:
            v.add(f"{field}.offset_days", f"must be between -{MAX_OFFSET_DAYS} and {MAX_OFFSET_DAYS}")
        if not raw.local_time:
            v.add(f"{field}.local_time", "is required")
        elif not LOCAL_TIME_RE.fullmatch(raw.local_time):
            v.add(f"{field}.local_time", 'must be "HH:MM", 24-hour (00:00 to 23:59)')
        if len(v.items) > before:
            return None
        return DateCondition(raw.date_trait, raw.offset_days, raw.yearly, time.fromisoformat(raw.local_time))

    def to_json(self, condition: Condition) -> dict[str, Any]:
        d = _date(condition)
        return {
            "date_trait": d.date_trait,
            "offset_days": d.offset_days,
            "yearly": d.yearly,
            "local_time": d.local_time.strftime("%H:%M"),
        }

    def from_json(self, data: Mapping[str, Any]) -> DateCondition:
        return DateCondition(
            data["date_trait"], data["offset_days"], data["yearly"], time.fromisoformat(data["local_time"])
        )

    def routes(self, condition: Condition, ctx: Context) -> frozenset[str]:
        return frozenset((trait_route(_date(condition).date_trait), trait_route(ctx.time_zone_trait)))

    def decide(self, trigger: TriggerDef, fact: Fact, state: Any | None, ctx: Context) -> Decision:
        d = _date(trigger.condition)
        if not isinstance(fact, TraitChange):
            return NOTHING
        if state is not None and fact.occurred_at < state.changed_at:
            return NOTHING  # an older change than one already applied
        pending = (
            state.occurrence
            if state is not None and state.due_at is not None and state.due_at > ctx.now
            else None
        )
        value = fact.traits.get(d.date_trait)
        base = trait_date(value)
        if base is None:
            code = "date_removed" if value is None else "date_invalid"
            reason = (
                f"the trait {d.date_trait} has no value"
                if value is None
                else f"the trait {d.date_trait} holds no date (YYYY-MM-DD or an RFC 3339 time)"
            )
            return self._cancel(trigger, fact, ctx, pending, code, reason)
        zone_name, tz = person_zone(fact.traits, ctx)
        found = next_due(d, base, tz, ctx.now)
        if found is None:
            reason = (
                f"{base.isoformat()} {d.offset_days:+d} days at {d.local_time:%H:%M} {zone_name} has passed"
            )
            return self._cancel(trigger, fact, ctx, pending, "date_passed", reason)
        target, due = found
        occurrence = target.isoformat()
        schedule = ScheduleTimer(
            tenant_id=fact.tenant_id,
            trigger_id=trigger.trigger_id,
            profile_id=fact.profile_id,
            occurrence=occurrence,
            started_at=fact.occurred_at,
            due_at=due,
            variables=_variables(d, base, target, zone_name),
            supersede=True,
            move=True,
        )
        new_state = DateState(fact.occurred_at, occurrence, due)
        if state is not None and (state.occurrence, state.due_at) == (occurrence, due):
            return Decision((schedule,), new_state)  # the same send: already in the trace
        notes = []
        if pending is not None and pending != occurrence:
            notes.append(
                note(
                    trigger,
                    fact,
                    ctx,
                    CANCELLED,
                    "date_moved",
                    f"the date moved to {occurrence}",
                    occurrence=pending,
                )
            )
        reason = f"{occurrence} at {d.local_time:%H:%M} {zone_name}"
        notes.append(
            note(trigger, fact, ctx, FIRED, "date_scheduled", reason, occurrence=occurrence, until=due)
        )
        return Decision((schedule,), new_state, tuple(notes))

    def _cancel(
        self,
        trigger: TriggerDef,
        fact: TraitChange,
        ctx: Context,
        pending: str | None,
        code: str,
        reason: str,
    ) -> Decision:
        cancel = CancelTimers(
            tenant_id=fact.tenant_id,
            trigger_id=trigger.trigger_id,
            profile_id=fact.profile_id,
            until=fact.occurred_at,
            reason=reason,
        )
        outcome = NOT_FIRED if pending is None else CANCELLED
        entry = note(trigger, fact, ctx, outcome, code, reason, occurrence=pending or "")
        return Decision((cancel,), DateState(fact.occurred_at), (entry,))

    def state_to_json(self, state: Any) -> dict[str, Any]:
        assert isinstance(state, DateState)
        return {
            "changed_at": state.changed_at.isoformat(),
            "occurrence": state.occurrence,
            "due_at": time_text(state.due_at),
        }

    def state_from_json(self, data: Mapping[str, Any]) -> DateState:
        return DateState(
            datetime.fromisoformat(data["changed_at"]), data.get("occurrence"), parse_time(data.get("due_at"))
        )

    def arming_trait(self, condition: Condition) -> str | None:
        """People already holding the date get their timer when the trigger is created."""
        return _date(condition).date_trait

    def after_fire(self, trigger: TriggerDef, fired: FiredTimer, ctx: Context) -> ScheduleTimer | None:
        """A yearly date's next year, from the date and zone the fired timer carried."""
        d = _date(trigger.condition)
        if not d.yearly:
            return None
        base = trait_date(fired.variables.get("date"))
        zone_name = fired.variables.get("time_zone")
        tz = zone(zone_name) if isinstance(zone_name, str) else None
        if base is None or tz is None or not isinstance(zone_name, str):
            return None
        found = next_due(d, base, tz, max(fired.due_at, ctx.now))
        if found is None:
            return None
        target, due = found
        return ScheduleTimer(
            tenant_id=fired.tenant_id,
            trigger_id=fired.trigger_id,
            profile_id=fired.profile_id,
            occurrence=target.isoformat(),
            started_at=fired.due_at,
            due_at=due,
            variables=_variables(d, base, target, zone_name),
            supersede=True,
            move=True,
        )

    def plan_merge(
        self,
        survivor: Mapping[str, Any],
        merged: Mapping[str, Any],
        pending: Sequence[PendingTimer],
        *,
        merged_profile_id: str,
    ) -> MergePlan:
        """The survivor's traits win a merge (the profile service merges traits and tells of the
        changes): the survivor's state stays, the merged profile's only where the survivor had none.
        Pending timers stay; a trait change the merge causes reschedules and supersedes."""
        states = {t: survivor.get(t) or merged[t] for t in sorted({*survivor, *merged})}
        return MergePlan(states, [])


def _variables(d: DateCondition, base: date, target: date, zone_name: str) -> dict[str, Any]:
    return {
        "date": base.isoformat(),
        "target_date": target.isoformat(),
        "time_zone": zone_name,
        "trait": d.date_trait,
    }


DATE = DateKind()
