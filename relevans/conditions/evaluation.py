"""Evaluating a condition tree against what it sees of one profile (`ProfileView`): compiled once
into closures, so a call per event costs a few microseconds."""

from __future__ import annotations

import operator
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from types import MappingProxyType
from typing import TypeAlias

from .fields import (
    CONSENT,
    CONTAINS,
    COUNTER,
    EQ,
    EVENT,
    EXISTS,
    FIELD_OPS,
    GE,
    GT,
    IN,
    LAST_SEEN,
    LE,
    LT,
    NE,
    SCORE,
    TAG,
    TRAIT,
    split_field,
)
from .nodes import All, Any, Compare, Condition, CountInWindow, Not

# (event_type, window, property, property_value) -> count
WindowCounts: TypeAlias = Callable[[str, timedelta, "str | None", "object | None"], int]


def _no_window_counts(event_type: str, window: timedelta, prop: str | None, value: object | None) -> int:
    return 0


@dataclass(frozen=True, slots=True)
class ProfileView:
    """What a condition sees of one profile. Datetimes are tz-aware; `consents` maps
    (purpose, channel) to the current status; `window_counts` answers `CountInWindow` from counters;
    `event` is the properties of the event a trigger condition is evaluated on (empty for segments)."""

    traits: Mapping[str, object] = field(default_factory=dict)
    tags: frozenset[str] = frozenset()
    counters: Mapping[str, float] = field(default_factory=dict)
    score: float = 0.0
    consents: Mapping[tuple[str, str], str] = field(default_factory=dict)
    last_seen: Mapping[str, datetime] = field(default_factory=dict)
    window_counts: WindowCounts = _no_window_counts
    event: Mapping[str, object] = field(default_factory=dict)


Predicate: TypeAlias = Callable[[ProfileView], bool]

_MISSING = object()
_COMPARATORS: Mapping[str, Callable[..., bool]] = MappingProxyType(
    {EQ: operator.eq, NE: operator.ne, LT: operator.lt, LE: operator.le, GT: operator.gt, GE: operator.ge}
)


def _kind(value: object) -> str:
    """Type class for comparisons: booleans never equal numbers, numbers never equal strings."""
    if isinstance(value, bool):
        return "b"
    if isinstance(value, int | float):
        return "n"
    if isinstance(value, str):
        return "s"
    return "?"


def _items(value: object) -> tuple[object, ...]:
    return tuple(value) if isinstance(value, tuple | list | set | frozenset) else (value,)


def _getter(kind: str, keys: tuple[str, ...]) -> Callable[[ProfileView], object]:
    if kind == TRAIT:
        (name,) = keys

        def trait(view: ProfileView) -> object:
            value = view.traits.get(name, _MISSING)
            return _MISSING if value is None else value

        return trait
    if kind == EVENT:
        return _event_getter(keys[0])
    if kind == COUNTER:
        (name,) = keys
        return lambda view: view.counters.get(name, _MISSING)
    if kind == SCORE:
        return lambda view: view.score
    if kind == CONSENT:
        key = (keys[0], keys[1])
        return lambda view: view.consents.get(key, _MISSING)
    if kind == LAST_SEEN:
        (event_type,) = keys
        return lambda view: view.last_seen.get(event_type, _MISSING)
    raise ValueError(f"no getter for {kind}")


def _event_getter(name: str) -> Callable[[ProfileView], object]:
    """`event.<name>`: the property of that exact name first ("page.url" as one key), else the
    dotted path into nested objects ({"page": {"url": ...}})."""
    parts = tuple(name.split("."))
    if len(parts) == 1:

        def flat(view: ProfileView) -> object:
            value = view.event.get(name, _MISSING)
            return _MISSING if value is None else value

        return flat

    def nested(view: ProfileView) -> object:
        value = view.event.get(name, _MISSING)
        if value is _MISSING:
            value = view.event
            for part in parts:
                if not isinstance(value, Mapping):
                    return _MISSING
                value = value.get(part, _MISSING)
        return _MISSING if value is None else value

    return nested


