"""The JSON-like form to a condition tree, validated fully: every offending field path is named in
one InvalidArgument, and the limits below keep a saved condition cheap to store and evaluate."""

from __future__ import annotations

import math
from datetime import datetime, timedelta

from relevans.kit.errors import Violations

from .fields import (
    CONSENT,
    COUNT_OPS,
    COUNTER,
    EVENT,
    EVENT_TYPE_RE,
    EXISTS,
    FIELD_OPS,
    IN,
    LAST_SEEN,
    OPS,
    ORDER_OPS,
    PROPERTY_NAME_RE,
    SCORE,
    STATUSES,
    TAG,
    TRAIT,
    field_help,
    split_field,
)
from .json_form import to_dict
from .nodes import All, Any, Compare, Condition, CountInWindow, Not

MAX_DEPTH = 10
MAX_NODES = 200
MAX_IN_VALUES = 100
MAX_STRING_CHARS = 256
MIN_WINDOW_DAYS = 1
MAX_WINDOW_DAYS = 365
MAX_COUNT_VALUE = 1_000_000_000

NODE_KEYS = ("all", "any", "not", "compare", "count")
COMPARE_KEYS = ("field", "op", "value")
COUNT_KEYS = ("event_type", "window_days", "op", "value", "property", "property_value")


def _is_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _is_scalar(value: object) -> bool:
    return isinstance(value, str | bool) or _is_number(value)


EVENT_FIELD_PROBLEM = "event fields exist only in trigger conditions"
TRIGGER_COUNT_PROBLEM = "count is not available in trigger conditions; use a threshold trigger"


class _Parser:
    def __init__(self, root: str, trigger: bool) -> None:
        self.root = root
        self.trigger = trigger
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
                self.violations.add(f"{path}.field", field_help(field_path))
            elif split[0] == EVENT and not self.trigger:
                self.violations.add(f"{path}.field", EVENT_FIELD_PROBLEM)
                split = None
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
        elif kind in (TRAIT, EVENT):
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
        if self.trigger:  # the trigger service has no counter definitions to answer it from
            self.violations.add(path, TRIGGER_COUNT_PROBLEM)
            return placeholder
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


def parse_condition(data: object, path: str = "condition", *, trigger: bool = False) -> Condition:
    """The condition a JSON-like dict describes; raises InvalidArgument naming every offending path
    under `path` (e.g. "condition.all[1].count.window_days"). A trigger's condition (`trigger`) may
    name `event.<property>` and may not `count`; a segment's the other way round."""
    parser = _Parser(path, trigger)
    result = parser.node(data, path, 1)
    parser.violations.raise_if_any()
    return result


def check_condition(cond: Condition, path: str = "condition", *, trigger: bool = False) -> None:
    """Validates a tree built in code as parse_condition would; raises InvalidArgument."""
    parse_condition(to_dict(cond), path, trigger=trigger)
