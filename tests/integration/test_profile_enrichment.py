"""Traits with sources, counters, last seen, lead score, threshold crossings and segment entry/exit,
through the profile service's real gRPC API on real PostgreSQL and NATS."""

from __future__ import annotations

from datetime import timedelta
from typing import TYPE_CHECKING

import grpc
import nats
import pytest
from google.protobuf import field_mask_pb2, struct_pb2

from relevans.kit.clock import ManualClock
from relevans.profile.v1 import (
    bus_pb2,
    enrichment_pb2,
    enrichment_pb2_grpc,
    profile_pb2,
    segment_pb2,
    segment_pb2_grpc,
)
from tests.helpers import field_violations
from tests.helpers.profile import ev, fetch_all, token

if TYPE_CHECKING:
    from tests.helpers.profile import Stub

ADMIN = token("shop", "admin")
RW = token("shop", "ingest", "read")


def struct(**values: object) -> struct_pb2.Struct:
    s = struct_pb2.Struct()
    s.update(values)
    return s


def value(v: object) -> struct_pb2.Value:
    out = struct_pb2.Value()
    if isinstance(v, str):
        out.string_value = v
    elif isinstance(v, bool):
        out.bool_value = v
    else:
        out.number_value = float(v)  # type: ignore[arg-type]
    return out


async def track(stub: Stub, **fields: object) -> profile_pb2.TrackResponse:
    type_ = str(fields.pop("type", "page_view"))
    return await stub.Track(profile_pb2.TrackRequest(event=ev(type_, **fields)), metadata=RW)


async def get(stub: Stub, customer_id: str, *paths: str) -> profile_pb2.Profile:
    mask = field_mask_pb2.FieldMask(paths=list(paths))
    response = await stub.GetProfile(
        profile_pb2.GetProfileRequest(customer_id=customer_id, read_mask=mask), metadata=RW
    )
    return response.profile


def counts(profile: profile_pb2.Profile) -> dict[tuple[str, int], int]:
    return {(c.name, c.window_days): c.count for c in profile.counters}


async def toy_counter(channel: grpc.aio.Channel, thresholds: list[int] | None = None) -> None:
    definitions = enrichment_pb2_grpc.EnrichmentServiceStub(channel)
    await definitions.CreateCounter(
        enrichment_pb2.CreateCounterRequest(
            counter=enrichment_pb2.CounterDefinition(
                name="toy_views",
                event_type="page_view",
                window_days=[7, 30],
                property="category",
                property_value=value("toys"),
                thresholds=thresholds or [],
            )
        ),
        metadata=ADMIN,
    )


# ---- traits -----------------------------------------------------------------------------------


async def test_effective_traits_follow_declared_then_backend_then_behavioural(
    stub: Stub, channel: grpc.aio.Channel
) -> None:
    definitions = enrichment_pb2_grpc.EnrichmentServiceStub(channel)
    await definitions.CreateComputedTrait(
        enrichment_pb2.CreateComputedTraitRequest(
            computed_trait=enrichment_pb2.ComputedTrait(
                name="favourite_show", event_type="ticket_view", property="show"
            )
        ),
        metadata=ADMIN,
    )
    first = await track(stub, type="ticket_view", customer_id="c-1", properties={"show": "hamlet"})
    assert dict((await get(stub, "c-1")).traits) == {"favourite_show": value("hamlet")}

    await stub.SetTraits(
        profile_pb2.SetTraitsRequest(
            profile_id=first.profile_id, source="backend", traits=struct(favourite_show="macbeth", tier=2)
        ),
        metadata=RW,
    )
    await stub.Identify(
        profile_pb2.IdentifyRequest(customer_id="c-1", traits=struct(favourite_show="lear")), metadata=RW
    )
    profile = await get(stub, "c-1")
    assert profile.traits["favourite_show"].string_value == "lear"
    assert profile.traits["tier"].number_value == 2
    assert not profile.trait_sources, "per-source values only when the read mask asks"

    sources = (await get(stub, "c-1", "trait_sources")).trait_sources
    assert [(t.name, t.source, t.value.string_value) for t in sources if t.name == "favourite_show"] == [
        ("favourite_show", "declared", "lear"),
        ("favourite_show", "backend", "macbeth"),
        ("favourite_show", "behavioural", "hamlet"),
    ]

    # a null removes the declared value: the backend one shows again; a newer event changes only
    # the behavioural value, which stays hidden behind the backend one
    await stub.SetTraits(
        profile_pb2.SetTraitsRequest(
            profile_id=first.profile_id, source="declared", traits=struct(favourite_show=None)
        ),
        metadata=RW,
    )
    await track(stub, type="ticket_view", customer_id="c-1", properties={"show": "othello"})
    profile = await get(stub, "c-1", "traits", "trait_sources")
    assert profile.traits["favourite_show"].string_value == "macbeth"
    assert ("behavioural", "othello") in [(t.source, t.value.string_value) for t in profile.trait_sources]
    assert not profile.email and not profile.consents, "fields outside the mask stay empty"


