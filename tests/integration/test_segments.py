"""Segments on real PostgreSQL: the SQL evaluator agrees with the Python one, and the store and the
gRPC service around it (validation, paging, tenants, merged profiles, time)."""

from __future__ import annotations

import random
from collections.abc import AsyncIterator
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from typing import Any

import grpc
import pytest
import pytest_asyncio
import sqlalchemy as sa
from google.protobuf import struct_pb2
from sqlalchemy.ext.asyncio import AsyncEngine

from relevans import conditions as c
from relevans.kit.clock import ManualClock
from relevans.kit.errors import AlreadyExists, InvalidArgument, NotFound
from relevans.kit.server import ServiceHost
from relevans.profile.v1 import segment_pb2, segment_pb2_grpc
from services.profile.domain.counters import CounterDefinition
from services.profile.domain.enrichment import (
    Enrichment,
    EventMatch,
    ScoreRule,
    Scoring,
    TraitMatch,
    profile_view,
    scoring_to_json,
)
from services.profile.domain.segment_rules import parse
from services.profile.store.enrichment import load_enrichment
from services.profile.store.segments import SegmentStore, compile_sql
from services.profile.store.tables import consents, counter_definitions, profile_tags, profiles, scoring_rules
from tests.helpers import field_violations
from tests.helpers.auth import Tokens

TENANT, OTHER = "shop", "other-shop"
NOW = datetime(2026, 3, 10, 15, 30, tzinfo=UTC)
token = Tokens(TENANT)

COUNTERS = (
    CounterDefinition("buys", "purchase", (30, 90)),
    CounterDefinition("toys", "page_view", (7, 30), "category", "toys"),
    CounterDefinition("views", "page_view", (1, 7)),
)
SCORING = Scoring(
    (
        ScoreRule(2.0, event=EventMatch("page_view")),
        ScoreRule(5.0, trait=TraitMatch("tier", "gold")),
        ScoreRule(3.5, trait=TraitMatch("vip", True)),
        ScoreRule(-1.0, trait=TraitMatch("age", 3)),
    ),
    half_life_days=7,
)
TRAIT_VALUES: tuple[object, ...] = (
    "paris",
    "london",
    "Paris",
    "gold",
    "silver",
    0,
    1,
    2.5,
    3,
    3.0,
    True,
    False,
)
TAGS = ("vip", "hamlet", "news")
STATUSES = ("granted", "denied", "withdrawn")


async def define(
    db: AsyncEngine, tenant: str, counters: tuple[CounterDefinition, ...], scoring: Scoring
) -> None:
    async with db.begin() as conn:
        for d in counters:
            await conn.execute(
                counter_definitions.insert().values(
                    tenant_id=tenant,
                    name=d.name,
                    event_type=d.event_type,
                    windows=list(d.windows),
                    property=d.property,
                    property_value=d.property_value,
                    thresholds=[],
                    created_at=NOW,
                )
            )
        await conn.execute(
            scoring_rules.insert().values(
                tenant_id=tenant,
                rules=scoring_to_json(scoring),
                half_life_days=scoring.half_life_days,
                thresholds=[],
                updated_at=NOW,
            )
        )


