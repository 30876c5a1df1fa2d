"""Segment and trigger conditions as data: a typed expression tree, its validation and fast evaluation.

A condition is one of

- `All(children)` / `Any(children)`: every / at least one child holds (`All(())` is true, `Any(())` false,
  though `parse_condition` rejects empty lists);
- `Not(child)`;
- `Compare(field, op, value)`: a field of the profile view against a constant;
- `CountInWindow(event_type, window, op, value, property, property_value)`: how many events of a type
  (optionally with `properties[property] == property_value`) the person had in the last `window`,
  answered from the counters.

Fields are dotted paths into a `ProfileView`:

| field                          | type      | ops                                        |
|--------------------------------|-----------|--------------------------------------------|
| `trait.<name>`                 | any       | eq ne lt le gt ge (numbers) in contains exists |
| `tag`                          | tags      | contains (has the tag), in (has any of them) |
| `counter.<name>`               | number    | eq ne lt le gt ge in exists                |
| `score`                        | number    | eq ne lt le gt ge in                       |
| `consent.<purpose>.<channel>`  | status    | eq ne in exists                            |
| `last_seen.<event_type>`       | datetime  | eq ne lt le gt ge exists                   |

A value that is missing (no such trait, counter, consent or last-seen time, or a trait of another type)
compares false, except that `ne` is then true and `exists` is what it says.

The JSON-like form, for storage and the API:

    {"all": [{"compare": {"field": "trait.vip", "op": "eq", "value": true}},
             {"count": {"event_type": "page_view", "property": "category", "property_value": "toys",
                        "window_days": 7, "op": "ge", "value": 11}}]}

`parse_condition` validates it fully and raises `InvalidArgument` naming every offending path
(`condition.all[1].count.window_days`); `to_dict` is its inverse. `compile_condition` turns a tree into
a closure once, so evaluating it per event costs a few microseconds.

Pure: stdlib only, no I/O.
"""

from __future__ import annotations

import math
import operator
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from types import MappingProxyType
from typing import TypeAlias

from relevans.kit.errors import Violations

# Mirrors services.profile.domain.events.EVENT_TYPE_RE and consent.PURPOSES/CHANNELS/STATUSES (those
# modules pull in third-party validators; this one stays stdlib-only). A unit test keeps them in sync.
EVENT_TYPE_RE = re.compile(r"^[a-z][a-z0-9_.:-]{0,63}$")
PURPOSES = ("marketing", "transactional", "profiling")
CHANNELS = ("email", "sms", "web", "webhook")
STATUSES = ("granted", "denied", "withdrawn")

COUNTER_NAME_RE = re.compile(r"^[a-z][a-z0-9_]{0,62}$")
TRAIT_NAME_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_-]{0,63}$")
PROPERTY_NAME_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_.-]{0,63}$")

MAX_DEPTH = 10
MAX_NODES = 200
MAX_IN_VALUES = 100
MAX_STRING_CHARS = 256
MIN_WINDOW_DAYS = 1
MAX_WINDOW_DAYS = 365
MAX_COUNT_VALUE = 1_000_000_000

EQ, NE, LT, LE, GT, GE, IN, CONTAINS, EXISTS = "eq", "ne", "lt", "le", "gt", "ge", "in", "contains", "exists"
OPS = (EQ, NE, LT, LE, GT, GE, IN, CONTAINS, EXISTS)
ORDER_OPS = (LT, LE, GT, GE)
COUNT_OPS = (EQ, NE, LT, LE, GT, GE)

# Field kinds and the ops each allows.
TRAIT, TAG, COUNTER, SCORE, CONSENT, LAST_SEEN = "trait", "tag", "counter", "score", "consent", "last_seen"
FIELD_OPS: Mapping[str, tuple[str, ...]] = MappingProxyType(
    {
        TRAIT: OPS,
        TAG: (CONTAINS, IN),
        COUNTER: (EQ, NE, LT, LE, GT, GE, IN, EXISTS),
        SCORE: (EQ, NE, LT, LE, GT, GE, IN),
        CONSENT: (EQ, NE, IN, EXISTS),
        LAST_SEEN: (EQ, NE, LT, LE, GT, GE, EXISTS),
    }
)

NODE_KEYS = ("all", "any", "not", "compare", "count")
COMPARE_KEYS = ("field", "op", "value")
COUNT_KEYS = ("event_type", "window_days", "op", "value", "property", "property_value")

