"""A condition tree to its JSON-like form, for storage and the API (`parsing` reads it back)."""

from __future__ import annotations

from datetime import datetime

from .fields import EXISTS
from .nodes import All, Any, Compare, Condition, CountInWindow, Not


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