def random_profile(rng: random.Random, i: int) -> dict[str, Any]:
    traits = {
        name: rng.choice(TRAIT_VALUES)
        for name in ("city", "tier", "age", "vip", "note")
        if rng.random() < 0.6
    }
    counters: dict[str, dict[str, int]] = {}
    for name in ("views", "toys", "buys", "ghost"):
        if rng.random() < 0.6:
            days = rng.sample(range(-2, 100), rng.randint(1, 6))  # -2: a bucket after today
            counters[name] = {(NOW.date() - timedelta(days=d)).isoformat(): rng.randint(1, 3) for d in days}
    score_at = rng.choice([None, NOW, NOW - timedelta(days=rng.uniform(0, 30)), NOW + timedelta(hours=1)])
    last_seen = {}
    if rng.random() < 0.7:
        last_seen["page_view"] = rng.choice(
            [NOW - timedelta(days=rng.randint(0, 20)), NOW - timedelta(days=3)]
        )
    return {
        "profile_id": f"p-{i:04d}",
        "traits": traits,
        "tags": rng.sample(TAGS, rng.randint(0, 3)),
        "counters": counters,
        "score": rng.choice([0.0, 5.0, 10.0, 12.5, 20.0]),
        "score_at": score_at,
        "last_seen": {t: at.isoformat() for t, at in last_seen.items()},
        "consents": {
            (purpose, channel): rng.choice(STATUSES)
            for purpose, channel in (("marketing", "email"), ("profiling", "web"))
            if rng.random() < 0.7
        },
        "merged": rng.random() < 0.1,
    }


async def insert_profiles(db: AsyncEngine, tenant: str, people: list[dict[str, Any]]) -> None:
    """Rows straight into the tables the segment SQL reads (`merged` ones merged into p-0000)."""
    async with db.begin() as conn:
        await conn.execute(
            profiles.insert(),
            [
                {
                    "tenant_id": tenant,
                    "profile_id": p["profile_id"],
                    "created_at": NOW,
                    "updated_at": NOW,
                    "merged_into": "p-0000" if p["merged"] else None,
                    "traits": p["traits"],
                    "counters": p["counters"],
                    "last_seen_types": p["last_seen"],
                    "score": p["score"],
                    "score_at": p["score_at"],
                }
                for p in people
            ],
        )
        tags = [
            {"tenant_id": tenant, "profile_id": p["profile_id"], "tag": tag, "created_at": NOW}
            for p in people
            for tag in p["tags"]
        ]
        if tags:
            await conn.execute(profile_tags.insert(), tags)
        held = [
            {
                "tenant_id": tenant,
                "profile_id": p["profile_id"],
                "purpose": purpose,
                "channel": channel,
                "status": status,
                "source": "test",
                "evidence": "",
                "recorded_at": NOW,
            }
            for p in people
            for (purpose, channel), status in p["consents"].items()
        ]
        if held:
            await conn.execute(consents.insert(), held)


# ---- random conditions -------------------------------------------------------------------------


def random_leaf(rng: random.Random) -> dict[str, Any]:
    kind = rng.choice(["trait", "trait", "tag", "counter", "score", "consent", "last_seen", "count"])
    if kind == "count":
        event_type, prop, longest = rng.choice(
            [("page_view", None, 7), ("page_view", "category", 30), ("purchase", None, 90)]
        )
        body: dict[str, Any] = {
            "event_type": event_type,
            "window_days": rng.randint(1, longest),
            "op": rng.choice(c.COUNT_OPS),
            "value": rng.randint(0, 6),
        }
        if prop:
            body.update(property=prop, property_value="toys")
        return {"count": body}
    if kind == "trait":
        field = f"trait.{rng.choice(['city', 'tier', 'age', 'vip', 'note', 'absent'])}"
    elif kind == "counter":
        field = f"counter.{rng.choice(['views', 'toys', 'buys'])}"
    elif kind == "consent":
        field = f"consent.{rng.choice(['marketing.email', 'profiling.web', 'marketing.sms'])}"
    elif kind == "last_seen":
        field = f"last_seen.{rng.choice(['page_view', 'purchase'])}"
    else:
        field = kind
    op = rng.choice(c.FIELD_OPS[kind])
    node: dict[str, Any] = {"field": field, "op": op}
    if op != c.EXISTS:
        pool: list[Any]
        if kind == "trait":
            pool = [1, 2.5, 3, 0] if op in c.ORDER_OPS else [*TRAIT_VALUES, "ar", "ol"]
        elif kind == "tag":
            pool = [*TAGS, "VIP"]
        elif kind in ("counter", "score"):
            pool = [0, 1, 2, 3, 5, 10, 12.5, 20]
        elif kind == "consent":
            pool = list(STATUSES)
        else:
            pool = [(NOW - timedelta(days=d)).isoformat() for d in (0, 3, 10)]
        node["value"] = rng.sample(pool, rng.randint(1, 3)) if op == c.IN else rng.choice(pool)
    return {"compare": node}


