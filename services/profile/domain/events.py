"""Event validation and normalisation: pure functions over plain values.

The servicer turns protobuf requests into `RawEvent`s; `validate_event` and
`validate_batch` either return normalised `Event`s or raise `InvalidArgument`
naming every offending field (`event.type`, `events[3].email`, ...).
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from functools import lru_cache
from itertools import islice
from typing import Any

import orjson
from email_validator import EmailNotValidError, validate_email

from relevans.kit.errors import FieldViolation, InvalidArgument, Violations
from relevans.kit.proto import UNSET_PROBLEM, unset_paths
from services.profile.domain.ids import uuid4_hex

EVENT_TYPE_RE = re.compile(r"^[a-z][a-z0-9_.:-]{0,63}$")
MAX_BATCH_EVENTS = 1000
MAX_ID_CHARS = 256
MAX_MESSAGE_ID_CHARS = 128
MAX_PROPERTIES_BYTES = 32 * 1024
MAX_PROPERTIES_DEPTH = 8
# Unset Values named per event (the first ones; one is enough to fix the client).
MAX_UNSET_NAMED = 10
MAX_CLOCK_SKEW = timedelta(minutes=5)
EARLIEST_TIMESTAMP = datetime(2000, 1, 1, tzinfo=UTC)


@dataclass(slots=True)
class RawEvent:
    """An event as the client sent it, before any check."""

    type: str = ""
    message_id: str = ""
    timestamp: datetime | None = None
    # True when the client sent a timestamp that cannot be represented as a datetime.
    bad_timestamp: bool = False
    anonymous_id: str = ""
    customer_id: str = ""
    email: str = ""
    properties: dict[str, Any] = field(default_factory=dict)


@dataclass(slots=True)
class Event:
    """A valid, normalised event: email lower-case, timestamp and message_id always set."""

    message_id: str
    type: str
    timestamp: datetime
    anonymous_id: str | None
    customer_id: str | None
    email: str | None
    properties: dict[str, Any]
    # The properties as compact JSON, as they are stored.
    properties_json: str


def new_message_id() -> str:
    return uuid4_hex()


@lru_cache(maxsize=65536)
def _check_email(value: str) -> tuple[str | None, str]:
    try:
        return validate_email(value, check_deliverability=False).normalized.lower(), ""
    except EmailNotValidError as exc:
        return None, str(exc)


def normalize_email(value: str) -> str:
    """The normalised lower-case form of a well-formed address; ValueError otherwise."""
    normalized, why = _check_email(value)
    if normalized is None:
        raise ValueError(why)
    return normalized


def check_email(value: str, path: str, violations: Violations) -> str | None:
    """Normalise `value`, or record why it is not an email address under `path`."""
    normalized, why = _check_email(value)
    if normalized is None:
        violations.add(path, f"is not a valid email address: {why}")
    return normalized


NUL = "\x00"  # PostgreSQL text (and jsonb) cannot hold it


def check_text(value: str, path: str, violations: Violations, limit: int) -> None:
    """A string field: at most `limit` characters, no NUL character."""
    if len(value) > limit:
        violations.add(path, f"must be at most {limit} characters")
    elif NUL in value:
        violations.add(path, "must not contain NUL characters")


# C0 and C1 control characters (line breaks, tabs, escapes, NUL) and the Unicode line and
# paragraph separators: a name is printed into greetings and message headers, where a line break
# would start a new line or header.
_CONTROL_CHARACTER = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029]")


def check_name(value: str, path: str, violations: Violations, limit: int) -> None:
    """A person's name: at most `limit` characters, no control character (see `_CONTROL_CHARACTER`)."""
    if len(value) > limit:
        violations.add(path, f"must be at most {limit} characters")
    elif _CONTROL_CHARACTER.search(value):
        violations.add(path, "must not contain control characters such as line breaks or tabs")


