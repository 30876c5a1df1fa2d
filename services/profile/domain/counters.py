"""Counters: per-tenant definitions, bucketed sliding-window counts, threshold crossings, lead-score decay.

A counter counts one tenant's events of a type, optionally only those whose `properties[property]`
equals `property_value` (toys page views: `page_view` with `category == "toys"`), over windows of
1, 7, 30 or 90 days. Per person it is stored as daily buckets, `{date: count}`, in the person's time
zone (UTC unless a zone is passed); a window of N days is today plus the N - 1 days before it, so an
event counts for N calendar days (an approximation of a rolling N x 24 hours, which is what makes the
storage O(days) and merges of shadow profiles a sum).

Pure: stdlib only, no I/O. The functions return new dicts and never change their arguments.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta, tzinfo

from relevans.kit.errors import Violations

# Mirrors services.profile.domain.events.EVENT_TYPE_RE (kept stdlib-only; a unit test keeps them in sync).
EVENT_TYPE_RE = re.compile(r"^[a-z][a-z0-9_.:-]{0,63}$")
COUNTER_NAME_RE = re.compile(r"^[a-z][a-z0-9_]{0,62}$")
PROPERTY_NAME_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_.-]{0,63}$")
WINDOW_DAYS = (1, 7, 30, 90)
MAX_WINDOW_DAYS = max(WINDOW_DAYS)
MAX_PROPERTY_VALUE_CHARS = 256
MAX_COUNTERS_PER_TENANT = 200
MAX_THRESHOLDS = 20

PropertyValue = str | int | float | bool


@dataclass(frozen=True, slots=True)
class CounterDefinition:
    """One tenant's counter; `windows` are whole days from WINDOW_DAYS, ascending."""

    name: str
    event_type: str
    windows: tuple[int, ...] = (7,)
    property: str | None = None
    property_value: PropertyValue | None = None
    # Counts in the shortest window at which a crossing is published, ascending.
    thresholds: tuple[int, ...] = ()

    def keep_days(self) -> int:
        """How many daily buckets a person needs for this counter's longest window."""
        return max(self.windows, default=0)

    def matches(self, event_type: str, properties: Mapping[str, object]) -> bool:
        """Whether an event counts towards this counter (like with like: True is not 1, "1" is not 1)."""
        if event_type != self.event_type:
            return False
        if self.property is None:
            return True
        return same_value(properties.get(self.property), self.property_value)


def same_value(a: object, b: object) -> bool:
    """JSON equality, like with like: True is not 1, "1" is not 1, 1 equals 1.0; None equals nothing."""
    if isinstance(a, bool) or isinstance(b, bool):
        return isinstance(a, bool) and isinstance(b, bool) and a == b
    if isinstance(a, int | float) and isinstance(b, int | float):
        return a == b
    return isinstance(a, str) and isinstance(b, str) and a == b


def _is_property_value(value: object) -> bool:
    if isinstance(value, bool | str):
        return True
    return isinstance(value, int | float) and math.isfinite(value)


def check_counter(defn: CounterDefinition, prefix: str, violations: Violations) -> None:
    """Adds a violation per offending field, paths `<prefix>.name`, `<prefix>.windows[1]`, ..."""
    if not defn.name:
        violations.add(f"{prefix}.name", "is required")
    elif not isinstance(defn.name, str) or not COUNTER_NAME_RE.match(defn.name):
        violations.add(f"{prefix}.name", f"must match {COUNTER_NAME_RE.pattern}")
    if not defn.event_type:
        violations.add(f"{prefix}.event_type", "is required")
    elif not isinstance(defn.event_type, str) or not EVENT_TYPE_RE.match(defn.event_type):
        violations.add(f"{prefix}.event_type", f"must match {EVENT_TYPE_RE.pattern}")
    if defn.property is not None and (
        not isinstance(defn.property, str) or not PROPERTY_NAME_RE.match(defn.property)
    ):
        violations.add(f"{prefix}.property", f"must match {PROPERTY_NAME_RE.pattern}")
    if defn.property_value is not None:
        if isinstance(defn.property_value, str) and len(defn.property_value) > MAX_PROPERTY_VALUE_CHARS:
            violations.add(
                f"{prefix}.property_value", f"must be at most {MAX_PROPERTY_VALUE_CHARS} characters"
            )
        elif not _is_property_value(defn.property_value):
            violations.add(f"{prefix}.property_value", "must be a string, a finite number or a boolean")
    if defn.property is not None and defn.property_value is None:
        violations.add(f"{prefix}.property_value", "is required when property is set")
    if defn.property is None and defn.property_value is not None:
        violations.add(f"{prefix}.property", "is required when property_value is set")
    allowed = ", ".join(str(d) for d in WINDOW_DAYS)
    if not isinstance(defn.windows, tuple | list) or not defn.windows:
        violations.add(f"{prefix}.windows", f"must list at least one of {allowed} days")
        return
    if not isinstance(defn.thresholds, tuple | list) or len(defn.thresholds) > MAX_THRESHOLDS:
        violations.add(f"{prefix}.thresholds", f"must list at most {MAX_THRESHOLDS} counts")
    else:
        for i, threshold in enumerate(defn.thresholds):
            if isinstance(threshold, bool) or not isinstance(threshold, int) or threshold < 1:
                violations.add(f"{prefix}.thresholds[{i}]", "must be a whole number of at least 1")
    seen: set[object] = set()
    for i, days in enumerate(defn.windows):
        if isinstance(days, bool) or days not in WINDOW_DAYS:
            violations.add(f"{prefix}.windows[{i}]", f"must be one of {allowed} days")
        elif days in seen:
            violations.add(f"{prefix}.windows[{i}]", "is listed twice")
        seen.add(days)


