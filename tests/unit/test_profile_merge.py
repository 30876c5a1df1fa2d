"""Merging profiles (services/profile/domain/merge.py): the survivor and the combined consents,
tags and identities do not depend on the order of the merges, and merging again changes nothing."""

from __future__ import annotations

import functools
from datetime import UTC, datetime, timedelta

from hypothesis import given
from hypothesis import strategies as st

from services.profile.domain import Consent
from services.profile.domain.merge import (
    MergeProfile,
    choose_survivor,
    combine_consents,
    consents_taken_over,
    merge_profiles,
)

T0 = datetime(2026, 1, 1, tzinfo=UTC)
times = st.integers(0, 3).map(lambda d: T0 + timedelta(days=d))

consent = st.builds(
    Consent,
    purpose=st.sampled_from(["marketing", "profiling"]),
    channel=st.sampled_from(["email", "sms"]),
    status=st.sampled_from(["granted", "denied", "withdrawn"]),
    source=st.sampled_from(["form", "import"]),
    evidence=st.sampled_from(["", "e-1"]),
    recorded_at=times,
)


@st.composite
def profile_sets(draw: st.DrawFn) -> list[MergeProfile]:
    n = draw(st.integers(1, 5))
    ids = draw(st.lists(st.text("abcdef", min_size=1, max_size=3), min_size=n, max_size=n, unique=True))
    out = []
    for pid in ids:
        out.append(
            MergeProfile(
                profile_id=pid,
                customer_id=draw(st.none() | st.sampled_from(["c-1", "c-2"])),
                created_at=draw(times),
                first_name=draw(st.none() | st.sampled_from(["Ada", "Bo"])),
                consents=combine_consents(draw(st.lists(consent, max_size=4))),
                tags=frozenset(draw(st.sets(st.sampled_from(["vip", "fan", "new"])))),
                identities=frozenset({("anonymous", f"cookie-{pid}")})
                | frozenset(
                    draw(st.sets(st.sampled_from([("email", "x@example.com"), ("customer_id", "c-9")])))
                ),
                members=frozenset({pid}),
            )
        )
    return out


def merge_all(ps: list[MergeProfile]) -> MergeProfile:
    return functools.reduce(merge_profiles, ps)


def merge_tree(ps: list[MergeProfile], split: int) -> MergeProfile:
    """Merge the two halves separately, then the results."""
    if len(ps) == 1:
        return ps[0]
    k = 1 + split % (len(ps) - 1)
    return merge_profiles(merge_tree(ps[:k], split // 2), merge_tree(ps[k:], split // 3))


def outcome(p: MergeProfile) -> tuple[object, ...]:
    return (p.profile_id, p.customer_id, p.created_at, p.consents, p.tags, p.identities, p.members)


@given(profile_sets(), st.randoms(use_true_random=False), st.integers(0, 1000))
def test_merging_in_any_order_gives_the_same_survivor_and_data(
    ps: list[MergeProfile], rnd: object, split: int
) -> None:
    expected = merge_all(ps)
    shuffled = list(ps)
    rnd.shuffle(shuffled)  # type: ignore[attr-defined]
    assert outcome(merge_all(shuffled)) == outcome(expected)
    assert outcome(merge_tree(shuffled, split)) == outcome(expected)

    # the rule: a profile with a customer_id first, then the oldest, then the smallest id
    with_customer = [p for p in ps if p.customer_id] or ps
    best = min(with_customer, key=lambda p: (p.created_at, p.profile_id))
    assert expected.profile_id == best.profile_id
    assert expected.tags == frozenset().union(*(p.tags for p in ps))
    assert expected.identities == frozenset().union(*(p.identities for p in ps))
    assert expected.members == {p.profile_id for p in ps}
    # the current view keeps the most recent decision per (purpose, channel)
    for c in expected.consents:
        assert all(o.recorded_at <= c.recorded_at for p in ps for o in p.consents if o.key == c.key)
    assert {c.key for c in expected.consents} == {c.key for p in ps for c in p.consents}


@given(profile_sets())
def test_merging_again_changes_nothing(ps: list[MergeProfile]) -> None:
    merged = merge_all(ps)
    assert merge_profiles(merged, merged) == merged
    for p in ps:
        assert merge_profiles(merged, p) == merged
        assert outcome(merge_profiles(p, merged)) == outcome(merged)


@given(profile_sets())
def test_the_survivor_takes_over_exactly_the_decisions_that_win(ps: list[MergeProfile]) -> None:
    a, b = ps[0], ps[-1]
    survivor, merged = choose_survivor(a, b)
    taken = consents_taken_over(survivor.consents, merged.consents)
    own = {c.key: c for c in survivor.consents}
    combined = {**own, **{c.key: c for c in taken}}
    assert tuple(combined[k] for k in sorted(combined)) == combine_consents(
        survivor.consents, merged.consents
    )
    assert all(c in merged.consents for c in taken)


def test_the_customer_id_beats_age() -> None:
    old = MergeProfile("a", None, T0)
    customer = MergeProfile("b", "c-1", T0 + timedelta(days=9))
    assert choose_survivor(old, customer) == (customer, old)
    assert choose_survivor(customer, old) == (customer, old)
    twin = MergeProfile("0", None, T0)
    assert choose_survivor(old, twin) == (twin, old)
