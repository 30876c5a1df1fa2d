"""The trait_change kind: a trait's effective value takes a value (a tier becomes "gold"), leaves
it (changed or removed), or changes in any way.

Values compare by the condition language's rules: a boolean never equals a number, 1 equals 1.0.
Each firing is a message due when the change happened, keyed by the change, so a redelivered
change sends nothing new. A late change fires nothing. No state.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

from relevans.conditions import (
    MAX_STRING_CHARS,
    TRAIT_NAME_RE,
    Compare,
    Predicate,
    ProfileView,
    compile_condition,
)
from relevans.kit.errors import Violations
from services.trigger.domain.events import Fact, TraitChange, trait_route
from services.trigger.domain.intents import ScheduleTimer
from services.trigger.domain.kinds.common import FIRED, Stateless, late_note, note
from services.trigger.domain.kinds.contract import NOTHING, Context, Decision
from services.trigger.domain.triggers import Condition, RawCondition, TriggerDef

TAKES, LEAVES, CHANGED = "takes", "leaves", "changed"


@dataclass(frozen=True, slots=True)
class RawTraitChange:
    kind: ClassVar[str] = "trait_change"

    trait_name: str = ""
    # The TraitTransition name without its prefix, lower-case ("takes"; "unspecified").
    transition: str = "unspecified"
    # The value as a plain JSON value; None when unset.
    value: Any = None


def _same(a: object, b: object) -> bool:
    """Equal by the condition language's rules (booleans are not numbers; None is no value)."""
    if a is None or b is None:
        return a is b
    if isinstance(a, bool) or isinstance(b, bool):
        return type(a) is type(b) and a == b
    if isinstance(a, int | float) and isinstance(b, int | float):
        return a == b
    return type(a) is type(b) and a == b


@dataclass(frozen=True, slots=True)
class TraitChangeCondition:
    kind: ClassVar[str] = "trait_change"

    trait_name: str
    transition: str
    value: str | int | float | bool | None = None
    # `value ==` by the condition language's rules, compiled once.
    equal: Predicate = field(init=False, compare=False, repr=False)

    def __post_init__(self) -> None:
        object.__setattr__(
            self, "equal", compile_condition(Compare(f"trait.{self.trait_name}", "eq", self.value))
        )

    def fires(self, before: object, after: object) -> bool:
        if self.transition == CHANGED:
            return not _same(before, after)
        was = self.equal(ProfileView(traits={self.trait_name: before}))
        now = self.equal(ProfileView(traits={self.trait_name: after}))
        return (not was and now) if self.transition == TAKES else (was and not now)


def _trait_change(condition: Condition) -> TraitChangeCondition:
    assert isinstance(condition, TraitChangeCondition)
    return condition


class TraitChangeKind(Stateless):
    name = "trait_change"

    def validate(self, raw: RawCondition, field: str, v: Violations) -> TraitChangeCondition | None:
        assert isinstance(raw, RawTraitChange)
        before = len(v.items)
        if not raw.trait_name:
            v.add(f"{field}.trait_name", "is required")
        elif not TRAIT_NAME_RE.fullmatch(raw.trait_name):
            v.add(f"{field}.trait_name", f"must match {TRAIT_NAME_RE.pattern}")
        value = raw.value
        if raw.transition == "unspecified":
            v.add(f"{field}.transition", "is required")
        elif raw.transition not in (TAKES, LEAVES, CHANGED):
            v.add(f"{field}.transition", "must be TAKES, LEAVES or CHANGED")
        elif raw.transition == CHANGED:
            if value is not None:
                v.add(f"{field}.value", "must not be set for TRAIT_TRANSITION_CHANGED")
        elif value is None:
            v.add(f"{field}.value", "is required for TAKES and LEAVES")
        elif isinstance(value, str) and len(value) > MAX_STRING_CHARS:
            v.add(f"{field}.value", f"must be at most {MAX_STRING_CHARS} characters")
        elif not (isinstance(value, str | bool) or (isinstance(value, int | float) and math.isfinite(value))):
            v.add(f"{field}.value", "must be a string, a finite number or a boolean")
        if len(v.items) > before:
            return None
        return TraitChangeCondition(raw.trait_name, raw.transition, value)

    def to_json(self, condition: Condition) -> dict[str, Any]:
        c = _trait_change(condition)
        return {"trait_name": c.trait_name, "transition": c.transition, "value": c.value}

    def from_json(self, data: Mapping[str, Any]) -> TraitChangeCondition:
        return TraitChangeCondition(data["trait_name"], data["transition"], data.get("value"))

    def routes(self, condition: Condition, ctx: Context) -> frozenset[str]:
        return frozenset((trait_route(_trait_change(condition).trait_name),))

    def decide(self, trigger: TriggerDef, fact: Fact, state: Any | None, ctx: Context) -> Decision:
        c = _trait_change(trigger.condition)
        if not isinstance(fact, TraitChange) or not c.fires(fact.before, fact.after):
            return NOTHING
        if ctx.is_late(fact.occurred_at):
            return Decision(notes=(late_note(trigger, fact, ctx),))
        schedule = ScheduleTimer(
            tenant_id=fact.tenant_id,
            trigger_id=trigger.trigger_id,
            profile_id=fact.profile_id,
            occurrence=fact.fact_id,
            started_at=fact.occurred_at,
            due_at=fact.occurred_at,
            variables={"trait": c.trait_name, "before": fact.before, "after": fact.after},
        )
        code = {TAKES: "trait_took_value", LEAVES: "trait_left_value", CHANGED: "trait_changed"}[c.transition]
        reason = f"{c.trait_name} changed from {fact.before!r} to {fact.after!r}"
        fired = note(trigger, fact, ctx, FIRED, code, reason, occurrence=fact.fact_id, until=fact.occurred_at)
        return Decision((schedule,), notes=(fired,))


TRAIT_CHANGE = TraitChangeKind()
