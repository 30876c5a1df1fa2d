"""Counters: definitions and their validation, daily-bucket sliding windows, threshold crossings and
lead-score decay. Pure functions, no infrastructure."""

from __future__ import annotations

from datetime import UTC, date, datetime, timedelta, timezone

import pytest
from hypothesis import given
from hypothesis import strategies as st

from relevans.kit.errors import InvalidArgument
from services.profile.domain.counters import (
    MAX_COUNTERS_PER_TENANT,
    CounterDefinition,
    add,
    bucket_day,
    count_in_window,
    crossed,
    decayed_score,
    merge,
    prune,
    validate_counter,
    validate_counters,
)

NOW = datetime(2026, 11, 24, 12, 0, tzinfo=UTC)
WEEK = timedelta(days=7)
TOYS = CounterDefinition("toys_views", "page_view", (7,), "category", "toys")


def violations(defn: CounterDefinition) -> dict[str, str]:
    with pytest.raises(InvalidArgument) as caught:
        validate_counter(defn)
    return {v.field: v.description for v in caught.value.violations}


# ---------------------------------------------------------------------------------------------- story 2


def test_story_2_eleven_toys_views_in_seven_days_cross_the_threshold() -> None:
    threshold = 11
    counts: dict[date, int] = {}
    events = [NOW - timedelta(days=6, hours=1) + timedelta(hours=13 * i) for i in range(11)]
    assert all(NOW - WEEK < at <= NOW for at in events)
    fired = []
    for at in events:
        assert TOYS.matches("page_view", {"category": "toys", "path": "/toys/lego"})
        before = count_in_window(counts, at, WEEK)
        counts = add(counts, at)
        after = count_in_window(counts, at, WEEK)
        fired.append(crossed(before, after, threshold))
    assert fired == [False] * 10 + [True]  # the 11th view crosses, the first 10 do not
    assert count_in_window(counts, NOW, WEEK) == 11
    # One more view keeps it above the threshold: no second crossing.
    assert not crossed(11, 12, threshold)


def test_story_2_ten_views_do_not_cross() -> None:
    counts: dict[date, int] = {}
    for i in range(10):
        counts = add(counts, NOW - timedelta(days=i % 7))
    assert count_in_window(counts, NOW, WEEK) == 10
    assert not crossed(0, count_in_window(counts, NOW, WEEK), 11)


def test_story_2_views_older_than_seven_days_do_not_count() -> None:
    counts: dict[date, int] = {}
    for _ in range(5):
        counts = add(counts, NOW - timedelta(days=7))  # a week ago today: out of the window
        counts = add(counts, NOW - timedelta(days=30))
    for _ in range(10):
        counts = add(counts, NOW - timedelta(days=6))  # the oldest day still in the window
    assert count_in_window(counts, NOW, WEEK) == 10
    assert count_in_window(counts, NOW, timedelta(days=8)) == 15
    assert count_in_window(counts, NOW, timedelta(days=30)) == 15
    assert count_in_window(counts, NOW, timedelta(days=31)) == 20
    # The next toys view is the 11th inside the week.
    before = count_in_window(counts, NOW, WEEK)
    counts = add(counts, NOW)
    assert crossed(before, count_in_window(counts, NOW, WEEK), 11)
    # ... and a day later the six-day-old views have dropped out again.
    assert count_in_window(counts, NOW + timedelta(days=1), WEEK) == 1


def test_other_events_do_not_match_the_toys_counter() -> None:
    assert not TOYS.matches("page_view", {"category": "books"})
    assert not TOYS.matches("page_view", {})
    assert not TOYS.matches("add_to_cart", {"category": "toys"})
    plain = CounterDefinition("views", "page_view")
    assert plain.matches("page_view", {})
    flag = CounterDefinition("flagged", "page_view", (1,), "flag", True)
    assert flag.matches("page_view", {"flag": True})
    assert not flag.matches("page_view", {"flag": 1})  # True is not the number 1
    num = CounterDefinition("level_3", "level_up", (1,), "level", 3)
    assert num.matches("level_up", {"level": 3.0})
    assert not num.matches("level_up", {"level": "3"})


# ---------------------------------------------------------------------------------------------- buckets


def test_add_returns_a_new_dict_and_sums_per_day() -> None:
    counts = {date(2026, 11, 24): 2}
    out = add(counts, NOW, 3)
    assert counts == {date(2026, 11, 24): 2}
    assert out == {date(2026, 11, 24): 5}
    assert add(out, NOW - timedelta(days=1)) == {date(2026, 11, 24): 5, date(2026, 11, 23): 1}