def _compile_compare(cond: Compare) -> Predicate:
    split = split_field(cond.field)
    if split is None or cond.op not in FIELD_OPS[split[0]]:
        raise ValueError(f"invalid condition {cond!r}; validate it with check_condition")
    kind, keys = split
    op, target = cond.op, cond.value
    if kind == TAG:
        if op == CONTAINS:
            return lambda view: target in view.tags
        wanted = frozenset(_items(target))
        return lambda view: not view.tags.isdisjoint(wanted)
    get = _getter(kind, keys)
    missing = _MISSING
    if op == EXISTS:
        return lambda view: get(view) is not missing
    if op == IN:
        members = frozenset((_kind(item), item) for item in _items(target))

        def is_in(view: ProfileView) -> bool:
            value = get(view)
            if value is missing:
                return False
            kind = _kind(value)
            return kind != "?" and (kind, value) in members  # lists, dicts: unhashable, never "in"

        return is_in
    if op == CONTAINS:  # traits and event properties: a substring of a string, a member of a list
        target_kind = _kind(target)

        def contains(view: ProfileView) -> bool:
            value = get(view)
            if isinstance(value, str):
                return isinstance(target, str) and target in value
            if isinstance(value, list | tuple | set | frozenset):
                return any(_kind(item) == target_kind and item == target for item in value)
            return False

        return contains
    compare = _COMPARATORS[op]
    if kind in (COUNTER, SCORE, LAST_SEEN, CONSENT):
        # The value's type is known (number, datetime, status), only its presence is not.
        if op == NE:
            return lambda view: (value := get(view)) is missing or compare(value, target)
        return lambda view: (value := get(view)) is not missing and compare(value, target)
    # Traits and event properties: any JSON value; compare only like with like.
    target_kind = _kind(target)
    if op == NE:

        def trait_ne(view: ProfileView) -> bool:
            value = get(view)
            return value is missing or _kind(value) != target_kind or value != target

        return trait_ne
    if op == EQ:

        def trait_eq(view: ProfileView) -> bool:
            value = get(view)
            return value is not missing and _kind(value) == target_kind and value == target

        return trait_eq

    def trait_order(view: ProfileView) -> bool:  # lt le gt ge: numbers only (validated)
        value = get(view)
        return value is not missing and _kind(value) == "n" and compare(value, target)

    return trait_order


def _compile(cond: Condition) -> Predicate:
    if isinstance(cond, Compare):
        return _compile_compare(cond)
    if isinstance(cond, CountInWindow):
        compare = _COMPARATORS[cond.op]
        event_type, window, prop, prop_value, target = (
            cond.event_type,
            cond.window,
            cond.property,
            cond.property_value,
            cond.value,
        )
        return lambda view: compare(view.window_counts(event_type, window, prop, prop_value), target)
    if isinstance(cond, Not):
        inner = _compile(cond.child)
        return lambda view: not inner(view)
    if isinstance(cond, All | Any):
        parts = tuple(_compile(child) for child in cond.children)
        if len(parts) == 1:
            return parts[0]
        if isinstance(cond, All):
            if len(parts) == 2:
                first, second = parts
                return lambda view: first(view) and second(view)

            def every(view: ProfileView) -> bool:
                for part in parts:  # noqa: SIM110 (a loop beats all() on a generator)
                    if not part(view):
                        return False
                return True

            return every
        if len(parts) == 2:
            first, second = parts
            return lambda view: first(view) or second(view)

        def some(view: ProfileView) -> bool:
            for part in parts:  # noqa: SIM110
                if part(view):
                    return True
            return False

        return some
    raise TypeError(f"not a condition: {cond!r}")


def compile_condition(cond: Condition) -> Predicate:
    """A closure evaluating `cond`: compile once (when a trigger or segment is loaded), call per event.
    Raises ValueError for a tree parse_condition would have rejected in ways evaluation cannot survive."""
    return _compile(cond)


def evaluate(cond: Condition, view: ProfileView) -> bool:
    """Whether `cond` holds for `view`. Compiles on every call: hot paths keep compile_condition's
    closure instead. (No cache keyed by the tree: Compare("trait.vip", "eq", True) == Compare(...,
    1) as dataclasses, yet they must evaluate differently.)"""
    return bool(_compile(cond)(view))
