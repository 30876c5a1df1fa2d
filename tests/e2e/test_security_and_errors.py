"""Every RPC of every service is authenticated and tenant-scoped; bad input is refused whole."""

from __future__ import annotations

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from relevans.delivery.v1 import delivery_pb2
from relevans.kit.auth import mint_token
from relevans.kit.grpc_client import bearer
from relevans.profile.v1 import profile_pb2
from relevans.trigger.v1 import trigger_pb2
from tests.helpers import code_of, field_violations
from tests.helpers.system import System


async def test_calls_without_a_valid_token_are_unauthenticated(system: System) -> None:
    forged = bearer(mint_token("not-the-secret", "shop", ["admin"]))
    for metadata in (None, forged, (("authorization", "Basic abc"),)):
        calls = [
            system.profiles.GetProfile(profile_pb2.GetProfileRequest(profile_id="p"), metadata=metadata),
            system.triggers.ListTriggers(trigger_pb2.ListTriggersRequest(), metadata=metadata),
            system.delivery.ListMessages(delivery_pb2.ListMessagesRequest(), metadata=metadata),
        ]
        for call in calls:
            assert await code_of(call) == grpc.StatusCode.UNAUTHENTICATED


async def test_missing_scope_is_permission_denied(system: System) -> None:
    read_only = system.token("shop", "read")
    event = profile_pb2.Event(type="page_view", anonymous_id="a1")
    assert (
        await code_of(system.profiles.Track(profile_pb2.TrackRequest(event=event), metadata=read_only))
        == grpc.StatusCode.PERMISSION_DENIED
    )
    assert (
        await code_of(system.triggers.CreateTrigger(trigger_pb2.CreateTriggerRequest(), metadata=read_only))
        == grpc.StatusCode.PERMISSION_DENIED
    )


async def test_a_tenant_cannot_read_another_tenants_profile(system: System) -> None:
    profile_id = await system.customer("tenant-a", "a@example.com", first_name="Ann")
    own = await system.profiles.GetProfile(
        profile_pb2.GetProfileRequest(profile_id=profile_id), metadata=system.token("tenant-a", "read")
    )
    assert own.profile.first_name == "Ann"
    assert (
        await code_of(
            system.profiles.GetProfile(
                profile_pb2.GetProfileRequest(profile_id=profile_id),
                metadata=system.token("tenant-b", "read"),
            )
        )
        == grpc.StatusCode.NOT_FOUND
    )
    batch = await system.profiles.BatchGetProfiles(
        profile_pb2.BatchGetProfilesRequest(profile_ids=[profile_id]),
        metadata=system.token("tenant-b", "read"),
    )
    assert list(batch.profiles) == []


async def test_invalid_events_name_the_field_and_store_nothing(system: System) -> None:
    md = system.token("shop", "ingest")
    future = profile_pb2.Event(type="page_view", email="ok@example.com")
    future.timestamp.FromDatetime(system.clock.now().replace(year=system.clock.now().year + 1))
    cases = {
        "event.type": profile_pb2.Event(email="ok@example.com"),
        "event.email": profile_pb2.Event(type="page_view", email="not-an-email"),
        "event.timestamp": future,
    }
    for field, event in cases.items():
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await system.profiles.Track(profile_pb2.TrackRequest(event=event), metadata=md)
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert field in field_violations(caught.value), field_violations(caught.value)
    for lookup in (profile_pb2.GetProfileRequest(email="ok@example.com"),):
        assert (
            await code_of(system.profiles.GetProfile(lookup, metadata=system.token("shop", "read")))
            == grpc.StatusCode.NOT_FOUND
        )


async def test_health_is_served_without_a_token(system: System) -> None:
    for service in ("profile", "trigger", "delivery"):
        stub = health_pb2_grpc.HealthStub(system.channels[service])
        reply = await stub.Check(health_pb2.HealthCheckRequest())
        assert reply.status == health_pb2.HealthCheckResponse.SERVING
