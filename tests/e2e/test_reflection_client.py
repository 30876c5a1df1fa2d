"""The services through a client that is not the project's generated code (issue 16, finding 9):
everything it knows of the contracts comes from reflection v1, as a client in another language
(grpcurl, @grpc/grpc-js) would learn it. No relevans *_pb2 module is imported here; errors are
decoded with googleapis' google.rpc messages, as the README tells other clients to."""

from __future__ import annotations

from typing import Any

import grpc
from google.protobuf import descriptor_pb2, descriptor_pool, json_format, message_factory
from google.rpc import error_details_pb2, status_pb2
from grpc_reflection.v1alpha import reflection_pb2 as v1alpha

from tests.helpers.system import System

V1 = "grpc.reflection.v1"


def _reflection_v1() -> tuple[type[Any], type[Any]]:
    """grpc.reflection.v1's request and response, built from reflection.proto's descriptors (v1 is
    v1alpha's protocol under another package; grpcio-reflection ships only v1alpha's)."""
    proto = descriptor_pb2.FileDescriptorProto()
    v1alpha.DESCRIPTOR.CopyToProto(proto)
    proto.name, proto.package = "grpc/reflection/v1/reflection.proto", V1
    proto.ClearField("options")
    for message in proto.message_type:
        for f in message.field:
            if f.HasField("type_name"):
                f.type_name = f.type_name.replace(".grpc.reflection.v1alpha.", f".{V1}.")
    for method in proto.service[0].method:
        method.input_type = method.input_type.replace(".grpc.reflection.v1alpha.", f".{V1}.")
        method.output_type = method.output_type.replace(".grpc.reflection.v1alpha.", f".{V1}.")
    pool = descriptor_pool.DescriptorPool()
    pool.Add(proto)
    request = message_factory.GetMessageClass(pool.FindMessageTypeByName(f"{V1}.ServerReflectionRequest"))
    response = message_factory.GetMessageClass(pool.FindMessageTypeByName(f"{V1}.ServerReflectionResponse"))
    return request, response


class ReflectedClient:
    """Generic calls built only from what a server's reflection v1 answers."""

    def __init__(self, channel: grpc.aio.Channel) -> None:
        self.channel = channel
        self.pool = descriptor_pool.DescriptorPool()

    async def _ask(self, **request: str) -> list[Any]:
        request_type, response_type = _reflection_v1()
        call = self.channel.stream_stream(
            f"/{V1}.ServerReflection/ServerReflectionInfo",
            request_serializer=request_type.SerializeToString,
            response_deserializer=response_type.FromString,
        )([request_type(**request)])
        return [reply async for reply in call]

    async def services(self) -> list[str]:
        (reply,) = await self._ask(list_services="")
        return [s.name for s in reply.list_services_response.service]

    async def load(self, service: str) -> None:
        """Add the file defining `service`, and those it imports, to the client's pool."""
        (reply,) = await self._ask(file_containing_symbol=service)
        files = [
            descriptor_pb2.FileDescriptorProto.FromString(b)
            for b in reply.file_descriptor_response.file_descriptor_proto
        ]
        by_name = {f.name: f for f in files}
        added: set[str] = set()

        def add(name: str) -> None:
            if name in added:
                return
            added.add(name)
            for dependency in by_name[name].dependency:
                add(dependency)
            try:
                self.pool.FindFileByName(name)
            except KeyError:
                self.pool.Add(by_name[name])

        for f in files:
            add(f.name)

    async def call(
        self, service: str, method: str, request: dict[str, Any], token: str | None
    ) -> dict[str, Any]:
        found = self.pool.FindServiceByName(service).FindMethodByName(method)
        request_type = message_factory.GetMessageClass(found.input_type)
        response_type = message_factory.GetMessageClass(found.output_type)
        reply = await self.channel.unary_unary(
            f"/{service}/{method}",
            request_serializer=request_type.SerializeToString,
            response_deserializer=response_type.FromString,
        )(
            json_format.ParseDict(request, request_type()),
            metadata=(("authorization", f"Bearer {token}"),) if token else None,
        )
        return json_format.MessageToDict(reply)


def _details(err: grpc.aio.AioRpcError) -> tuple[error_details_pb2.ErrorInfo, dict[str, str]]:
    """The ErrorInfo and the BadRequest field violations of an error's google.rpc.Status."""
    raw = dict(err.trailing_metadata() or ())["grpc-status-details-bin"]
    status = status_pb2.Status.FromString(raw)  # type: ignore[arg-type]
    info, fields = error_details_pb2.ErrorInfo(), {}
    for detail in status.details:
        if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            detail.Unpack(info)
        elif detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
            bad = error_details_pb2.BadRequest()
            detail.Unpack(bad)
            fields.update({v.field: v.description for v in bad.field_violations})
    return info, fields


async def _error(call: Any) -> grpc.aio.AioRpcError:
    try:
        await call
    except grpc.aio.AioRpcError as err:
        return err
    raise AssertionError("the call succeeded")


async def test_a_client_knowing_only_reflection_v1(system: System) -> None:
    profile = "relevans.profile.v1.ProfileService"
    client = ReflectedClient(system.channels["profile"])
    services = await client.services()
    assert {profile, "grpc.reflection.v1.ServerReflection", "grpc.health.v1.Health"} <= set(services)
    await client.load(profile)
    ingest = _raw_token(system, "shop", "ingest")

    reply = await client.call(
        profile, "Track", {"event": {"type": "page_view", "email": "a@example.com"}}, ingest
    )
    assert reply["eventId"] and reply["profileId"]

    err = await _error(
        client.call(profile, "Track", {"event": {"type": "page_view", "email": "nope"}}, ingest)
    )
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    info, fields = _details(err)
    assert "event.email" in fields
    assert (info.reason, info.domain) == ("INVALID_ARGUMENT", "relevans.dev")

    for token, code in (
        (None, grpc.StatusCode.UNAUTHENTICATED),
        (_raw_token(system, "shop", "read"), grpc.StatusCode.PERMISSION_DENIED),
    ):
        err = await _error(
            client.call(profile, "Track", {"event": {"type": "page_view", "anonymousId": "a"}}, token)
        )
        assert err.code() == code
        info, _ = _details(err)
        assert (info.reason, info.domain) == (code.name, "relevans.dev")
    # trigger and delivery answer reflection v1 too
    for service, name in (
        ("trigger", "relevans.trigger.v1.TriggerService"),
        ("delivery", "relevans.delivery.v1.DeliveryService"),
    ):
        other = ReflectedClient(system.channels[service])
        assert name in await other.services()
        await other.load(name)
        assert other.pool.FindServiceByName(name).methods


def _raw_token(system: System, tenant: str, *scopes: str) -> str:
    """The bearer token itself, as a client in another language would be handed it."""
    ((_, header),) = system.token(tenant, *scopes)
    return header.removeprefix("Bearer ")