def random_condition(rng: random.Random, depth: int = 0) -> dict[str, Any]:
    roll = rng.random()
    if depth >= 3 or roll < 0.45:
        return random_leaf(rng)
    if roll < 0.55:
        return {"not": random_condition(rng, depth + 1)}
    key = "all" if roll < 0.8 else "any"
    return {key: [random_condition(rng, depth + 1) for _ in range(rng.randint(1, 3))]}


def python_members(
    cond: c.Condition, people: list[dict[str, Any]], enrichment: Enrichment, now: datetime
) -> set[str]:
    predicate = c.compile_condition(cond)
    out = set()
    for p in people:
        if p["merged"]:
            continue
        view = profile_view(
            traits=p["traits"],
            tags=p["tags"],
            counters_json=p["counters"],
            score=p["score"],
            score_at=p["score_at"],
            consents=p["consents"],
            last_seen_types=p["last_seen"],
            enrichment=enrichment,
            now=now,
        )
        if predicate(view):
            out.add(p["profile_id"])
    return out


async def sql_members(
    db: AsyncEngine, tenant: str, cond: c.Condition, enrichment: Enrichment, now: datetime
) -> set[str]:
    compiled = compile_sql(cond, enrichment, now)
    async with db.connect() as conn:
        rows = await conn.execute(
            sa.text(
                f"SELECT p.profile_id FROM profiles p WHERE p.tenant_id = :tenant AND p.merged_into IS NULL"
                f" AND {compiled.sql}"
            ),
            {**compiled.params, "tenant": tenant},
        )
        return set(rows.scalars())


async def test_sql_and_python_evaluators_agree(db: AsyncEngine) -> None:
    rng = random.Random(20260310)
    people = [random_profile(rng, i) for i in range(250)]
    await define(db, TENANT, COUNTERS, SCORING)
    await insert_profiles(db, TENANT, people)
    async with db.connect() as conn:
        enrichment = await load_enrichment(conn, TENANT)
    assert enrichment.counters and enrichment.scoring.rules
    # A saved segment outlives a deleted counter definition: its nodes are then "missing" in both.
    reduced = replace(enrichment, counters=tuple(d for d in enrichment.counters if d.name != "views"))
    no_decay = replace(enrichment, scoring=replace(enrichment.scoring, half_life_days=0))
    store = SegmentStore(db)
    seen_sizes = set()
    for i in range(300):
        data = random_condition(rng)
        cond = parse(data)
        now = NOW + timedelta(hours=rng.choice([0, 0, 5, 30, 24 * 8]))
        expected = python_members(cond, people, enrichment, now)
        assert await sql_members(db, TENANT, cond, enrichment, now) == expected, data
        if i % 10 == 0:
            assert await store.count(TENANT, now, condition=cond) == len(expected), data
        for variant in (reduced, no_decay) if i % 3 == 0 else ():
            expected_variant = python_members(cond, people, variant, now)
            assert await sql_members(db, TENANT, cond, variant, now) == expected_variant, (data, variant)
        seen_sizes.add(len(expected))
    assert len(seen_sizes) > 30  # the conditions were not all trivially empty or full