def validate_counter(defn: CounterDefinition, prefix: str = "counter") -> CounterDefinition:
    """The definition with its windows sorted; raises InvalidArgument naming each offending field."""
    violations = Violations()
    check_counter(defn, prefix, violations)
    violations.raise_if_any()
    return CounterDefinition(
        defn.name,
        defn.event_type,
        tuple(sorted(defn.windows)),
        defn.property,
        defn.property_value,
        tuple(sorted(set(defn.thresholds))),
    )


def validate_counters(
    defns: Iterable[CounterDefinition], prefix: str = "counters"
) -> list[CounterDefinition]:
    """A tenant's whole set: each valid, names unique, at most MAX_COUNTERS_PER_TENANT."""
    items = list(defns)
    violations = Violations()
    if len(items) > MAX_COUNTERS_PER_TENANT:
        violations.add(prefix, f"at most {MAX_COUNTERS_PER_TENANT} counters per tenant, got {len(items)}")
    names: set[str] = set()
    for i, defn in enumerate(items):
        check_counter(defn, f"{prefix}[{i}]", violations)
        if defn.name in names:
            violations.add(f"{prefix}[{i}].name", f"{defn.name} is defined twice")
        names.add(defn.name)
    violations.raise_if_any()
    return [validate_counter(defn) for defn in items]


# ---------------------------------------------------------------------------------------------- buckets


def bucket_day(at: datetime, tz: tzinfo = UTC) -> date:
    """The day bucket of an instant in the person's zone; a naive datetime is taken as UTC."""
    if at.tzinfo is None:
        at = at.replace(tzinfo=UTC)
    return at.astimezone(tz).date()


def _window_days(window: timedelta) -> int:
    if window <= timedelta(0) or window % timedelta(days=1):
        raise ValueError(f"a counter window is a whole number of days, got {window}")
    return window.days


def add(counts: Mapping[date, int], at: datetime, n: int = 1, tz: tzinfo = UTC) -> dict[date, int]:
    """`counts` with `n` more events on the day of `at`."""
    day = bucket_day(at, tz)
    out = dict(counts)
    out[day] = out.get(day, 0) + n
    return out


def count_in_window(counts: Mapping[date, int], now: datetime, window: timedelta, tz: tzinfo = UTC) -> int:
    """Events on today and the window.days - 1 days before (days after today are not counted)."""
    today = bucket_day(now, tz)
    first = today - timedelta(days=_window_days(window) - 1)
    return sum(n for day, n in counts.items() if first <= day <= today)


def prune(counts: Mapping[date, int], now: datetime, keep_days: int, tz: tzinfo = UTC) -> dict[date, int]:
    """Only the buckets the last `keep_days` days (today included) still need; empty ones go too."""
    if keep_days < 1:
        return {}
    first = bucket_day(now, tz) - timedelta(days=keep_days - 1)
    return {day: n for day, n in counts.items() if day >= first and n}


def merge(into: Mapping[date, int], other: Mapping[date, int]) -> dict[date, int]:
    """A shadow profile's buckets merged into the known profile's: the sum per day."""
    out = dict(into)
    for day, n in other.items():
        out[day] = out.get(day, 0) + n
    return out


def crossed(before: int | float, after: int | float, threshold: int | float) -> bool:
    """Whether a value went from below `threshold` to at or above it (upward crossings only), so a
    threshold trigger fires once per climb, not on every event above it, and not when it falls."""
    return before < threshold <= after


# ---------------------------------------------------------------------------------------------- lead score


def decayed_score(points: Iterable[tuple[datetime, float]], now: datetime, half_life: timedelta) -> float:
    """The sum of points, each halved for every `half_life` since it was earned (exponential decay).
    Points stamped after `now` count in full. Naive datetimes are taken as UTC."""
    if half_life <= timedelta(0):
        raise ValueError(f"half_life must be positive, got {half_life}")
    if now.tzinfo is None:
        now = now.replace(tzinfo=UTC)
    half = half_life.total_seconds()
    total = 0.0
    for at, value in points:
        if at.tzinfo is None:
            at = at.replace(tzinfo=UTC)
        age = max((now - at).total_seconds(), 0.0)
        total += value * 0.5 ** (age / half)
    return total
