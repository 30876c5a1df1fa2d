"""The trait_change kind: takes, leaves, changed, by the condition language's type rules."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from relevans.kit.errors import InvalidArgument
from services.trigger.domain import Context, RawTrigger, TraitChange, TriggerDef, validate_trigger
from services.trigger.domain.kinds.trait_change import TRAIT_CHANGE, RawTraitChange

T0 = datetime(2026, 5, 1, 12, tzinfo=UTC)
CTX = Context(now=T0)


def trigger(raw: RawTraitChange) -> TriggerDef:
    return validate_trigger(
        RawTrigger(trigger_id="tc", condition=raw, channel="email", purpose="marketing", template_id="t")
    )


def fires(t: TriggerDef, before: Any, after: Any) -> bool:
    fact = TraitChange("shop", "p1", "c1", "tier", before, after, {"tier": after}, T0)
    return bool(TRAIT_CHANGE.decide(t, fact, None, CTX).intents)


GOLD = trigger(RawTraitChange("tier", "takes", "gold"))
NOT_GOLD = trigger(RawTraitChange("tier", "leaves", "gold"))
ANY = trigger(RawTraitChange("tier", "changed"))
ONE = trigger(RawTraitChange("tier", "takes", 1))


@pytest.mark.parametrize(
    ("t", "before", "after", "expected"),
    [
        (GOLD, "silver", "gold", True),
        (GOLD, None, "gold", True),
        (GOLD, "gold", "platinum", False),
        (NOT_GOLD, "gold", "platinum", True),
        (NOT_GOLD, "gold", None, True),
        (NOT_GOLD, "silver", "bronze", False),
        (ANY, None, "x", True),
        (ANY, "x", None, True),
        (ANY, 1, True, True),
        (ANY, 1, 1.0, False),
        (ONE, 0, True, False),  # a boolean never equals a number
        (ONE, 0, 1.0, True),
    ],
)
def test_transitions(t: TriggerDef, before: Any, after: Any, expected: bool) -> None:
    assert fires(t, before, after) is expected


def test_a_firing_is_keyed_by_the_change_and_noted() -> None:
    fact = TraitChange("shop", "p1", "c1", "tier", "silver", "gold", {"tier": "gold"}, T0)
    d = TRAIT_CHANGE.decide(GOLD, fact, None, CTX)
    assert d.intents[0].occurrence == "trait:c1:tier"  # type: ignore[union-attr]
    assert [(n.outcome, n.reason_code, n.event_id) for n in d.notes] == [("fired", "trait_took_value", "c1")]
    late = TraitChange("shop", "p1", "c1", "tier", "silver", "gold", {"tier": "gold"}, T0 - timedelta(days=2))
    d = TRAIT_CHANGE.decide(GOLD, late, None, CTX)
    assert d.intents == () and [n.reason_code for n in d.notes] == ["late_event"]


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        (RawTraitChange("", "changed"), {"trigger.trait_change.trait_name"}),
        (RawTraitChange("tier"), {"trigger.trait_change.transition"}),
        (RawTraitChange("tier", "takes"), {"trigger.trait_change.value"}),
        (RawTraitChange("tier", "changed", "x"), {"trigger.trait_change.value"}),
        (RawTraitChange("tier", "takes", {"a": 1}), {"trigger.trait_change.value"}),
        (RawTraitChange("tier", "takes", float("inf")), {"trigger.trait_change.value"}),
    ],
)
def test_validation_names_the_field(raw: RawTraitChange, expected: set[str]) -> None:
    with pytest.raises(InvalidArgument) as caught:
        trigger(raw)
    assert {v.field for v in caught.value.violations} == expected


def test_routes_no_state_nothing_to_merge() -> None:
    assert TRAIT_CHANGE.routes(GOLD.condition, CTX) == {"trait:tier"}
    assert TRAIT_CHANGE.state_from_json(TRAIT_CHANGE.state_to_json(None)) is None
    assert TRAIT_CHANGE.plan_merge({}, {}, [], merged_profile_id="x").states == {}