def test_buckets_are_days_in_the_persons_zone() -> None:
    late_utc = datetime(2026, 11, 24, 23, 30, tzinfo=UTC)
    assert bucket_day(late_utc) == date(2026, 11, 24)
    oslo = timezone(timedelta(hours=1))
    assert bucket_day(late_utc, oslo) == date(2026, 11, 25)
    assert bucket_day(datetime(2026, 11, 24, 23, 30)) == date(2026, 11, 24)  # naive is UTC
    counts = add({}, late_utc, tz=oslo)
    assert count_in_window(counts, late_utc, timedelta(days=1), tz=oslo) == 1
    assert count_in_window(counts, late_utc, timedelta(days=1)) == 0  # 25th is "tomorrow" in UTC


def test_future_buckets_are_not_counted_yet() -> None:
    counts = add({}, NOW + timedelta(days=1))
    assert count_in_window(counts, NOW, WEEK) == 0
    assert count_in_window(counts, NOW + timedelta(days=1), WEEK) == 1


@pytest.mark.parametrize(
    "window", [timedelta(0), timedelta(days=-1), timedelta(hours=36), timedelta(days=1, seconds=1)]
)
def test_windows_are_whole_positive_days(window: timedelta) -> None:
    with pytest.raises(ValueError):
        count_in_window({}, NOW, window)


def test_prune_keeps_only_the_days_the_windows_need() -> None:
    counts = {NOW.date() - timedelta(days=d): d + 1 for d in range(120)}
    counts[NOW.date() - timedelta(days=3)] = 0
    kept = prune(counts, NOW, 90)
    assert len(counts) == 120  # unchanged
    assert min(kept) == NOW.date() - timedelta(days=89)
    assert NOW.date() - timedelta(days=3) not in kept  # empty buckets go too
    for days in (1, 7, 30, 90):
        assert count_in_window(kept, NOW, timedelta(days=days)) == count_in_window(
            counts, NOW, timedelta(days=days)
        )
    assert prune(counts, NOW, 0) == {}


def test_merge_sums_a_shadow_profiles_buckets() -> None:
    known = {date(2026, 11, 20): 2, date(2026, 11, 21): 1}
    shadow = {date(2026, 11, 21): 4, date(2026, 11, 22): 5}
    assert merge(known, shadow) == {date(2026, 11, 20): 2, date(2026, 11, 21): 5, date(2026, 11, 22): 5}
    assert known == {date(2026, 11, 20): 2, date(2026, 11, 21): 1}


@given(
    st.lists(st.integers(min_value=-200, max_value=5), max_size=60),
    st.sampled_from((1, 7, 30, 90)),
    st.integers(min_value=0, max_value=23),
)
def test_count_in_window_matches_a_brute_force_count(offsets: list[int], days: int, hour: int) -> None:
    now = NOW.replace(hour=hour)
    counts: dict[date, int] = {}
    events = [now + timedelta(days=offset) for offset in offsets]
    for at in events:
        counts = add(counts, at)
    expected = sum(1 for at in events if now.date() - timedelta(days=days - 1) <= at.date() <= now.date())
    assert count_in_window(counts, now, timedelta(days=days)) == expected
    assert count_in_window(prune(counts, now, 90), now, timedelta(days=days)) == expected


# ---------------------------------------------------------------------------------------------- crossings


@pytest.mark.parametrize(
    ("before", "after", "threshold", "expected"),
    [
        (10, 11, 11, True),
        (9, 10, 11, False),
        (11, 12, 11, False),  # already above: no new crossing
        (5, 20, 11, True),  # jumps over it
        (12, 10, 11, False),  # falling back below is not a crossing
        (11, 11, 11, False),
        (0, 0, 0, False),
        (-1, 0, 0, True),
        (49.5, 50.0, 50, True),
    ],
)
def test_crossed_only_upwards(before: float, after: float, threshold: float, expected: bool) -> None:
    assert crossed(before, after, threshold) is expected


# ---------------------------------------------------------------------------------------------- lead score


def test_decayed_score_halves_every_half_life() -> None:
    half_life = timedelta(days=30)
    assert decayed_score([], NOW, half_life) == 0.0
    assert decayed_score([(NOW, 10.0)], NOW, half_life) == 10.0
    assert decayed_score([(NOW - half_life, 10.0)], NOW, half_life) == pytest.approx(5.0)
    assert decayed_score([(NOW - 2 * half_life, 10.0)], NOW, half_life) == pytest.approx(2.5)
    assert decayed_score([(NOW - 2 * half_life, 10.0), (NOW, 1.0)], NOW, half_life) == pytest.approx(3.5)
    assert decayed_score([(NOW - timedelta(days=15), 10.0)], NOW, half_life) == pytest.approx(10 / 2**0.5)
    assert decayed_score([(NOW - half_life, -4.0)], NOW, half_life) == pytest.approx(
        -2.0
    )  # penalties decay too
    assert decayed_score([(NOW + timedelta(days=1), 10.0)], NOW, half_life) == 10.0  # future: in full
    naive = NOW.replace(tzinfo=None)
    assert decayed_score([(naive - half_life, 8.0)], naive, half_life) == pytest.approx(4.0)