async def test_counts_follow_the_clock_past_a_window(db: AsyncEngine) -> None:
    await define(db, TENANT, COUNTERS, Scoring())
    day = NOW.date()
    people = [
        {**random_profile(random.Random(1), 0), "profile_id": "a", "merged": False},
        {**random_profile(random.Random(2), 1), "profile_id": "b", "merged": False},
    ]
    people[0]["counters"] = {"views": {day.isoformat(): 3}}
    people[1]["counters"] = {"views": {(day - timedelta(days=5)).isoformat(): 4}}
    await insert_profiles(db, TENANT, people)
    store = SegmentStore(db)
    active = parse({"count": {"event_type": "page_view", "window_days": 7, "op": "ge", "value": 3}})
    assert await store.count(TENANT, NOW, condition=active) == 2
    assert (
        await store.count(TENANT, NOW + timedelta(days=2), condition=active) == 1
    )  # b's day left the window
    assert await store.count(TENANT, NOW + timedelta(days=7), condition=active) == 0
    today = parse({"compare": {"field": "counter.views", "op": "ge", "value": 1}})  # shortest window: 1 day
    assert await store.count(TENANT, NOW, condition=today) == 1
    assert await store.count(TENANT, NOW + timedelta(days=1), condition=today) == 0


async def test_points_decayed_beyond_the_float_range_are_zero(db: AsyncEngine) -> None:
    """10 years of 1-day half-lives: Python rounds the factor to 0, PostgreSQL must not raise."""
    scoring = Scoring((ScoreRule(1.0, trait=TraitMatch("tier", "gold")),), half_life_days=1)
    await define(db, TENANT, (), scoring)
    person = {**random_profile(random.Random(3), 0), "merged": False, "traits": {"tier": "gold"}}
    people = [
        {**person, "profile_id": "old", "score": 0.1, "score_at": NOW - timedelta(days=3650)},
        {**person, "profile_id": "older", "score": 1e-30, "score_at": NOW - timedelta(days=899)},
        {**person, "profile_id": "new", "score": 0.1, "score_at": NOW - timedelta(days=1)},
    ]
    await insert_profiles(db, TENANT, people)
    async with db.connect() as conn:
        enrichment = await load_enrichment(conn, TENANT)
    for value, members in ((0.5, {"old", "older", "new"}), (1.0, {"new"}), (1.05, set())):
        cond = parse({"compare": {"field": "score", "op": "gt", "value": value}})
        assert python_members(cond, people, enrichment, NOW) == members
        assert await sql_members(db, TENANT, cond, enrichment, NOW) == members


async def test_create_records_members_and_validates(db: AsyncEngine) -> None:
    await define(db, TENANT, COUNTERS, Scoring())
    people = [{**random_profile(random.Random(i), i), "merged": i == 3} for i in range(6)]
    for i, p in enumerate(people):
        p["tags"] = ["vip"] if i % 2 == 1 else []
    await insert_profiles(db, TENANT, people)
    store = SegmentStore(db)
    vip = parse({"compare": {"field": "tag", "op": "contains", "value": "vip"}})
    segment = await store.create(TENANT, "VIPs", "", vip, NOW)
    async with db.connect() as conn:
        rows = await conn.execute(
            sa.text("SELECT profile_id, entered_at FROM segment_members WHERE segment_id = :s"),
            {"s": segment.segment_id},
        )
        members = {r.profile_id: r.entered_at for r in rows}
    assert members == {"p-0001": NOW, "p-0005": NOW}  # p-0003 was merged away
    assert [s.name for s in await store.list_segments(TENANT)] == ["VIPs"]
    assert await store.list_segments(OTHER) == []

    with pytest.raises(AlreadyExists):
        await store.create(TENANT, "VIPs", "", vip, NOW)
    with pytest.raises(InvalidArgument) as bad:
        await store.create(TENANT, "", "", vip, NOW)
    assert [v.field for v in bad.value.violations] == ["name"]
    with pytest.raises(InvalidArgument) as bad:
        await store.create(TENANT, "x" * 101, "", vip, NOW)
    assert [v.field for v in bad.value.violations] == ["name"]
    unknown = parse(
        {
            "all": [
                {"compare": {"field": "counter.ghost", "op": "ge", "value": 1}},
                {"not": {"count": {"event_type": "page_view", "window_days": 30, "op": "ge", "value": 1}}},
                {"count": {"event_type": "signup", "window_days": 1, "op": "ge", "value": 1}},
                {"count": {"event_type": "page_view", "property": "category", "property_value": "toys",
                           "window_days": 30, "op": "ge", "value": 1}},
            ]
        }
    )  # fmt: skip
    with pytest.raises(InvalidArgument) as bad:
        await store.create(TENANT, "bad", "", unknown, NOW)
    described = {v.field: v.description for v in bad.value.violations}
    assert set(described) == {
        "condition.all[0].compare.field",
        "condition.all[1].not.count",  # views keeps 7 days, not 30
        "condition.all[2].count",
    }
    assert "EnrichmentService.CreateCounter" in described["condition.all[2].count"]
    with pytest.raises(InvalidArgument):
        await store.count(TENANT, NOW, condition=unknown)

    await store.delete(TENANT, segment.segment_id)
    async with db.connect() as conn:
        assert await conn.scalar(sa.text("SELECT count(*) FROM segment_members")) == 0
    for call in (store.get(TENANT, segment.segment_id), store.delete(TENANT, segment.segment_id)):
        with pytest.raises(NotFound):
            await call


