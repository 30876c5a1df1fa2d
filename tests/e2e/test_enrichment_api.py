"""EnrichmentService over real gRPC: counters, computed traits and scoring rules per tenant."""

from __future__ import annotations

import math
from datetime import UTC

import grpc
from google.protobuf import struct_pb2

from relevans.profile.v1 import enrichment_pb2 as pb
from relevans.profile.v1 import enrichment_pb2_grpc
from tests.helpers import field_violations, rpc_error
from tests.helpers.system import System

A, B = "tenant-a", "tenant-b"


def api(system: System) -> enrichment_pb2_grpc.EnrichmentServiceAsyncStub:
    return enrichment_pb2_grpc.EnrichmentServiceStub(system.channels["profile"])


def number(x: float) -> struct_pb2.Value:
    return struct_pb2.Value(number_value=x)


async def counter_names(system: System, tenant: str) -> list[str]:
    reply = await api(system).ListCounters(pb.ListCountersRequest(), metadata=system.token(tenant, "read"))
    return [c.name for c in reply.counters]


async def test_counters_are_created_listed_and_deleted(system: System) -> None:
    admin = system.token(A, "admin")
    views = pb.CounterDefinition(
        name="toy_views",
        event_type="page_view",
        window_days=[7, 1],
        property="category",
        property_value=struct_pb2.Value(string_value="toys"),
        thresholds=[11, 3],
    )
    created = (
        await api(system).CreateCounter(pb.CreateCounterRequest(counter=views), metadata=admin)
    ).counter
    assert list(created.window_days) == [1, 7] and list(created.thresholds) == [3, 11]
    assert created.create_time.ToDatetime(tzinfo=UTC) == system.clock.now()
    seats = pb.CounterDefinition(
        name="big_orders", event_type="order", property="seats", property_value=number(3)
    )
    created = (
        await api(system).CreateCounter(pb.CreateCounterRequest(counter=seats), metadata=admin)
    ).counter
    assert list(created.window_days) == [7]  # the default window

    listed = (
        await api(system).ListCounters(pb.ListCountersRequest(), metadata=system.token(A, "read"))
    ).counters
    assert [c.name for c in listed] == ["big_orders", "toy_views"]
    assert listed[0].property_value == number(3) and listed[1].property_value.string_value == "toys"

    again = await rpc_error(api(system).CreateCounter(pb.CreateCounterRequest(counter=seats), metadata=admin))
    assert again.code() == grpc.StatusCode.ALREADY_EXISTS

    await api(system).DeleteCounter(pb.DeleteCounterRequest(name="big_orders"), metadata=admin)
    assert await counter_names(system, A) == ["toy_views"]
    gone = await rpc_error(
        api(system).DeleteCounter(pb.DeleteCounterRequest(name="big_orders"), metadata=admin)
    )
    assert gone.code() == grpc.StatusCode.NOT_FOUND


async def test_computed_traits_are_created_listed_and_deleted(system: System) -> None:
    admin = system.token(A, "admin")
    show = pb.ComputedTrait(name="favourite_show", event_type="ticket_view", property="show")
    city = pb.ComputedTrait(name="city", event_type="order", property="city")
    for trait in (show, city):
        await api(system).CreateComputedTrait(
            pb.CreateComputedTraitRequest(computed_trait=trait), metadata=admin
        )
    listed = await api(system).ListComputedTraits(
        pb.ListComputedTraitsRequest(), metadata=system.token(A, "read")
    )
    assert [(t.name, t.event_type, t.property) for t in listed.computed_traits] == [
        ("city", "order", "city"),
        ("favourite_show", "ticket_view", "show"),
    ]
    await api(system).DeleteComputedTrait(pb.DeleteComputedTraitRequest(name="city"), metadata=admin)
    listed = await api(system).ListComputedTraits(pb.ListComputedTraitsRequest(), metadata=admin)
    assert [t.name for t in listed.computed_traits] == ["favourite_show"]
    gone = await rpc_error(
        api(system).DeleteComputedTrait(pb.DeleteComputedTraitRequest(name="city"), metadata=admin)
    )
    assert gone.code() == grpc.StatusCode.NOT_FOUND


async def test_scoring_rules_are_set_and_read(system: System) -> None:
    admin, read = system.token(A, "admin"), system.token(A, "read")
    empty = (await api(system).GetScoringRules(pb.GetScoringRulesRequest(), metadata=read)).scoring_rules
    assert empty == pb.ScoringRules()

    rules = pb.ScoringRules(
        rules=[
            pb.ScoreRule(
                event=pb.EventMatch(event_type="order", property="seats", property_value=number(3)), points=5
            ),
            pb.ScoreRule(event=pb.EventMatch(event_type="unsubscribe"), points=-20),
            pb.ScoreRule(trait=pb.TraitMatch(name="vip", value=struct_pb2.Value(bool_value=True)), points=10),
        ],
        half_life_days=30,
        thresholds=[100, 50],
    )
    saved = (
        await api(system).SetScoringRules(pb.SetScoringRulesRequest(scoring_rules=rules), metadata=admin)
    ).scoring_rules
    got = (await api(system).GetScoringRules(pb.GetScoringRulesRequest(), metadata=read)).scoring_rules
    assert got == saved
    assert list(got.rules) == list(rules.rules)
    assert got.half_life_days == 30 and list(got.thresholds) == [50, 100]
    assert got.update_time.ToDatetime(tzinfo=UTC) == system.clock.now()

    await api(system).SetScoringRules(
        pb.SetScoringRulesRequest(scoring_rules=pb.ScoringRules()), metadata=admin
    )
    got = (await api(system).GetScoringRules(pb.GetScoringRulesRequest(), metadata=read)).scoring_rules
    assert list(got.rules) == [] and got.HasField("update_time")


