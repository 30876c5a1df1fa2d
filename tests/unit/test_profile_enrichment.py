"""Enrichment of profiles by events (pure): counters, last seen, behavioural traits, score, merges,
and the trait rules a client must follow."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from hypothesis import given
from hypothesis import strategies as st

from relevans.kit.errors import InvalidArgument, Violations
from services.profile.domain.counters import CounterDefinition
from services.profile.domain.enrichment import (
    ComputedTrait,
    EnrichedState,
    Enrichment,
    EventFacts,
    EventMatch,
    ScoreRule,
    Scoring,
    TraitMatch,
    counter_values,
    counters_from_json,
    counters_to_json,
    enrich,
    merge_states,
    profile_view,
    same_value,
    score_crossings,
    score_now,
    scoring_from_json,
    scoring_to_json,
)
from services.profile.domain.traits import check_traits, effective, validate_set_traits

NOW = datetime(2026, 11, 24, 12, tzinfo=UTC)
TOYS = CounterDefinition("toy_views", "page_view", (7, 30), "category", "toys", thresholds=(3,))


def fact(i: int, type_: str = "page_view", at: datetime = NOW, **props: object) -> EventFacts:
    return EventFacts(f"e-{i}", type_, at, props)


def test_counters_count_matching_events_by_day_and_report_upward_crossings() -> None:
    enrichment = Enrichment(counters=(TOYS,))
    first = enrich(
        EnrichedState(),
        [fact(1, category="toys"), fact(2, category="books"), fact(3, category="toys")],
        enrichment,
        NOW,
    )
    assert counter_values([TOYS], first.state.counters, NOW) == [("toy_views", 7, 2), ("toy_views", 30, 2)]
    assert first.crossings == []

    second = enrich(first.state, [fact(4, category="toys"), fact(5, category="toys")], enrichment, NOW)
    [crossing] = second.crossings
    assert (crossing.name, crossing.threshold, crossing.value, crossing.event_id) == (
        "toy_views",
        3,
        4,
        "e-5",
    )
    # already above: no second crossing
    assert enrich(second.state, [fact(6, category="toys")], enrichment, NOW).crossings == []


def test_old_buckets_are_pruned_and_deleted_counters_dropped() -> None:
    old = NOW - timedelta(days=40)
    state = enrich(
        EnrichedState(), [fact(1, at=old, category="toys")], Enrichment(counters=(TOYS,)), old
    ).state
    later = enrich(state, [fact(2, category="toys")], Enrichment(counters=(TOYS,)), NOW).state
    assert counters_to_json(later.counters) == {"toy_views": {NOW.date().isoformat(): 1}}
    assert enrich(later, [], Enrichment(), NOW).state.counters == {}


def test_last_seen_keeps_the_latest_time_per_type() -> None:
    earlier = NOW - timedelta(hours=1)
    result = enrich(
        EnrichedState(last_seen={"purchase": earlier}),
        [fact(1), fact(2, at=earlier), fact(3, "purchase", at=NOW - timedelta(days=1))],
        Enrichment(),
        NOW,
    )
    assert result.state.last_seen == {"page_view": NOW, "purchase": earlier}


def test_computed_traits_take_the_latest_events_scalar_property() -> None:
    enrichment = Enrichment(computed_traits=(ComputedTrait("favourite_show", "ticket_view", "show"),))
    result = enrich(
        EnrichedState(),
        [
            fact(1, "ticket_view", at=NOW, show="lear"),
            fact(2, "ticket_view", at=NOW - timedelta(hours=1), show="hamlet"),
            fact(3, "ticket_view", at=NOW, show={"not": "a scalar"}),
            fact(4, "page_view", at=NOW, show="macbeth"),
        ],
        enrichment,
        NOW,
    )
    assert result.traits == {"favourite_show": "lear"}


def test_event_points_decay_by_half_life_and_trait_points_do_not() -> None:
    scoring = Scoring(
        rules=(
            ScoreRule(10, event=EventMatch("page_view")),
            ScoreRule(5, trait=TraitMatch("tier", "gold")),
            ScoreRule(-3, event=EventMatch("page_view", "category", "spam")),
        ),
        half_life_days=7,
        thresholds=(10, 20),
    )
    enrichment = Enrichment(scoring=scoring)
    state = enrich(EnrichedState(), [fact(1), fact(2, category="spam")], enrichment, NOW).state
    assert score_now(state.score, state.score_at, {"tier": "gold"}, scoring, NOW) == pytest.approx(
        10 + 10 - 3 + 5
    )
    week = NOW + timedelta(days=7)
    assert score_now(state.score, state.score_at, {"tier": "gold"}, scoring, week) == pytest.approx(
        17 / 2 + 5
    )
    # a point earned a half-life before now counts half
    late = enrich(EnrichedState(), [fact(3, at=NOW - timedelta(days=7))], enrichment, NOW).state
    assert late.score == pytest.approx(5)
    assert [c.threshold for c in score_crossings(5, 25, scoring, "e-9")] == [10, 20]
    assert score_crossings(25, 30, scoring, "e-9") == []


def test_scoring_rules_round_trip_through_json() -> None:
    scoring = Scoring(
        (
            ScoreRule(2.5, event=EventMatch("purchase", "plan", "pro")),
            ScoreRule(1, trait=TraitMatch("vip", True)),
        ),
        half_life_days=30,
        thresholds=(50.0, 10.0),
    )
    back = scoring_from_json(scoring_to_json(scoring), 30, scoring.thresholds)
    assert back.rules == scoring.rules and back.thresholds == (10.0, 50.0)


@given(
    st.lists(st.tuples(st.integers(0, 60), st.booleans()), max_size=20),
    st.lists(st.tuples(st.integers(0, 60), st.booleans()), max_size=20),
)
def test_merging_two_profiles_counts_like_one_person_who_did_both(
    a: list[tuple[int, bool]], b: list[tuple[int, bool]]
) -> None:
    enrichment = Enrichment(counters=(TOYS,), scoring=Scoring((ScoreRule(1, event=EventMatch("page_view")),)))

    def events(items: list[tuple[int, bool]], offset: int) -> list[EventFacts]:
        return [
            fact(offset + i, at=NOW - timedelta(days=d), category="toys" if toy else "books")
            for i, (d, toy) in enumerate(items)
        ]

    sa = enrich(EnrichedState(), events(a, 0), enrichment, NOW).state
    sb = enrich(EnrichedState(), events(b, 100), enrichment, NOW).state
    together = enrich(EnrichedState(), events(a, 0) + events(b, 100), enrichment, NOW).state
    merged = merge_states(sa, sb, 0, NOW)
    assert counter_values([TOYS], merged.counters, NOW) == counter_values([TOYS], together.counters, NOW)
    assert merged.last_seen == together.last_seen
    assert merged.score == pytest.approx(together.score)
    assert counter_values([TOYS], merge_states(sb, sa, 0, NOW).counters, NOW) == counter_values(
        [TOYS], merged.counters, NOW
    )


def test_profile_view_answers_counter_fields_and_count_in_window_from_buckets() -> None:
    state = enrich(
        EnrichedState(),
        [fact(1, at=NOW - timedelta(days=10), category="toys"), fact(2, category="toys")],
        Enrichment(counters=(TOYS,)),
        NOW,
    ).state
    view = profile_view(
        traits={"tier": "gold"},
        tags=["hamlet"],
        counters_json=counters_to_json(state.counters),
        score=0,
        score_at=None,
        consents={("marketing", "email"): "granted"},
        last_seen_types={"page_view": NOW.isoformat()},
        enrichment=Enrichment(counters=(TOYS,)),
        now=NOW,
    )
    assert view.counters == {"toy_views": 1}  # the shortest window
    assert view.window_counts("page_view", timedelta(days=30), "category", "toys") == 2
    assert view.window_counts("page_view", timedelta(days=30), "category", "books") == 0
    assert view.last_seen == {"page_view": NOW}
    assert counters_from_json(counters_to_json(state.counters)) == state.counters


def test_json_equality_is_like_with_like() -> None:
    assert same_value(1, 1.0) and same_value("a", "a") and same_value(True, True)
    assert not same_value(True, 1) and not same_value("1", 1) and not same_value(None, None)


def test_traits_are_scalars_with_lower_snake_case_names() -> None:
    with pytest.raises(InvalidArgument) as caught:
        validate_set_traits("p-1", "behavioural", {"Tier": "x", "ok": [1], "big": "x" * 2000})
    assert {v.field for v in caught.value.violations} >= {"source", "traits.Tier", "traits.ok", "traits.big"}
    assert validate_set_traits("p-1", "backend", {"tier": "gold", "age": 41.0, "gone": None}) == {
        "age": 41,
        "gone": None,
        "tier": "gold",
    }


def test_effective_traits_follow_source_precedence() -> None:
    assert effective(
        {"behavioural": {"a": 1, "b": 1, "c": 1}, "backend": {"a": 2, "b": 2}, "declared": {"a": 3}}
    ) == {"a": 3, "b": 2, "c": 1}


def test_identify_traits_cannot_remove() -> None:
    v = Violations()
    assert check_traits({"x": None}, "traits", v, allow_remove=False) == {}
    assert [i.field for i in v.items] == ["traits.x"]