def check_id(value: str, path: str, violations: Violations, limit: int = MAX_ID_CHARS) -> str | None:
    """An optional identifier: empty means absent; too long or containing NUL is a violation."""
    if not value:
        return None
    before = len(violations.items)
    check_text(value, path, violations, limit)
    return value if len(violations.items) == before else None


def _has_nul(value: Any) -> bool:
    """Whether any string (or object key) in a JSON value contains a NUL character."""
    if type(value) is str:
        return NUL in value
    if type(value) is dict:
        return any(NUL in k or _has_nul(v) for k, v in value.items())
    if type(value) is list:
        return any(_has_nul(v) for v in value)
    return False


def _has_non_finite(value: Any) -> bool:
    """Whether a JSON value holds a NaN or an infinite number."""
    if type(value) is float:
        return not math.isfinite(value)
    if type(value) is dict:
        return any(_has_non_finite(v) for v in value.values())
    if type(value) is list:
        return any(_has_non_finite(v) for v in value)
    return False


def json_depth(value: Any, depth: int = 1) -> int:
    """Nesting depth of a JSON object or list: 1 for a flat one, +1 per nested object or list."""
    deepest = depth
    for item in value.values() if type(value) is dict else value:
        kind = type(item)
        if kind is dict or kind is list:
            deepest = max(deepest, json_depth(item, depth + 1))
            if deepest > MAX_PROPERTIES_DEPTH:
                break
    return deepest


def _path(index: int | None, name: str) -> str:
    """A field's path in a violation: `event.<name>` (Track), `events[<index>].<name>` (a batch)."""
    return f"event.{name}" if index is None else f"events[{index}].{name}"


def check_properties(properties: dict[str, Any], index: int | None, violations: Violations) -> str | None:
    """The properties as compact JSON, or None after recording why they are refused."""
    try:
        encoded = orjson.dumps(properties)
    except orjson.JSONEncodeError as exc:  # e.g. an unset Value, an integer beyond 64 bits, deep nesting
        unset = list(islice(unset_paths(properties, _path(index, "properties")), MAX_UNSET_NAMED))
        if unset:
            for path in unset:
                violations.add(path, UNSET_PROBLEM)
        elif json_depth(properties) > MAX_PROPERTIES_DEPTH:
            violations.add(
                _path(index, "properties"), f"must not nest deeper than {MAX_PROPERTIES_DEPTH} levels"
            )
        else:
            violations.add(_path(index, "properties"), f"cannot be written as JSON: {exc}")
        return None
    # one object and no list anywhere in the JSON (not even in a string): flat, no need to walk it
    if (b"[" in encoded or encoded.count(b"{") > 1) and json_depth(properties) > MAX_PROPERTIES_DEPTH:
        violations.add(_path(index, "properties"), f"must not nest deeper than {MAX_PROPERTIES_DEPTH} levels")
        return None
    # orjson writes NaN and infinities as null, NUL as \u0000 (which jsonb refuses): only where
    # those appear are the values searched.
    if b"null" in encoded and _has_non_finite(properties):
        violations.add(_path(index, "properties"), "must not contain NaN or infinite numbers")
        return None
    if b"\\u0000" in encoded and _has_nul(properties):
        violations.add(_path(index, "properties"), "must not contain NUL characters")
        return None
    if len(encoded) > MAX_PROPERTIES_BYTES:
        violations.add(_path(index, "properties"), f"must be at most {MAX_PROPERTIES_BYTES} bytes as JSON")
        return None
    return encoded.decode()


# Event types seen to be well formed (a tenant uses a few dozen; the regex costs more than a lookup).
_GOOD_TYPES: set[str] = set()
_MAX_GOOD_TYPES = 10_000


def _good_type(value: str) -> bool:
    if value in _GOOD_TYPES:
        return True
    if EVENT_TYPE_RE.match(value) is None:
        return False
    if len(_GOOD_TYPES) < _MAX_GOOD_TYPES:
        _GOOD_TYPES.add(value)
    return True