# ---- over gRPC ---------------------------------------------------------------------------------------


def struct(data: dict[str, Any]) -> struct_pb2.Struct:
    s = struct_pb2.Struct()
    s.update(data)
    return s


@pytest_asyncio.fixture
async def segments_stub(host: ServiceHost) -> AsyncIterator[segment_pb2_grpc.SegmentServiceAsyncStub]:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{host.port}") as channel:
        yield segment_pb2_grpc.SegmentServiceStub(channel)


async def test_members_page_through_everyone_once(
    db: AsyncEngine, segments_stub: segment_pb2_grpc.SegmentServiceAsyncStub, clock: ManualClock
) -> None:
    people = [{**random_profile(random.Random(i), i), "merged": i % 7 == 0} for i in range(230)]
    await insert_profiles(db, TENANT, people)
    stub = segments_stub
    everyone = {"compare": {"field": "score", "op": "ge", "value": 0}}
    created = await stub.CreateSegment(
        segment_pb2.CreateSegmentRequest(name="all", description="everyone", condition=struct(everyone)),
        metadata=token(),
    )
    segment_id = created.segment.segment_id
    assert created.segment.condition == struct(everyone)
    read = token(TENANT, "read")
    got = await stub.GetSegment(segment_pb2.GetSegmentRequest(segment_id=segment_id), metadata=read)
    assert got.segment == created.segment
    live = {p["profile_id"] for p in people if not p["merged"]}
    count = await stub.CountSegment(segment_pb2.CountSegmentRequest(segment_id=segment_id), metadata=read)
    assert count.count == len(live) and count.count_time.ToDatetime(tzinfo=UTC) == clock.now()

    pages, token_ = [], ""
    while True:
        page = await stub.ListSegmentMembers(
            segment_pb2.ListSegmentMembersRequest(segment_id=segment_id, page_size=50, page_token=token_),
            metadata=read,
        )
        pages.append(list(page.profile_ids))
        token_ = page.next_page_token
        if not token_:
            break
    seen = [pid for page in pages for pid in page]
    assert len(seen) == len(set(seen)) and set(seen) == live
    assert [len(p) for p in pages[:-1]] == [50] * (len(pages) - 1)
    first = await stub.ListSegmentMembers(
        segment_pb2.ListSegmentMembersRequest(segment_id=segment_id), metadata=read
    )
    assert len(first.profile_ids) == 100  # page_size 0 means 100

    # another tenant sees nothing of it
    other = token(OTHER, "admin")
    for call in (
        stub.GetSegment(segment_pb2.GetSegmentRequest(segment_id=segment_id), metadata=other),
        stub.CountSegment(segment_pb2.CountSegmentRequest(segment_id=segment_id), metadata=other),
        stub.ListSegmentMembers(segment_pb2.ListSegmentMembersRequest(segment_id=segment_id), metadata=other),
        stub.DeleteSegment(segment_pb2.DeleteSegmentRequest(segment_id=segment_id), metadata=other),
    ):
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await call
        assert caught.value.code() == grpc.StatusCode.NOT_FOUND
    mine = await stub.CountSegment(
        segment_pb2.CountSegmentRequest(condition=struct(everyone)), metadata=other
    )
    assert mine.count == 0
    assert not (await stub.ListSegments(segment_pb2.ListSegmentsRequest(), metadata=other)).segments

    # a read token cannot create or delete
    for call in (
        stub.CreateSegment(
            segment_pb2.CreateSegmentRequest(name="x", condition=struct(everyone)), metadata=read
        ),
        stub.DeleteSegment(segment_pb2.DeleteSegmentRequest(segment_id=segment_id), metadata=read),
    ):
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await call
        assert caught.value.code() == grpc.StatusCode.PERMISSION_DENIED


