"""Segments end to end: counters defined over the API, events tracked, segments counted and listed."""

from __future__ import annotations

from datetime import timedelta

import grpc
import pytest
from google.protobuf import struct_pb2

from relevans.profile.v1 import enrichment_pb2, enrichment_pb2_grpc, segment_pb2, segment_pb2_grpc
from tests.helpers.system import System

TENANT = "theatre"


def struct(data: dict[str, object]) -> struct_pb2.Struct:
    s = struct_pb2.Struct()
    s.update(data)  # type: ignore[arg-type]
    return s


async def test_a_segment_of_engaged_consenting_customers(system: System) -> None:
    admin, read = system.token(TENANT, "admin"), system.token(TENANT, "read")
    segments = segment_pb2_grpc.SegmentServiceStub(system.channels["profile"])
    enrichment = enrichment_pb2_grpc.EnrichmentServiceStub(system.channels["profile"])
    await enrichment.CreateCounter(
        enrichment_pb2.CreateCounterRequest(
            counter=enrichment_pb2.CounterDefinition(name="views", event_type="page_view", window_days=[7])
        ),
        metadata=admin,
    )
    ann = await system.customer(TENANT, "ann@example.com", "Ann")
    await system.customer(TENANT, "bob@example.com", "Bob")
    await system.customer(TENANT, "cat@example.com", "Cat", consent=False)
    for email, views in (("ann@example.com", 3), ("bob@example.com", 1), ("cat@example.com", 4)):
        for _ in range(views):
            await system.track(TENANT, email, "page_view")

    engaged = {
        "all": [
            {"count": {"event_type": "page_view", "window_days": 7, "op": "ge", "value": 2}},
            {"compare": {"field": "consent.marketing.email", "op": "eq", "value": "granted"}},
        ]
    }
    created = await segments.CreateSegment(
        segment_pb2.CreateSegmentRequest(name="engaged", condition=struct(engaged)), metadata=admin
    )
    segment_id = created.segment.segment_id
    by_id = segment_pb2.CountSegmentRequest(segment_id=segment_id)
    assert (await segments.CountSegment(by_id, metadata=read)).count == 1
    members = await segments.ListSegmentMembers(
        segment_pb2.ListSegmentMembersRequest(segment_id=segment_id), metadata=read
    )
    assert list(members.profile_ids) == [ann] and not members.next_page_token
    viewers = {"count": {"event_type": "page_view", "window_days": 7, "op": "ge", "value": 2}}
    unsaved = segment_pb2.CountSegmentRequest(condition=struct(viewers))
    assert (await segments.CountSegment(unsaved, metadata=read)).count == 2

    await system.clock.advance(timedelta(days=7))  # the views leave the 7-day window
    assert (await segments.CountSegment(by_id, metadata=read)).count == 0
    assert (await segments.CountSegment(unsaved, metadata=read)).count == 0

    listed = await segments.ListSegments(segment_pb2.ListSegmentsRequest(), metadata=read)
    assert [s.name for s in listed.segments] == ["engaged"]
    other = system.token("another-theatre", "admin")
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await segments.GetSegment(segment_pb2.GetSegmentRequest(segment_id=segment_id), metadata=other)
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await segments.CountSegment(by_id, metadata=None)
    assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED

    await segments.DeleteSegment(segment_pb2.DeleteSegmentRequest(segment_id=segment_id), metadata=admin)
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await segments.CountSegment(by_id, metadata=read)
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND
