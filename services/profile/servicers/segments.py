"""The gRPC face of SegmentService: proto -> store/segments.py -> proto, nothing more."""

from __future__ import annotations

from typing import Any

import grpc
from sqlalchemy.ext.asyncio import AsyncEngine

from relevans.kit.clock import Clock
from relevans.kit.errors import FieldViolation, InvalidArgument, Violations
from relevans.kit.proto import from_struct, to_struct, to_timestamp
from relevans.kit.server import ServiceBinding, principal
from relevans.profile.v1 import segment_pb2, segment_pb2_grpc
from services.profile.domain.segment_rules import parse
from services.profile.store.enrichment import TenantCache
from services.profile.store.segments import MEMBER_PAGES, Segment, SegmentStore, after_profile_id
from services.profile.store.signals import SegmentRule

SERVICE_NAME = segment_pb2.DESCRIPTOR.services_by_name["SegmentService"].full_name
SCOPES = {
    "CreateSegment": "admin",
    "DeleteSegment": "admin",
    "GetSegment": "read",
    "ListSegments": "read",
    "CountSegment": "read",
    "ListSegmentMembers": "read",
}

Context = grpc.aio.ServicerContext[Any, Any]


def segment_proto(s: Segment) -> segment_pb2.Segment:
    return segment_pb2.Segment(
        segment_id=s.segment_id,
        name=s.name,
        description=s.description,
        condition=to_struct(s.condition),
        create_time=to_timestamp(s.created_at),
    )


class SegmentServicer(segment_pb2_grpc.SegmentServiceServicer):
    def __init__(self, store: SegmentStore, clock: Clock, rules: TenantCache[list[SegmentRule]]) -> None:
        self.store = store
        self.clock = clock
        self.rules = rules  # what ingest evaluates: forgotten after each change, so it applies at once

    async def CreateSegment(
        self, request: segment_pb2.CreateSegmentRequest, context: Context
    ) -> segment_pb2.CreateSegmentResponse:
        if not request.HasField("condition"):
            raise InvalidArgument(FieldViolation("condition", "is required"))
        condition = parse(from_struct(request.condition))
        tenant = principal().tenant_id
        segment = await self.store.create(
            tenant, request.name, request.description, condition, self.clock.now()
        )
        self.rules.invalidate(tenant)
        return segment_pb2.CreateSegmentResponse(segment=segment_proto(segment))

    async def GetSegment(
        self, request: segment_pb2.GetSegmentRequest, context: Context
    ) -> segment_pb2.GetSegmentResponse:
        segment = await self.store.get(principal().tenant_id, request.segment_id)
        return segment_pb2.GetSegmentResponse(segment=segment_proto(segment))

    async def ListSegments(
        self, request: segment_pb2.ListSegmentsRequest, context: Context
    ) -> segment_pb2.ListSegmentsResponse:
        found = await self.store.list_segments(principal().tenant_id)
        return segment_pb2.ListSegmentsResponse(segments=[segment_proto(s) for s in found])

    async def DeleteSegment(
        self, request: segment_pb2.DeleteSegmentRequest, context: Context
    ) -> segment_pb2.DeleteSegmentResponse:
        tenant = principal().tenant_id
        await self.store.delete(tenant, request.segment_id)
        self.rules.invalidate(tenant)
        return segment_pb2.DeleteSegmentResponse()

    async def CountSegment(
        self, request: segment_pb2.CountSegmentRequest, context: Context
    ) -> segment_pb2.CountSegmentResponse:
        has_condition = request.HasField("condition")
        if bool(request.segment_id) == has_condition:
            violations = Violations()
            for name in ("segment_id", "condition"):
                violations.add(name, "set exactly one of segment_id and condition")
            violations.raise_if_any()
        now = self.clock.now()
        tenant = principal().tenant_id
        if has_condition:
            count = await self.store.count(tenant, now, condition=parse(from_struct(request.condition)))
        else:
            count = await self.store.count(tenant, now, segment_id=request.segment_id)
        return segment_pb2.CountSegmentResponse(count=count, count_time=to_timestamp(now))

    async def ListSegmentMembers(
        self, request: segment_pb2.ListSegmentMembersRequest, context: Context
    ) -> segment_pb2.ListSegmentMembersResponse:
        limit = MEMBER_PAGES.of(request.page_size)
        after = after_profile_id(request.page_token)
        ids, token = await self.store.members(
            principal().tenant_id, request.segment_id, self.clock.now(), limit, after
        )
        return segment_pb2.ListSegmentMembersResponse(profile_ids=ids, next_page_token=token)


def binding(engine: AsyncEngine, clock: Clock, rules: TenantCache[list[SegmentRule]]) -> ServiceBinding:
    return ServiceBinding(
        full_name=SERVICE_NAME,
        register=segment_pb2_grpc.add_SegmentServiceServicer_to_server,
        servicer=SegmentServicer(SegmentStore(engine), clock, rules),
        scopes=SCOPES,
    )