Scalar: TypeAlias = str | int | float | bool

# ---------------------------------------------------------------------------------------------- the tree


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

# (event_type, window, property, property_value) -> count
WindowCounts: TypeAlias = Callable[[str, timedelta, "str | None", "object | None"], int]


def _no_window_counts(event_type: str, window: timedelta, prop: str | None, value: object | None) -> int:
    return 0


@dataclass(frozen=True, slots=True)
class ProfileView:
    """What a condition sees of one profile. Datetimes are tz-aware; `consents` maps
    (purpose, channel) to the current status; `window_counts` answers `CountInWindow` from counters."""

    traits: Mapping[str, object] = field(default_factory=dict)
    tags: frozenset[str] = frozenset()
    counters: Mapping[str, float] = field(default_factory=dict)
    score: float = 0.0
    consents: Mapping[tuple[str, str], str] = field(default_factory=dict)
    last_seen: Mapping[str, datetime] = field(default_factory=dict)
    window_counts: WindowCounts = _no_window_counts


# ---------------------------------------------------------------------------------------------- fields


def split_field(path: str) -> tuple[str, tuple[str, ...]] | None:
    """(kind, keys) for a valid field path, None otherwise: "consent.marketing.email" ->
    ("consent", ("marketing", "email"))."""
    if not isinstance(path, str):
        return None
    if path in (TAG, SCORE):
        return (path, ())
    head, dot, rest = path.partition(".")
    if not dot:
        return None
    if head == TRAIT and TRAIT_NAME_RE.match(rest):
        return (TRAIT, (rest,))
    if head == COUNTER and COUNTER_NAME_RE.match(rest):
        return (COUNTER, (rest,))
    if head == LAST_SEEN and EVENT_TYPE_RE.match(rest):
        return (LAST_SEEN, (rest,))
    if head == CONSENT:
        purpose, dot2, channel = rest.partition(".")
        if dot2 and purpose in PURPOSES and channel in CHANNELS:
            return (CONSENT, (purpose, channel))
    return None


_FIELD_HELP = (
    "must be trait.<name>, tag, counter.<name>, score, consent.<purpose>.<channel> or last_seen.<event_type>"
)


def _field_help(path: object) -> str:
    if isinstance(path, str):
        head = path.partition(".")[0]
        if head == TRAIT:
            return f"the trait name must match {TRAIT_NAME_RE.pattern}"
        if head == COUNTER:
            return f"the counter name must match {COUNTER_NAME_RE.pattern}"
        if head == LAST_SEEN:
            return f"the event type must match {EVENT_TYPE_RE.pattern}"
        if head == CONSENT:
            return f"must be consent.<{'|'.join(PURPOSES)}>.<{'|'.join(CHANNELS)}>"
    return _FIELD_HELP


# ---------------------------------------------------------------------------------------------- parsing


def _is_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _is_scalar(value: object) -> bool:
    return isinstance(value, str | bool) or _is_number(value)


