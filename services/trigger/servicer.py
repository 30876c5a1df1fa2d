"""The gRPC face of the trigger service: proto -> domain -> store -> proto, nothing more."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import grpc

from relevans.common.v1 import common_pb2
from relevans.kit.clock import Clock
from relevans.kit.enums import enum_name, enum_value
from relevans.kit.errors import FieldViolation, InvalidArgument, Violations
from relevans.kit.paging import PageSize, decode_page_token, encode_page_token, refuse_other_listing
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
from services.trigger.domain.triggers import validate_trigger_id
from services.trigger.policy_protos import (
    policy_message,
    raw_trigger_policy,
    tenant_policy,
    trigger_policy_message,
)
from services.trigger.store import TriggerStore
from services.trigger.trace import DecisionRow

SERVICE_NAME = "relevans.trigger.v1.TriggerService"
SCOPES = {
    "CreateTrigger": "admin",
    "DeleteTrigger": "admin",
    "GetTrigger": "read",
    "ListTriggers": "read",
    "GetPolicy": "read",
    "SetPolicy": "admin",
    "ExplainDecisions": "read",
}
DECISION_PAGES = PageSize(default=50, maximum=200)

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
        policy=raw_trigger_policy(t.policy) if t.HasField("policy") else None,
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
        policy=trigger_policy_message(d.policy),
    )


def decision_proto(r: DecisionRow) -> trigger_pb2.Decision:
    d = trigger_pb2.Decision(
        decision_id=str(r.decision_id),
        trigger_id=r.trigger_id,
        profile_id=r.profile_id,
        outcome=enum_value(trigger_pb2.DecisionOutcome, r.outcome, "DECISION_OUTCOME_"),
        reason_code=r.reason_code,
        reason=r.reason,
        decide_time=to_timestamp(r.decided_at),
        event_id=r.event_id,
        occurrence=r.occurrence,
        idempotency_key=r.idempotency_key,
        count=r.count,
    )
    if r.until is not None:
        d.defer_until.FromDatetime(r.until)
    return d


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

    async def GetPolicy(
        self, request: trigger_pb2.GetPolicyRequest, context: Context
    ) -> trigger_pb2.GetPolicyResponse:
        policy = await self.store.get_policy(principal().tenant_id)
        return trigger_pb2.GetPolicyResponse(policy=policy_message(policy))

    async def SetPolicy(
        self, request: trigger_pb2.SetPolicyRequest, context: Context
    ) -> trigger_pb2.SetPolicyResponse:
        tenant = principal().tenant_id
        if not request.HasField("policy"):
            raise InvalidArgument(FieldViolation("policy", "is required"))
        wanted = tenant_policy(request.policy)
        stored = await self.store.set_policy(tenant, wanted, self.clock.now())
        return trigger_pb2.SetPolicyResponse(policy=policy_message(stored))

    async def ExplainDecisions(
        self, request: trigger_pb2.ExplainDecisionsRequest, context: Context
    ) -> trigger_pb2.ExplainDecisionsResponse:
        tenant = principal().tenant_id
        v = Violations()
        profile_id = request.profile_id
        if not profile_id:
            v.add("profile_id", "is required")
        elif len(profile_id) > MAX_PROFILE_ID_CHARS:
            v.add("profile_id", f"must be at most {MAX_PROFILE_ID_CHARS} characters")
        trigger_id = request.trigger_id or None
        if trigger_id is not None:
            validate_trigger_id(trigger_id, "trigger_id", v)
        v.raise_if_any()
        size = DECISION_PAGES.of(request.page_size)
        after = _decision_after(request.page_token, profile_id, request.trigger_id)
        rows = await self.store.explain(tenant, profile_id, trigger_id, after, size + 1)
        page, more = rows[:size], len(rows) > size
        token = ""
        if more:
            last = page[-1]
            token = encode_page_token(
                at=int(last.decided_at.timestamp() * 1_000_000),
                id=last.decision_id,
                profile=profile_id,
                trigger=request.trigger_id,
            )
        return trigger_pb2.ExplainDecisionsResponse(
            decisions=[decision_proto(r) for r in page], next_page_token=token
        )


MAX_PROFILE_ID_CHARS = 128


def _decision_after(token: str, profile_id: str, trigger_id: str) -> tuple[datetime, int] | None:
    """The (decided_at, decision_id) a page starts after; the token continues only its own listing."""
    data = decode_page_token(token, at=int, id=int, profile=str, trigger=str)
    if data is None:
        return None
    if data["profile"] != profile_id:
        raise refuse_other_listing("profile_id")
    if data["trigger"] != trigger_id:
        raise refuse_other_listing("trigger_id")
    return datetime.fromtimestamp(0, UTC) + timedelta(microseconds=data["at"]), data["id"]


def binding(servicer: TriggerServicer) -> ServiceBinding:
    return ServiceBinding(
        full_name=SERVICE_NAME,
        register=trigger_pb2_grpc.add_TriggerServiceServicer_to_server,
        servicer=servicer,
        scopes=SCOPES,
    )