async def test_set_traits_names_every_bad_field_and_writes_nothing(stub: Stub) -> None:
    created = await track(stub, customer_id="c-2")
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.SetTraits(
            profile_pb2.SetTraitsRequest(
                profile_id=created.profile_id,
                source="behavioural",
                traits=struct(**{"Bad-Name": 1, "ok": "fine", "nested": {"a": 1}}),
            ),
            metadata=RW,
        )
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert {"source", "traits.Bad-Name", "traits.nested"} <= set(field_violations(caught.value))
    assert not (await get(stub, "c-2")).traits

    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.SetTraits(
            profile_pb2.SetTraitsRequest(profile_id="nobody", source="backend", traits=struct(a=1)),
            metadata=RW,
        )
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND


async def test_an_unknown_read_mask_field_is_named(stub: Stub) -> None:
    await track(stub, customer_id="c-3")
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await get(stub, "c-3", "tags", "shoe_size")
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert set(field_violations(caught.value)) == {"read_mask.paths[1]"}


# ---- counters, last seen, score ---------------------------------------------------------------


async def test_counters_count_in_their_windows_once_per_event_and_publish_crossings(
    stub: Stub, channel: grpc.aio.Channel, clock: ManualClock, js: nats.js.JetStreamContext
) -> None:
    await toy_counter(channel, thresholds=[3])
    toys = {"category": "toys"}
    await track(stub, customer_id="c-4", message_id="t-1", properties=toys)
    await track(stub, customer_id="c-4", message_id="t-2", properties=toys)
    await track(stub, customer_id="c-4", message_id="t-2", properties=toys)  # a duplicate counts once
    await track(stub, customer_id="c-4", properties={"category": "books"})
    assert counts(await get(stub, "c-4")) == {("toy_views", 7): 2, ("toy_views", 30): 2}

    await clock.advance(timedelta(days=1))
    third = await track(stub, customer_id="c-4", properties=toys)
    profile = await get(stub, "c-4")
    assert counts(profile) == {("toy_views", 7): 3, ("toy_views", 30): 3}
    assert profile.last_seen["page_view"].ToDatetime().date() == clock.now().date()

    [msg] = await fetch_all(js, "rv.profile.thresholds", 1)
    crossed = bus_pb2.ThresholdCrossed.FromString(msg.data)
    assert (crossed.kind, crossed.name, crossed.window_days, crossed.threshold, crossed.value) == (
        "counter",
        "toy_views",
        7,
        3,
        3,
    )
    assert (crossed.profile_id, crossed.event_id) == (third.profile_id, third.event_id)

    await clock.advance(timedelta(days=7))  # the first day's two views leave the 7-day window
    assert counts(await get(stub, "c-4")) == {("toy_views", 7): 0, ("toy_views", 30): 3}


async def test_enriched_events_carry_score_counters_and_traits_and_the_score_decays(
    stub: Stub, channel: grpc.aio.Channel, clock: ManualClock, js: nats.js.JetStreamContext
) -> None:
    await toy_counter(channel)
    definitions = enrichment_pb2_grpc.EnrichmentServiceStub(channel)
    await definitions.SetScoringRules(
        enrichment_pb2.SetScoringRulesRequest(
            scoring_rules=enrichment_pb2.ScoringRules(
                rules=[
                    enrichment_pb2.ScoreRule(
                        event=enrichment_pb2.EventMatch(event_type="page_view"), points=10
                    ),
                    enrichment_pb2.ScoreRule(
                        trait=enrichment_pb2.TraitMatch(name="tier", value=value("gold")), points=5
                    ),
                ],
                half_life_days=7,
                thresholds=[15],
            )
        ),
        metadata=ADMIN,
    )
    known = await stub.Identify(profile_pb2.IdentifyRequest(customer_id="c-5"), metadata=RW)
    await stub.SetTraits(
        profile_pb2.SetTraitsRequest(
            profile_id=known.profile.profile_id, source="backend", traits=struct(tier="gold")
        ),
        metadata=RW,
    )
    viewed = await track(stub, customer_id="c-5", properties={"category": "toys"})

    [msg] = await fetch_all(js, "rv.events.>", 1)
    enriched = bus_pb2.EnrichedEvent.FromString(msg.data)
    assert enriched.event_id == viewed.event_id
    assert enriched.profile.score == pytest.approx(15)
    assert counts(enriched.profile) == {("toy_views", 7): 1, ("toy_views", 30): 1}
    assert enriched.profile.traits["tier"].string_value == "gold"
    assert "page_view" in enriched.profile.last_seen

    [msg] = await fetch_all(js, "rv.profile.thresholds", 1)
    crossed = bus_pb2.ThresholdCrossed.FromString(msg.data)
    assert (crossed.kind, crossed.threshold, crossed.value) == ("score", 15, pytest.approx(15))

    await clock.advance(timedelta(days=7))  # event points halve, trait points stay
    assert (await get(stub, "c-5", "score")).score == pytest.approx(10)