def _check_event(
    raw: RawEvent,
    now: datetime,
    latest: datetime,
    index: int | None,
    violations: Violations,
    make_message_id: Callable[[], str],
) -> Event | None:
    """The normalised event, or None after adding its violations (paths built only on failure:
    `index` is the event's in a batch, None for Track's one). `latest`: the latest timestamp
    accepted (now plus the clock skew allowed)."""
    before = len(violations.items)
    if not raw.type:
        violations.add(_path(index, "type"), "is required")
    elif not _good_type(raw.type):
        violations.add(_path(index, "type"), f"must match {EVENT_TYPE_RE.pattern}")
    if len(raw.message_id) > MAX_MESSAGE_ID_CHARS or NUL in raw.message_id:
        check_text(raw.message_id, _path(index, "message_id"), violations, MAX_MESSAGE_ID_CHARS)
    if len(raw.anonymous_id) > MAX_ID_CHARS or NUL in raw.anonymous_id:
        check_text(raw.anonymous_id, _path(index, "anonymous_id"), violations, MAX_ID_CHARS)
    if len(raw.customer_id) > MAX_ID_CHARS or NUL in raw.customer_id:
        check_text(raw.customer_id, _path(index, "customer_id"), violations, MAX_ID_CHARS)
    email = None
    if raw.email:
        email, why = _check_email(raw.email)
        if email is None:
            violations.add(_path(index, "email"), f"is not a valid email address: {why}")
    elif not raw.anonymous_id and not raw.customer_id:
        violations.add(_path(index, "anonymous_id"), "one of anonymous_id, customer_id or email is required")
    timestamp = raw.timestamp
    if timestamp is None:
        if raw.bad_timestamp:
            violations.add(_path(index, "timestamp"), "is not a valid timestamp")
        timestamp = now
    elif timestamp > latest:
        violations.add(_path(index, "timestamp"), "is in the future")
    elif timestamp < EARLIEST_TIMESTAMP:
        violations.add(_path(index, "timestamp"), "is before 2000-01-01")
    properties_json = check_properties(raw.properties, index, violations) if raw.properties else "{}"
    if properties_json is None or len(violations.items) > before:
        return None
    return Event(  # positional: this runs for every ingested event
        raw.message_id or make_message_id(),
        raw.type,
        timestamp,
        raw.anonymous_id or None,
        raw.customer_id or None,
        email,
        raw.properties,
        properties_json,
    )


def validate_event(
    raw: RawEvent, now: datetime, *, make_message_id: Callable[[], str] = new_message_id
) -> Event:
    """Validate one `Track` event; violations are named `event.<field>`."""
    violations = Violations()
    event = _check_event(raw, now, now + MAX_CLOCK_SKEW, None, violations, make_message_id)
    violations.raise_if_any()
    assert event is not None
    return event


def validate_event_count(n: int) -> None:
    """A `BatchTrack` carries 1 to MAX_BATCH_EVENTS events; checked before any event is converted."""
    if not 1 <= n <= MAX_BATCH_EVENTS:
        raise InvalidArgument(FieldViolation("events", f"must hold 1 to {MAX_BATCH_EVENTS} events, got {n}"))


def validate_batch(
    raws: Sequence[RawEvent], now: datetime, *, make_message_id: Callable[[], str] = new_message_id
) -> list[Event]:
    """Validate a `BatchTrack` request: all events or an error naming `events[i].<field>` for each bad one."""
    validate_event_count(len(raws))
    violations = Violations()
    latest = now + MAX_CLOCK_SKEW
    events = [_check_event(raw, now, latest, i, violations, make_message_id) for i, raw in enumerate(raws)]
    violations.raise_if_any()
    return [e for e in events if e is not None]


def first_occurrences(events: Sequence[Event]) -> list[int]:
    """For each event, the index of the first event in the batch with the same message_id."""
    seen: dict[str, int] = {}
    return [seen.setdefault(e.message_id, i) for i, e in enumerate(events)]
