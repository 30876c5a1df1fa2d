"""Protobuf enum numbers <-> the lower-case names the domain uses (`CHANNEL_EMAIL` <-> "email").

Enums follow the Buf style: every value carries the enum's prefix and zero is `<PREFIX>UNSPECIFIED`,
so a name without its prefix is what the domain and the database keep.
"""

from __future__ import annotations

from typing import Any

_NAMES: dict[tuple[int, str], dict[int, str]] = {}
_VALUES: dict[tuple[int, str], dict[str, int]] = {}


def _tables(enum: Any, prefix: str) -> tuple[dict[int, str], dict[str, int]]:
    """Both directions of one generated enum (e.g. `common_pb2.Channel`), built once: these run for
    every consent of every profile read."""
    key = (id(enum), prefix)
    names = _NAMES.get(key)
    if names is None:
        names = {number: name.removeprefix(prefix).lower() for name, number in enum.items()}
        _VALUES[key] = {name: number for number, name in names.items()}
        _NAMES[key] = names
    return names, _VALUES[key]


def enum_name(enum: Any, value: int, prefix: str) -> str:
    """`CHANNEL_EMAIL` -> "email"; a number the enum does not know stays a number ("7"), so a newer
    client's value is reported, not mistaken for another."""
    name = _tables(enum, prefix)[0].get(value)
    return str(value) if name is None else name


def enum_value(enum: Any, name: str, prefix: str) -> Any:
    """The number of a name: "email" -> `CHANNEL_EMAIL`; a name the enum does not know is 0, its
    `_UNSPECIFIED` value. (An int, typed Any: each generated enum types its numbers as its own
    ValueType.)"""
    return _tables(enum, prefix)[1].get(name.lower(), 0)