async def invalid(call: object) -> dict[str, str]:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await call  # type: ignore[misc]
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    return field_violations(caught.value)


async def test_bad_requests_name_their_fields(
    segments_stub: segment_pb2_grpc.SegmentServiceAsyncStub,
) -> None:
    stub, md = segments_stub, token()
    ok = {"compare": {"field": "tag", "op": "contains", "value": "vip"}}
    created = await stub.CreateSegment(
        segment_pb2.CreateSegmentRequest(name="vip", condition=struct(ok)), metadata=md
    )
    segment_id = created.segment.segment_id

    bad_op = {"compare": {"field": "tag", "op": "gt", "value": "vip"}}
    assert set(
        await invalid(
            stub.CreateSegment(
                segment_pb2.CreateSegmentRequest(name="b", condition=struct(bad_op)), metadata=md
            )
        )
    ) == {"condition.compare.op"}
    no_counter = {
        "any": [ok, {"count": {"event_type": "page_view", "window_days": 7, "op": "ge", "value": 1}}]
    }
    violations = await invalid(
        stub.CreateSegment(
            segment_pb2.CreateSegmentRequest(name="b", condition=struct(no_counter)), metadata=md
        )
    )
    assert "EnrichmentService.CreateCounter" in violations["condition.any[1].count"]
    unknown = {"compare": {"field": "counter.nope", "op": "ge", "value": 1}}
    assert set(
        await invalid(
            stub.CountSegment(segment_pb2.CountSegmentRequest(condition=struct(unknown)), metadata=md)
        )
    ) == {"condition.compare.field"}
    assert set(
        await invalid(stub.CreateSegment(segment_pb2.CreateSegmentRequest(name="b"), metadata=md))
    ) == {"condition"}
    both = segment_pb2.CountSegmentRequest(segment_id=segment_id, condition=struct(ok))
    assert set(await invalid(stub.CountSegment(both, metadata=md))) == {"segment_id", "condition"}
    assert set(await invalid(stub.CountSegment(segment_pb2.CountSegmentRequest(), metadata=md))) == {
        "segment_id",
        "condition",
    }
    for bad_token in ("***", "%%%", "YQ=x", "//8"):
        request = segment_pb2.ListSegmentMembersRequest(segment_id=segment_id, page_token=bad_token)
        assert set(await invalid(stub.ListSegmentMembers(request, metadata=md))) == {"page_token"}, bad_token
    for size in (-1, 1001):
        request = segment_pb2.ListSegmentMembersRequest(segment_id=segment_id, page_size=size)
        assert set(await invalid(stub.ListSegmentMembers(request, metadata=md))) == {"page_size"}
    duplicate = segment_pb2.CreateSegmentRequest(name="vip", condition=struct(ok))
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.CreateSegment(duplicate, metadata=md)
    assert caught.value.code() == grpc.StatusCode.ALREADY_EXISTS
