"""The segment SQL compiler without a database: user values are bound, never part of the SQL text.
(That the SQL means what the Python evaluator means is tests/integration/test_segments.py.)"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from relevans import conditions as c
from relevans.kit.errors import InvalidArgument
from relevans.kit.paging import encode_page_token
from relevans.kit.proto import from_struct, to_struct
from services.profile.domain.counters import CounterDefinition
from services.profile.domain.enrichment import Enrichment, ScoreRule, Scoring, TraitMatch
from services.profile.domain.segment_rules import parse
from services.profile.store.segments import MEMBER_PAGES, after_profile_id, compile_sql

NOW = datetime(2026, 3, 10, 15, 30, tzinfo=UTC)
EVIL = "x' OR 1=1 --"


def test_user_values_are_bound_parameters() -> None:
    cond = parse(
        {
            "any": [
                {"compare": {"field": "trait.city", "op": "eq", "value": EVIL}},
                {"compare": {"field": "trait.city", "op": "contains", "value": EVIL}},
                {"compare": {"field": "trait.city", "op": "in", "value": [EVIL, 1]}},
                {"compare": {"field": "tag", "op": "in", "value": [EVIL]}},
                {"compare": {"field": "score", "op": "ge", "value": 10}},
                {"count": {"event_type": "page_view", "window_days": 7, "op": "ge", "value": 2}},
            ]
        }
    )
    enrichment = Enrichment(
        counters=(CounterDefinition("views", "page_view", (7,)),),
        scoring=Scoring((ScoreRule(5.0, trait=TraitMatch("tier", EVIL)),), half_life_days=7),
    )
    compiled = compile_sql(cond, enrichment, NOW)
    assert "OR 1=1" not in compiled.sql and "city" not in compiled.sql and "views" not in compiled.sql
    assert any(EVIL in str(v) for v in compiled.params.values())


def test_nodes_without_a_definition_are_constants() -> None:
    """A saved segment whose counter was deleted since: the counter is missing, counts are 0."""
    undefined = c.Compare("counter.gone", "ge", 1)
    assert compile_sql(undefined, Enrichment(), NOW).sql == "FALSE"
    assert compile_sql(c.Compare("counter.gone", "ne", 1), Enrichment(), NOW).sql == "TRUE"
    zero = c.CountInWindow("signup", timedelta(days=7), "lt", 1)
    assert compile_sql(zero, Enrichment(), NOW).sql == "TRUE"


def test_integral_floats_from_a_struct_are_whole_numbers() -> None:
    struct = to_struct({"count": {"event_type": "page_view", "window_days": 7.0, "op": "ge", "value": 3.0}})
    cond = parse(from_struct(struct))
    assert cond == c.CountInWindow("page_view", timedelta(days=7), "ge", 3)
    with pytest.raises(InvalidArgument) as bad:
        parse({"count": {"event_type": "page_view", "window_days": 7.5, "op": "ge", "value": 3}})
    assert [v.field for v in bad.value.violations] == ["condition.count.window_days"]


def test_page_tokens_round_trip_and_bad_ones_are_refused() -> None:
    assert after_profile_id(encode_page_token(after="0192-abc")) == "0192-abc"
    assert after_profile_id("") == ""
    for bad in ("***", "YQ=x", "//8", "="):
        with pytest.raises(InvalidArgument) as caught:
            after_profile_id(bad)
        assert [v.field for v in caught.value.violations] == ["page_token"]
    assert MEMBER_PAGES.of(0) == 100 and MEMBER_PAGES.of(1000) == 1000
    for bad_size in (-1, 1001):
        with pytest.raises(InvalidArgument):
            MEMBER_PAGES.of(bad_size)
