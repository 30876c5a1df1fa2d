"""The gRPC face of the trigger service: proto -> domain -> store -> proto, nothing more."""

from __future__ import annotations

from typing import Any

import grpc

from relevans.common.v1 import common_pb2
from relevans.kit.clock import Clock
from relevans.kit.enums import enum_name
from relevans.kit.paging import encode_page_token
from relevans.kit.proto import to_timestamp
from relevans.kit.server import ServiceBinding, principal
from relevans.trigger.v1 import trigger_pb2, trigger_pb2_grpc
from services.trigger.condition_protos import condition_fields, raw_condition
from services.trigger.domain import (
    TRIGGER_PAGES,
    RawTrigger,
    TriggerDef,
    check_trigger_id,
    page_after,
    validate_trigger,
)
from services.trigger.store import TriggerStore

SERVICE_NAME = "relevans.trigger.v1.TriggerService"
SCOPES = {
    "CreateTrigger": "admin",
    "DeleteTrigger": "admin",
    "GetTrigger": "read",
    "ListTriggers": "read",
}

Context = grpc.aio.ServicerContext[Any, Any]

# ---- proto <-> domain -------------------------------------------------------------------------


def raw_trigger(t: trigger_pb2.Trigger) -> RawTrigger:
    return RawTrigger(
        trigger_id=t.trigger_id,
        display_name=t.display_name,
        condition=raw_condition(t),
        channel=enum_name(common_pb2.Channel, t.channel, "CHANNEL_"),
        purpose=enum_name(common_pb2.Purpose, t.purpose, "PURPOSE_"),
        template_id=t.template_id,
    )


def trigger_proto(d: TriggerDef) -> trigger_pb2.Trigger:
    return trigger_pb2.Trigger(
        trigger_id=d.trigger_id,
        display_name=d.display_name,
        **condition_fields(d.condition),
        channel=common_pb2.Channel.Value("CHANNEL_" + d.channel.upper()),
        purpose=common_pb2.Purpose.Value("PURPOSE_" + d.purpose.upper()),
        template_id=d.template_id,
        create_time=to_timestamp(d.created_at),
    )


# ---- servicer -----------------------------------------------------------------------------------


class TriggerServicer(trigger_pb2_grpc.TriggerServiceServicer):
    def __init__(self, store: TriggerStore, clock: Clock) -> None:
        self.store = store
        self.clock = clock

    async def CreateTrigger(
        self, request: trigger_pb2.CreateTriggerRequest, context: Context
    ) -> trigger_pb2.CreateTriggerResponse:
        tenant = principal().tenant_id
        requested = validate_trigger(raw_trigger(request.trigger) if request.HasField("trigger") else None)
        stored = await self.store.create_trigger(tenant, requested, self.clock.now())
        return trigger_pb2.CreateTriggerResponse(trigger=trigger_proto(stored))

    async def GetTrigger(
        self, request: trigger_pb2.GetTriggerRequest, context: Context
    ) -> trigger_pb2.GetTriggerResponse:
        tenant = principal().tenant_id
        found = await self.store.get_trigger(tenant, check_trigger_id(request.trigger_id))
        return trigger_pb2.GetTriggerResponse(trigger=trigger_proto(found))

    async def ListTriggers(
        self, request: trigger_pb2.ListTriggersRequest, context: Context
    ) -> trigger_pb2.ListTriggersResponse:
        tenant = principal().tenant_id
        size = TRIGGER_PAGES.of(request.page_size)
        after = page_after(request.page_token)
        found = await self.store.list_triggers(tenant, after, size + 1)
        page, more = found[:size], len(found) > size
        return trigger_pb2.ListTriggersResponse(
            triggers=[trigger_proto(d) for d in page],
            next_page_token=encode_page_token(after=page[-1].trigger_id) if more else "",
        )

    async def DeleteTrigger(
        self, request: trigger_pb2.DeleteTriggerRequest, context: Context
    ) -> trigger_pb2.DeleteTriggerResponse:
        tenant = principal().tenant_id
        await self.store.delete_trigger(tenant, check_trigger_id(request.trigger_id), self.clock.now())
        return trigger_pb2.DeleteTriggerResponse()


def binding(servicer: TriggerServicer) -> ServiceBinding:
    return ServiceBinding(
        full_name=SERVICE_NAME,
        register=trigger_pb2_grpc.add_TriggerServiceServicer_to_server,
        servicer=servicer,
        scopes=SCOPES,
    )