class _Parser:
    def __init__(self, root: str) -> None:
        self.root = root
        self.violations = Violations()
        self.nodes = 0
        self.too_deep = False

    def node(self, data: object, path: str, depth: int) -> Condition:
        placeholder: Condition = All(())
        self.nodes += 1
        if self.nodes > MAX_NODES:
            if self.nodes == MAX_NODES + 1:
                self.violations.add(self.root, f"must have at most {MAX_NODES} nodes")
            return placeholder
        if depth > MAX_DEPTH:
            if not self.too_deep:
                self.too_deep = True
                self.violations.add(path, f"must not nest deeper than {MAX_DEPTH} levels")
            return placeholder
        if not isinstance(data, dict):
            self.violations.add(path, f"must be an object with one of {', '.join(NODE_KEYS)}")
            return placeholder
        for key in data:
            if key not in NODE_KEYS:
                self.violations.add(f"{path}.{key}", "unknown key")
        known = [key for key in NODE_KEYS if key in data]
        if len(known) != 1:
            if known or len(data) == 0:
                got = f", got {', '.join(known)}" if known else ""
                self.violations.add(path, f"must have exactly one of {', '.join(NODE_KEYS)}{got}")
            return placeholder
        key = known[0]
        body = data[key]
        sub = f"{path}.{key}"
        if key in ("all", "any"):
            if not isinstance(body, list | tuple):
                self.violations.add(sub, "must be a list of conditions")
                return placeholder
            if not body:
                self.violations.add(sub, "must not be empty")
                return placeholder
            children: list[Condition] = []
            for i, child in enumerate(body):
                if self.nodes >= MAX_NODES + 1:
                    break
                children.append(self.node(child, f"{sub}[{i}]", depth + 1))
            return All(tuple(children)) if key == "all" else Any(tuple(children))
        if key == "not":
            return Not(self.node(body, sub, depth + 1))
        if key == "compare":
            return self.compare(body, sub)
        return self.count(body, sub)

    def _object(self, body: object, path: str, keys: tuple[str, ...]) -> dict[str, object] | None:
        if not isinstance(body, dict):
            self.violations.add(path, "must be an object")
            return None
        for key in body:
            if key not in keys:
                self.violations.add(f"{path}.{key}", "unknown key")
        return body

    def compare(self, body: object, path: str) -> Condition:
        placeholder: Condition = All(())
        obj = self._object(body, path, COMPARE_KEYS)
        if obj is None:
            return placeholder
        field_path, op, value = obj.get("field"), obj.get("op"), obj.get("value")
        split = None
        if field_path is None or field_path == "":
            self.violations.add(f"{path}.field", "is required")
        else:
            split = split_field(field_path)  # type: ignore[arg-type]
            if split is None:
                self.violations.add(f"{path}.field", _field_help(field_path))
        op_ok = False
        if op is None or op == "":
            self.violations.add(f"{path}.op", "is required")
        elif op not in OPS:
            self.violations.add(f"{path}.op", f"must be one of {', '.join(OPS)}")
        elif split is not None and op not in FIELD_OPS[split[0]]:
            allowed = ", ".join(FIELD_OPS[split[0]])
            self.violations.add(f"{path}.op", f"{op} is not allowed on {field_path}; use one of {allowed}")
        else:
            op_ok = True
        if split is None or not op_ok:
            return placeholder
        assert isinstance(field_path, str) and isinstance(op, str)
        kind = split[0]
        vpath = f"{path}.value"
        if op == EXISTS:
            if value is not None:
                self.violations.add(vpath, "must not be set for exists")
            return Compare(field_path, op, None)
        if value is None:
            self.violations.add(vpath, "is required")
            return placeholder
        if op == IN:
            if not isinstance(value, list | tuple):
                self.violations.add(vpath, "must be a list for in")
                return placeholder
            if not 1 <= len(value) <= MAX_IN_VALUES:
                self.violations.add(vpath, f"must have between 1 and {MAX_IN_VALUES} values")
                return placeholder
            items = tuple(self.operand(kind, op, item, f"{vpath}[{i}]") for i, item in enumerate(value))
            return Compare(field_path, op, items)
        return Compare(field_path, op, self.operand(kind, op, value, vpath))

    def operand(self, kind: str, op: str, value: object, path: str) -> object:
        add = self.violations.add
        if isinstance(value, str) and len(value) > MAX_STRING_CHARS:
            add(path, f"must be at most {MAX_STRING_CHARS} characters")
        elif kind == TRAIT:
            if op in ORDER_OPS:
                if not _is_number(value):
                    add(path, f"must be a number for {op}")
            elif not _is_scalar(value):
                add(path, "must be a string, a finite number or a boolean")
        elif kind in (COUNTER, SCORE):
            if not _is_number(value):
                add(path, f"must be a number for {op} on a number field")
        elif kind == CONSENT:
            if value not in STATUSES or not isinstance(value, str):
                add(path, f"must be one of {', '.join(STATUSES)}")
        elif kind == TAG:
            if not isinstance(value, str) or not value:
                add(path, "must be a non-empty string")
            else:
                return value.casefold()  # tags are stored case-folded
        elif kind == LAST_SEEN:
            return self.when(value, path)
        return value

    def when(self, value: object, path: str) -> object:
        parsed: datetime | None = None
        if isinstance(value, datetime):
            parsed = value
        elif isinstance(value, str):
            try:
                parsed = datetime.fromisoformat(value)
            except ValueError:
                parsed = None
        if parsed is None or parsed.tzinfo is None or parsed.utcoffset() is None:
            self.violations.add(path, "must be an ISO 8601 datetime with a UTC offset")
            return value
        return parsed

    def count(self, body: object, path: str) -> Condition:
        placeholder: Condition = All(())
        obj = self._object(body, path, COUNT_KEYS)
        if obj is None:
            return placeholder
        add = self.violations.add
        before = len(self.violations.items)
        event_type, days, op, value = (
            obj.get("event_type"),
            obj.get("window_days"),
            obj.get("op"),
            obj.get("value"),
        )
        prop, prop_value = obj.get("property"), obj.get("property_value")
        if event_type is None or event_type == "":
            add(f"{path}.event_type", "is required")
        elif not isinstance(event_type, str) or not EVENT_TYPE_RE.match(event_type):
            add(f"{path}.event_type", f"must match {EVENT_TYPE_RE.pattern}")
        if days is None:
            add(f"{path}.window_days", "is required")
        elif not isinstance(days, int) or isinstance(days, bool):
            add(f"{path}.window_days", "must be a whole number of days")
        elif not MIN_WINDOW_DAYS <= days <= MAX_WINDOW_DAYS:
            add(f"{path}.window_days", f"must be between {MIN_WINDOW_DAYS} and {MAX_WINDOW_DAYS}")
        if op is None or op == "":
            add(f"{path}.op", "is required")
        elif op not in COUNT_OPS:
            add(f"{path}.op", f"must be one of {', '.join(COUNT_OPS)}")
        if value is None:
            add(f"{path}.value", "is required")
        elif not isinstance(value, int) or isinstance(value, bool) or not 0 <= value <= MAX_COUNT_VALUE:
            add(f"{path}.value", f"must be a whole number between 0 and {MAX_COUNT_VALUE}")
        if prop is not None and (not isinstance(prop, str) or not PROPERTY_NAME_RE.match(prop)):
            add(f"{path}.property", f"must match {PROPERTY_NAME_RE.pattern}")
        if prop_value is not None:
            if isinstance(prop_value, str) and len(prop_value) > MAX_STRING_CHARS:
                add(f"{path}.property_value", f"must be at most {MAX_STRING_CHARS} characters")
            elif not _is_scalar(prop_value):
                add(f"{path}.property_value", "must be a string, a finite number or a boolean")
        if prop is not None and prop_value is None:
            add(f"{path}.property_value", "is required when property is set")
        if prop is None and prop_value is not None:
            add(f"{path}.property", "is required when property_value is set")
        if len(self.violations.items) != before:
            return placeholder
        assert isinstance(event_type, str) and isinstance(days, int) and isinstance(op, str)
        assert isinstance(value, int)
        return CountInWindow(
            event_type,
            timedelta(days=days),
            op,
            value,
            prop if isinstance(prop, str) else None,
            prop_value,  # type: ignore[arg-type]
        )


