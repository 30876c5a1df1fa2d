"""The condition tree: its node types and walks over it."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta
from typing import TypeAlias

Scalar: TypeAlias = str | int | float | bool


@dataclass(frozen=True, slots=True)
class All:
    """True when every child is (vacuously true without children)."""

    children: tuple[Condition, ...]


@dataclass(frozen=True, slots=True)
class Any:
    """True when at least one child is (false without children)."""

    children: tuple[Condition, ...]


@dataclass(frozen=True, slots=True)
class Not:
    child: Condition


@dataclass(frozen=True, slots=True)
class Compare:
    """`field` op `value`. `value` is a scalar; a tuple of them for `in`; a tz-aware datetime for
    `last_seen.*`; None for `exists`."""

    field: str
    op: str
    value: object = None


@dataclass(frozen=True, slots=True)
class CountInWindow:
    """The number of `event_type` events (with `properties[property] == property_value` when set) in
    the last `window` (whole days), compared with `value`."""

    event_type: str
    window: timedelta
    op: str
    value: int
    property: str | None = None
    property_value: Scalar | None = None


Condition: TypeAlias = All | Any | Not | Compare | CountInWindow


def iter_nodes(cond: Condition) -> list[Condition]:
    """Every node of the tree, depth first, the root first."""
    out: list[Condition] = []
    stack: list[Condition] = [cond]
    while stack:
        node = stack.pop()
        out.append(node)
        if isinstance(node, All | Any):
            stack.extend(reversed(node.children))
        elif isinstance(node, Not):
            stack.append(node.child)
    return out


def window_counts_needed(cond: Condition) -> frozenset[tuple[str, timedelta, str | None, object | None]]:
    """The (event_type, window, property, property_value) questions the condition asks `window_counts`,
    so a caller can fetch (or check counter definitions cover) them up front."""
    return frozenset(
        (node.event_type, node.window, node.property, node.property_value)
        for node in iter_nodes(cond)
        if isinstance(node, CountInWindow)
    )


def needs_profile(cond: Condition) -> bool:
    """Whether the condition looks at the profile at all (a trigger condition only on `event.*`
    fields does not, and spares decoding the profile)."""
    return any(
        isinstance(node, CountInWindow) or (isinstance(node, Compare) and not node.field.startswith("event."))
        for node in iter_nodes(cond)
    )
