"""Local time of day in a person's time zone, as UTC instants that daylight saving never skips
or doubles.

A local time that does not exist on a day (the hour clocks skip in spring) is the same instant
as that time read with the offset before the change: 02:30 on a night that jumps from 02:00 to
03:00 is 03:30 local. A local time that occurs twice (the hour clocks repeat in autumn) is its
first occurrence. Each day's instant is computed on its own, so a daily or yearly time stays at
its local time across the change.
"""

from __future__ import annotations

from datetime import UTC, date, datetime, time
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError


def zone(name: str) -> ZoneInfo | None:
    """The IANA zone of that name, None when there is none."""
    if not name or name != name.strip() or len(name) > 64:
        return None
    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError):
        return None


def at_local(day: date, at: time, tz: ZoneInfo) -> datetime:
    """The UTC instant of local `at` on `day` in `tz` (rules in the module docstring)."""
    return datetime.combine(day, at, tzinfo=tz).astimezone(UTC)


def local_date(instant: datetime, tz: ZoneInfo) -> date:
    return instant.astimezone(tz).date()