def parse_condition(data: object, path: str = "condition") -> Condition:
    """The condition a JSON-like dict describes; raises InvalidArgument naming every offending path
    under `path` (e.g. "condition.all[1].count.window_days")."""
    parser = _Parser(path)
    result = parser.node(data, path, 1)
    parser.violations.raise_if_any()
    return result


def check_condition(cond: Condition, path: str = "condition") -> None:
    """Validates a tree built in code as parse_condition would; raises InvalidArgument."""
    parse_condition(to_dict(cond), path)


def to_dict(cond: Condition) -> dict[str, object]:
    """The JSON-like form of a condition; `parse_condition(to_dict(c)) == c`."""
    if isinstance(cond, All):
        return {"all": [to_dict(child) for child in cond.children]}
    if isinstance(cond, Any):
        return {"any": [to_dict(child) for child in cond.children]}
    if isinstance(cond, Not):
        return {"not": to_dict(cond.child)}
    if isinstance(cond, Compare):
        body: dict[str, object] = {"field": cond.field, "op": cond.op}
        if cond.op != EXISTS:
            body["value"] = _value_to_json(cond.value)
        return {"compare": body}
    if isinstance(cond, CountInWindow):
        count: dict[str, object] = {
            "event_type": cond.event_type,
            "window_days": cond.window.days,
            "op": cond.op,
            "value": cond.value,
        }
        if cond.property is not None:
            count["property"] = cond.property
            count["property_value"] = cond.property_value
        return {"count": count}
    raise TypeError(f"not a condition: {cond!r}")


def _value_to_json(value: object) -> object:
    if isinstance(value, tuple | list):
        return [_value_to_json(item) for item in value]
    if isinstance(value, datetime):
        return value.isoformat()
    return value


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


# ---------------------------------------------------------------------------------------------- evaluation

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
    if op == CONTAINS:  # traits only: a substring of a string, a member of a list
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
    # Traits: any JSON scalar; compare only like with like.
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
