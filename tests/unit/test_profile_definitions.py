"""Validation of enrichment definitions (counters, computed traits, scoring rules) as the API gets them."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import pytest

from relevans.kit.errors import InvalidArgument
from services.profile.domain.counters import CounterDefinition
from services.profile.domain.definitions import (
    MAX_SCORE_RULES,
    validate_computed_trait,
    validate_counter,
    validate_scoring,
)
from services.profile.domain.enrichment import ComputedTrait, EventMatch, ScoreRule, Scoring, TraitMatch

VIEW = ScoreRule(1.0, event=EventMatch("page_view"))


def violations(validate: Callable[[Any], object], value: object) -> dict[str, str]:
    with pytest.raises(InvalidArgument) as caught:
        validate(value)
    return {v.field: v.description for v in caught.value.violations}


# ---------------------------------------------------------------------------------------------- counters


def test_a_counter_is_normalised_and_named_in_the_apis_terms() -> None:
    defn = CounterDefinition("toy_views", "page_view", (7, 1), "category", "toys", (11, 3, 3))
    assert validate_counter(defn) == CounterDefinition(
        "toy_views", "page_view", (1, 7), "category", "toys", (3, 11)
    )
    bad = violations(validate_counter, CounterDefinition("Toys", "Page View", (5, 7, 7)))
    assert set(bad) == {
        "counter.name",
        "counter.event_type",
        "counter.window_days[0]",
        "counter.window_days[2]",
    }
    assert "1, 7, 30, 90" in bad["counter.window_days[0]"]
    assert set(violations(validate_counter, CounterDefinition("c", "e", ()))) == {"counter.window_days"}


def test_a_counter_property_value_must_be_storable() -> None:
    bad = violations(validate_counter, CounterDefinition("c", "e", (7,), "p", "a\x00b"))
    assert set(bad) == {"counter.property_value"}
    assert set(violations(validate_counter, CounterDefinition("c", "e", (7,), "p", math.nan))) == {
        "counter.property_value"
    }


# ------------------------------------------------------------------------------------------ computed traits


def test_computed_trait() -> None:
    ok = ComputedTrait("favourite_show", "ticket_view", "show.title")
    assert validate_computed_trait(ok) == ok
    bad = violations(validate_computed_trait, ComputedTrait("Favourite", "Ticket View", "1x"))
    assert set(bad) == {"computed_trait.name", "computed_trait.event_type", "computed_trait.property"}
    missing = violations(validate_computed_trait, ComputedTrait("", "", ""))
    assert missing == dict.fromkeys(
        ["computed_trait.name", "computed_trait.event_type", "computed_trait.property"], "is required"
    )


# ---------------------------------------------------------------------------------------------- scoring


def test_valid_scoring_is_normalised() -> None:
    scoring = Scoring(
        (
            ScoreRule(5, event=EventMatch("order", "seats", 3.0)),
            ScoreRule(-2.5, event=EventMatch("page_view")),
            ScoreRule(10, trait=TraitMatch("vip", True)),
            ScoreRule(1, trait=TraitMatch("Plan-Tier", "gold")),
        ),
        half_life_days=30,
        thresholds=(100, 50.5),
    )
    valid = validate_scoring(scoring)
    assert [r.points for r in valid.rules] == [5.0, -2.5, 10.0, 1.0]
    assert all(isinstance(r.points, float) for r in valid.rules)
    assert valid.rules[0].event == EventMatch("order", "seats", 3.0)  # numbers kept as given
    assert valid.thresholds == (50.5, 100.0)
    assert validate_scoring(Scoring()) == Scoring()


def test_each_rule_has_exactly_one_target() -> None:
    both = ScoreRule(1, event=EventMatch("page_view"), trait=TraitMatch("vip", True))
    bad = violations(validate_scoring, Scoring((VIEW, both, ScoreRule(1))))
    assert set(bad) == {"scoring_rules.rules[1]", "scoring_rules.rules[2]"}
    assert "exactly one of event or trait" in bad["scoring_rules.rules[1]"]


@pytest.mark.parametrize("points", [0, 0.0, math.inf, -math.inf, math.nan, True])
def test_points_are_finite_and_not_zero(points: float) -> None:
    bad = violations(validate_scoring, Scoring((VIEW, VIEW, ScoreRule(points, event=EventMatch("x")))))
    assert set(bad) == {"scoring_rules.rules[2].points"}


def test_event_rule_fields() -> None:
    rules = (
        ScoreRule(1, event=EventMatch("Page View")),
        ScoreRule(1, event=EventMatch("", "p", "v")),
        ScoreRule(1, event=EventMatch("e", "1bad", "v")),
        ScoreRule(1, event=EventMatch("e", "p")),
        ScoreRule(1, event=EventMatch("e", None, "v")),
        ScoreRule(1, event=EventMatch("e", "p", "x" * 257)),
        ScoreRule(1, event=EventMatch("e", "p", math.inf)),
        ScoreRule(1, event=EventMatch("e", "p", ["a"])),  # type: ignore[arg-type]
    )
    bad = violations(validate_scoring, Scoring(rules))
    assert set(bad) == {
        "scoring_rules.rules[0].event.event_type",
        "scoring_rules.rules[1].event.event_type",
        "scoring_rules.rules[2].event.property",
        "scoring_rules.rules[3].event.property_value",
        "scoring_rules.rules[4].event.property",
        "scoring_rules.rules[5].event.property_value",
        "scoring_rules.rules[6].event.property_value",
        "scoring_rules.rules[7].event.property_value",
    }
    assert bad["scoring_rules.rules[1].event.event_type"] == "is required"


def test_trait_rule_fields() -> None:
    rules = (
        ScoreRule(1, trait=TraitMatch("vip", "x" * 1024)),
        ScoreRule(1, trait=TraitMatch("bad name", True)),
        ScoreRule(1, trait=TraitMatch("vip", None)),  # type: ignore[arg-type]
        ScoreRule(1, trait=TraitMatch("vip", "é" * 513)),  # 1026 bytes
        ScoreRule(1, trait=TraitMatch("vip", math.nan)),
        ScoreRule(1, trait=TraitMatch("vip", {"a": 1})),  # type: ignore[arg-type]
        ScoreRule(1, trait=TraitMatch("vip", "nul\x00")),
        ScoreRule(1, trait=TraitMatch("age", 30)),
    )
    bad = violations(validate_scoring, Scoring(rules))
    assert set(bad) == {
        "scoring_rules.rules[1].trait.name",
        "scoring_rules.rules[2].trait.value",
        "scoring_rules.rules[3].trait.value",
        "scoring_rules.rules[4].trait.value",
        "scoring_rules.rules[5].trait.value",
        "scoring_rules.rules[6].trait.value",
    }


def test_rule_count_half_life_and_thresholds() -> None:
    assert (
        validate_scoring(Scoring((VIEW,) * MAX_SCORE_RULES, 3650, tuple(range(1, 21)))).half_life_days == 3650
    )
    bad = violations(validate_scoring, Scoring((VIEW,) * (MAX_SCORE_RULES + 1), 3651, tuple(range(21))))
    assert set(bad) == {"scoring_rules.rules", "scoring_rules.half_life_days", "scoring_rules.thresholds"}
    assert set(violations(validate_scoring, Scoring((), -1))) == {"scoring_rules.half_life_days"}
    bad = violations(validate_scoring, Scoring((), 0, (10.0, math.inf, 10, math.nan)))
    assert set(bad) == {
        "scoring_rules.thresholds[1]",
        "scoring_rules.thresholds[2]",
        "scoring_rules.thresholds[3]",
    }
    assert bad["scoring_rules.thresholds[2]"] == "is listed twice"