async def test_bad_definitions_are_refused_naming_fields_and_nothing_is_written(system: System) -> None:
    admin = system.token(A, "admin")
    bad_counter = pb.CounterDefinition(name="views", event_type="Page View", window_days=[5])
    err = await rpc_error(
        api(system).CreateCounter(pb.CreateCounterRequest(counter=bad_counter), metadata=admin)
    )
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert set(field_violations(err)) == {"counter.event_type", "counter.window_days[0]"}
    assert await counter_names(system, A) == []

    bad_trait = pb.ComputedTrait(name="Show", event_type="ticket_view")
    err = await rpc_error(
        api(system).CreateComputedTrait(
            pb.CreateComputedTraitRequest(computed_trait=bad_trait), metadata=admin
        )
    )
    assert set(field_violations(err)) == {"computed_trait.name", "computed_trait.property"}

    good = pb.ScoringRules(rules=[pb.ScoreRule(event=pb.EventMatch(event_type="order"), points=5)])
    await api(system).SetScoringRules(pb.SetScoringRulesRequest(scoring_rules=good), metadata=admin)
    bad_rules = pb.ScoringRules(
        rules=[
            pb.ScoreRule(event=pb.EventMatch(event_type="order"), points=math.inf),
            pb.ScoreRule(points=1),  # neither event nor trait (the oneof cannot carry both)
            pb.ScoreRule(event=pb.EventMatch(event_type="Bad Type"), points=1),
            pb.ScoreRule(trait=pb.TraitMatch(name="vip"), points=1),
        ],
        half_life_days=-1,
        thresholds=[10, 10],
    )
    err = await rpc_error(
        api(system).SetScoringRules(pb.SetScoringRulesRequest(scoring_rules=bad_rules), metadata=admin)
    )
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert set(field_violations(err)) == {
        "scoring_rules.rules[0].points",
        "scoring_rules.rules[1]",
        "scoring_rules.rules[2].event.event_type",
        "scoring_rules.rules[3].trait.value",
        "scoring_rules.half_life_days",
        "scoring_rules.thresholds[1]",
    }
    got = await api(system).GetScoringRules(pb.GetScoringRulesRequest(), metadata=admin)
    assert list(got.scoring_rules.rules) == list(good.rules)

    err = await rpc_error(api(system).DeleteCounter(pb.DeleteCounterRequest(), metadata=admin))
    assert set(field_violations(err)) == {"name"}


async def test_tenants_see_and_delete_only_their_own_definitions(system: System) -> None:
    counter = pb.CounterDefinition(name="buys", event_type="order")
    await api(system).CreateCounter(
        pb.CreateCounterRequest(counter=counter), metadata=system.token(A, "admin")
    )
    trait = pb.ComputedTrait(name="city", event_type="order", property="city")
    await api(system).CreateComputedTrait(
        pb.CreateComputedTraitRequest(computed_trait=trait), metadata=system.token(A, "admin")
    )
    rules = pb.ScoringRules(rules=[pb.ScoreRule(event=pb.EventMatch(event_type="order"), points=5)])
    await api(system).SetScoringRules(
        pb.SetScoringRulesRequest(scoring_rules=rules), metadata=system.token(A, "admin")
    )

    b = system.token(B, "admin", "read")
    assert await counter_names(system, B) == []
    traits = await api(system).ListComputedTraits(pb.ListComputedTraitsRequest(), metadata=b)
    assert list(traits.computed_traits) == []
    scoring = await api(system).GetScoringRules(pb.GetScoringRulesRequest(), metadata=b)
    assert scoring.scoring_rules == pb.ScoringRules()
    for call in (
        api(system).DeleteCounter(pb.DeleteCounterRequest(name="buys"), metadata=b),
        api(system).DeleteComputedTrait(pb.DeleteComputedTraitRequest(name="city"), metadata=b),
    ):
        assert (await rpc_error(call)).code() == grpc.StatusCode.NOT_FOUND
    # B may use the same names for its own definitions.
    await api(system).CreateCounter(pb.CreateCounterRequest(counter=counter), metadata=b)
    assert await counter_names(system, A) == ["buys"]
    listed = await api(system).ListComputedTraits(
        pb.ListComputedTraitsRequest(), metadata=system.token(A, "read")
    )
    assert [t.name for t in listed.computed_traits] == ["city"]


async def test_writing_definitions_needs_the_admin_scope(system: System) -> None:
    read = system.token(A, "read")
    ingest = system.token(A, "ingest")
    counter = pb.CounterDefinition(name="buys", event_type="order")
    for md in (read, ingest):
        calls = [
            api(system).CreateCounter(pb.CreateCounterRequest(counter=counter), metadata=md),
            api(system).DeleteCounter(pb.DeleteCounterRequest(name="buys"), metadata=md),
            api(system).CreateComputedTrait(pb.CreateComputedTraitRequest(), metadata=md),
            api(system).DeleteComputedTrait(pb.DeleteComputedTraitRequest(name="x"), metadata=md),
            api(system).SetScoringRules(pb.SetScoringRulesRequest(), metadata=md),
        ]
        for call in calls:
            assert (await rpc_error(call)).code() == grpc.StatusCode.PERMISSION_DENIED
    assert (await rpc_error(api(system).ListCounters(pb.ListCountersRequest(), metadata=ingest))).code() == (
        grpc.StatusCode.PERMISSION_DENIED
    )
    assert await counter_names(system, A) == []