@pytest.mark.parametrize("half_life", [timedelta(0), timedelta(days=-1)])
def test_decayed_score_needs_a_positive_half_life(half_life: timedelta) -> None:
    with pytest.raises(ValueError):
        decayed_score([(NOW, 1.0)], NOW, half_life)


@given(
    st.lists(
        st.tuples(st.integers(min_value=0, max_value=10_000), st.floats(min_value=0, max_value=100)),
        max_size=20,
    ),
    st.integers(min_value=1, max_value=1000),
)
def test_decayed_score_never_grows_with_time(points: list[tuple[int, float]], later_hours: int) -> None:
    stamped = [(NOW - timedelta(hours=age), value) for age, value in points]
    half_life = timedelta(days=14)
    now_score = decayed_score(stamped, NOW, half_life)
    assert 0 <= now_score <= sum(value for _, value in points) + 1e-9
    assert decayed_score(stamped, NOW + timedelta(hours=later_hours), half_life) <= now_score + 1e-9


# ---------------------------------------------------------------------------------------------- validation


def test_a_valid_definition_has_its_windows_sorted() -> None:
    defn = validate_counter(CounterDefinition("toys_views", "page_view", (30, 7, 1), "category", "toys"))
    assert defn.windows == (1, 7, 30)
    assert defn.keep_days() == 30
    assert validate_counter(CounterDefinition("logins", "login")) == CounterDefinition(
        "logins", "login", (7,)
    )


@pytest.mark.parametrize(
    ("defn", "expected"),
    [
        (CounterDefinition("", "page_view"), {"counter.name": "is required"}),
        (CounterDefinition("Toys", "page_view"), {"counter.name": "must match ^[a-z][a-z0-9_]{0,62}$"}),
        (CounterDefinition("1toys", "page_view"), {"counter.name": "must match ^[a-z][a-z0-9_]{0,62}$"}),
        (CounterDefinition("a" * 64, "page_view"), {"counter.name": "must match ^[a-z][a-z0-9_]{0,62}$"}),
        (CounterDefinition("toys", ""), {"counter.event_type": "is required"}),
        (
            CounterDefinition("toys", "Page View"),
            {"counter.event_type": "must match ^[a-z][a-z0-9_.:-]{0,63}$"},
        ),
        (
            CounterDefinition("toys", "page_view", ()),
            {"counter.windows": "must list at least one of 1, 7, 30, 90 days"},
        ),
        (
            CounterDefinition("toys", "page_view", (7, 14)),
            {"counter.windows[1]": "must be one of 1, 7, 30, 90 days"},
        ),
        (
            CounterDefinition("toys", "page_view", (True,)),
            {"counter.windows[0]": "must be one of 1, 7, 30, 90 days"},
        ),
        (CounterDefinition("toys", "page_view", (7, 30, 7)), {"counter.windows[2]": "is listed twice"}),
        (
            CounterDefinition("toys", "page_view", (7,), "category"),
            {"counter.property_value": "is required when property is set"},
        ),
        (
            CounterDefinition("toys", "page_view", (7,), None, "toys"),
            {"counter.property": "is required when property_value is set"},
        ),
        (
            CounterDefinition("toys", "page_view", (7,), "bad name", "toys"),
            {"counter.property": "must match ^[A-Za-z_][A-Za-z0-9_.-]{0,63}$"},
        ),
        (
            CounterDefinition("toys", "page_view", (7,), "category", float("inf")),
            {"counter.property_value": "must be a string, a finite number or a boolean"},
        ),
        (
            CounterDefinition("toys", "page_view", (7,), "category", "x" * 257),
            {"counter.property_value": "must be at most 256 characters"},
        ),
    ],
)
def test_invalid_definitions(defn: CounterDefinition, expected: dict[str, str]) -> None:
    assert violations(defn) == expected


def test_every_violation_is_reported_at_once() -> None:
    got = violations(CounterDefinition("Bad", "", (2,), "category"))
    assert set(got) == {"counter.name", "counter.event_type", "counter.windows[0]", "counter.property_value"}


def test_a_tenants_set_needs_unique_names_and_a_bound() -> None:
    ok = validate_counters([TOYS, CounterDefinition("logins", "login", (30, 1))])
    assert ok[1].windows == (1, 30)
    with pytest.raises(InvalidArgument) as caught:
        validate_counters([TOYS, CounterDefinition("toys_views", "page_view"), CounterDefinition("X", "x")])
    assert {v.field: v.description for v in caught.value.violations} == {
        "counters[1].name": "toys_views is defined twice",
        "counters[2].name": "must match ^[a-z][a-z0-9_]{0,62}$",
    }
    with pytest.raises(InvalidArgument) as caught:
        validate_counters([CounterDefinition(f"c{i}", "x") for i in range(MAX_COUNTERS_PER_TENANT + 1)])
    assert [v.field for v in caught.value.violations] == ["counters"]
