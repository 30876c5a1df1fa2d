"""Small conversions between protobuf well-known types and Python values.

Struct and Value numbers are doubles on the wire. As Python they follow one rule everywhere: a
whole number of at most 2**53 in magnitude (exact in a double) becomes an int, so a quantity of 2
stays 2 in a message, a JSON document and a condition; any other finite number stays a float;
NaN and the infinities, which JSON has no way to write, become None.

A Value with no kind set is not null (null is `null_value`): it is what a client of another
language sends for a value it forgot to fill in. Where a client's Struct becomes data (event
properties, traits) it is converted with `unset=UNSET`, and the domain refuses `UNSET` naming
where it was (`unset_paths`, `UNSET_PROBLEM`): one rule for every such field. Elsewhere it is None.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any, Final

from google.protobuf import duration_pb2, struct_pb2, timestamp_pb2

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def timestamp_parts(value: datetime) -> tuple[int, int]:
    """The (seconds, nanos) of a Timestamp of an aware datetime (a naive one is taken as UTC)."""
    if value.tzinfo is None:
        value = value.replace(tzinfo=UTC)
    delta = value - _EPOCH
    return delta.days * 86400 + delta.seconds, delta.microseconds * 1000


def to_timestamp(value: datetime | None) -> timestamp_pb2.Timestamp | None:
    """A Timestamp of a datetime (see `timestamp_parts`); exact to the microsecond, and cheaper
    than Timestamp.FromDatetime, which matters on the ingest path."""
    if value is None:
        return None
    seconds, nanos = timestamp_parts(value)
    return timestamp_pb2.Timestamp(seconds=seconds, nanos=nanos)


_MICROSECOND = timedelta(microseconds=1)


def from_timestamp(ts: timestamp_pb2.Timestamp) -> datetime:
    """The aware (UTC) datetime of a Timestamp, as `ToDatetime(tzinfo=UTC)` gives it, in a third of
    the time (an integer number of microseconds times one, not a timedelta built from keywords);
    ValueError or OverflowError for one no datetime holds."""
    nanos = ts.nanos
    if not 0 <= nanos < 1_000_000_000:
        raise ValueError(f"Timestamp nanos {nanos} out of range")
    return _EPOCH + (ts.seconds * 1_000_000 + nanos // 1000) * _MICROSECOND


def to_struct(value: dict[str, Any] | None) -> struct_pb2.Struct:
    s = struct_pb2.Struct()
    if value:
        s.update(value)
    return s


class Unset:
    """The type of `UNSET`: not a JSON value, so encoding one fails instead of writing null."""

    __slots__ = ()

    def __repr__(self) -> str:
        return "UNSET"


UNSET: Final = Unset()
UNSET_PROBLEM = "has no value: set one of the kinds of google.protobuf.Value (null_value for null)"


def from_struct(s: struct_pb2.Struct, unset: Any = None) -> dict[str, Any]:
    """A Struct as plain Python values (numbers by the module's rule; `unset` for a Value with no kind)."""
    fields = s.fields  # by key: iterating items() costs upb a third more
    return {k: from_value(fields[k], unset) for k in fields}


def from_duration(d: duration_pb2.Duration) -> timedelta:
    return d.ToTimedelta()


def to_duration(value: timedelta) -> duration_pb2.Duration:
    d = duration_pb2.Duration()
    d.FromTimedelta(value)
    return d


def checked_duration(d: duration_pb2.Duration) -> tuple[timedelta | None, bool]:
    """(timedelta, bad): proto Durations with mixed signs or nanos out of range are invalid."""
    if abs(d.nanos) >= 1_000_000_000 or (d.seconds > 0 and d.nanos < 0) or (d.seconds < 0 and d.nanos > 0):
        return None, True
    try:
        return d.ToTimedelta(), False
    except (ValueError, OverflowError):
        return None, True


_EXACT = 2.0**53


def from_value(v: struct_pb2.Value, unset: Any = None) -> Any:
    """A Struct Value as a plain Python value (numbers by the module's rule; `unset` for a Value with
    no kind set, which only the last branch pays for)."""
    kind = v.WhichOneof("kind")
    if kind == "string_value":
        return v.string_value
    if kind == "number_value":
        n = v.number_value
        if n.is_integer():  # False for NaN and the infinities
            return int(n) if -_EXACT <= n <= _EXACT else n
        return n if math.isfinite(n) else None
    if kind == "bool_value":
        return v.bool_value
    if kind == "struct_value":
        fields = v.struct_value.fields
        return {k: from_value(fields[k], unset) for k in fields}
    if kind == "list_value":
        return [from_value(x, unset) for x in v.list_value.values]
    return None if kind == "null_value" else unset


def unset_paths(value: Any, path: str) -> Iterator[str]:
    """Where `UNSET` is in a value `from_struct(..., unset=UNSET)` gave: `path.key`, `path.key[2]`
    (keys cut to 64 characters), in order. Walked only once encoding it has failed."""
    if value is UNSET:
        yield path
    elif type(value) is dict:
        for key, item in value.items():
            yield from unset_paths(item, f"{path}.{key[:64]}")
    elif type(value) is list:
        for i, item in enumerate(value):
            yield from unset_paths(item, f"{path}[{i}]")


def to_value(value: Any) -> struct_pb2.Value:
    """A plain JSON-like Python value as a Struct Value (None is null_value)."""
    v = struct_pb2.Value()
    if value is None:
        v.null_value = struct_pb2.NULL_VALUE
    elif isinstance(value, bool):
        v.bool_value = value
    elif isinstance(value, int | float):
        v.number_value = value
    elif isinstance(value, str):
        v.string_value = value
    elif isinstance(value, dict):
        v.struct_value.SetInParent()  # an empty dict is still a Struct, not an unset Value
        v.struct_value.update(value)
    elif isinstance(value, list | tuple):
        v.list_value.SetInParent()
        v.list_value.extend(value)
    else:
        raise TypeError(f"not a JSON value: {type(value).__name__}")
    return v


# Hand-written protobuf encoding, for the hot paths that build their messages' bytes themselves
# (profile's EnrichedEvent, delivery's GetBanner answers).
SMALL_VARINTS = [bytes((n,)) for n in range(0x80)]


def varint(n: int) -> bytes:
    """`n` as a protobuf varint (a negative int64 as its 64-bit two's complement)."""
    if 0 <= n < 0x80:
        return SMALL_VARINTS[n]
    if 0x1000_0000 <= n < 0x8_0000_0000:  # five bytes: the seconds (and most nanos) of a Timestamp
        return bytes(
            (n & 0x7F | 0x80, n >> 7 & 0x7F | 0x80, n >> 14 & 0x7F | 0x80, n >> 21 & 0x7F | 0x80, n >> 28)
        )
    n &= 0xFFFF_FFFF_FFFF_FFFF
    out = bytearray()
    while n > 0x7F:
        out.append(n & 0x7F | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)