# ---- segments ---------------------------------------------------------------------------------


async def test_a_segment_applies_to_the_next_event_once_saved_and_no_more_once_deleted(
    stub: Stub, channel: grpc.aio.Channel, js: nats.js.JetStreamContext
) -> None:
    """Ingest keeps each tenant's segments a while (like its definitions): saving or deleting one
    through the service must still apply from the very next event."""
    segments = segment_pb2_grpc.SegmentServiceStub(channel)
    await track(stub, customer_id="c-8")  # ingest has now read (and kept) the tenant's segments: none
    created = await segments.CreateSegment(
        segment_pb2.CreateSegmentRequest(
            name="scored", condition=struct(compare={"field": "score", "op": "ge", "value": 0})
        ),
        metadata=ADMIN,
    )
    entered = await track(stub, customer_id="c-9")
    await segments.DeleteSegment(
        segment_pb2.DeleteSegmentRequest(segment_id=created.segment.segment_id), metadata=ADMIN
    )
    await track(stub, customer_id="c-10")  # would enter the segment, were it still evaluated

    [msg] = await fetch_all(js, "rv.profile.segments", 1)
    change = bus_pb2.SegmentMembershipChanged.FromString(msg.data)
    assert (change.segment_name, change.entered, change.event_id) == ("scored", True, entered.event_id)
    assert (await js.stream_info("RV_PROFILE")).state.messages == 1


async def test_events_publish_segment_entries_and_exits(
    stub: Stub, channel: grpc.aio.Channel, clock: ManualClock, js: nats.js.JetStreamContext
) -> None:
    await toy_counter(channel)
    segments = segment_pb2_grpc.SegmentServiceStub(channel)
    created = await segments.CreateSegment(
        segment_pb2.CreateSegmentRequest(
            name="toy fans",
            condition=struct(compare={"field": "counter.toy_views", "op": "ge", "value": 2}),
        ),
        metadata=ADMIN,
    )
    toys = {"category": "toys"}
    await track(stub, customer_id="c-6", properties=toys)
    second = await track(stub, customer_id="c-6", properties=toys)
    await track(stub, customer_id="c-6", properties=toys)  # already in: nothing new

    await clock.advance(timedelta(days=8))
    left = await track(stub, customer_id="c-6", properties={"category": "books"})

    changes = [
        bus_pb2.SegmentMembershipChanged.FromString(m.data)
        for m in await fetch_all(js, "rv.profile.segments", 2)
    ]
    assert [(c.segment_id, c.segment_name, c.entered, c.event_id) for c in changes] == [
        (created.segment.segment_id, "toy fans", True, second.event_id),
        (created.segment.segment_id, "toy fans", False, left.event_id),
    ]
    assert (await js.stream_info("RV_PROFILE")).state.messages == 2

    # the segment needs the counter: it cannot go while the segment stays
    definitions = enrichment_pb2_grpc.EnrichmentServiceStub(channel)
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await definitions.DeleteCounter(enrichment_pb2.DeleteCounterRequest(name="toy_views"), metadata=ADMIN)
    assert caught.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "toy fans" in (caught.value.details() or "")
    await segments.DeleteSegment(
        segment_pb2.DeleteSegmentRequest(segment_id=created.segment.segment_id), metadata=ADMIN
    )
    await definitions.DeleteCounter(enrichment_pb2.DeleteCounterRequest(name="toy_views"), metadata=ADMIN)


# ---- merges -----------------------------------------------------------------------------------


async def test_a_merge_adds_the_shadow_profiles_counts_and_last_seen(
    stub: Stub, channel: grpc.aio.Channel
) -> None:
    await toy_counter(channel)
    toys = {"category": "toys"}
    await stub.Identify(profile_pb2.IdentifyRequest(customer_id="c-7"), metadata=RW)
    await track(stub, customer_id="c-7", properties=toys)
    await track(stub, anonymous_id="cookie-7", properties=toys)
    await track(stub, anonymous_id="cookie-7", type="add_to_cart")
    await stub.Identify(profile_pb2.IdentifyRequest(customer_id="c-7", anonymous_id="cookie-7"), metadata=RW)
    profile = await get(stub, "c-7")
    assert counts(profile) == {("toy_views", 7): 2, ("toy_views", 30): 2}
    assert set(profile.last_seen) == {"page_view", "add_to_cart"}
