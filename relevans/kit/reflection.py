"""Server reflection under both names clients ask for: `grpc.reflection.v1` (what grpcurl and
@grpc/grpc-js's reflection try first) and the older `grpc.reflection.v1alpha`.

grpcio-reflection ships only v1alpha. v1 is the same protocol under another package (the same
messages, fields and numbers), so one v1alpha servicer answers both; v1's descriptors are added to
the pool so reflection describes itself under either name. Reflection, like health, is served
without a token: it describes the contracts, which are public (protos/), and no data.
"""

from __future__ import annotations

from collections.abc import Sequence

import grpc
from google.protobuf import descriptor_pb2, descriptor_pool
from grpc_reflection.v1alpha import reflection, reflection_pb2, reflection_pb2_grpc
from grpc_reflection.v1alpha._async import ReflectionServicer

V1_FILE = "grpc/reflection/v1/reflection.proto"
V1_SERVICE_NAME = "grpc.reflection.v1.ServerReflection"
_V1ALPHA = "." + reflection_pb2.DESCRIPTOR.package + "."
_V1 = ".grpc.reflection.v1."


def v1_file_descriptor() -> descriptor_pb2.FileDescriptorProto:
    """grpc/reflection/v1/reflection.proto, made from v1alpha's by renaming its package."""
    proto = descriptor_pb2.FileDescriptorProto()
    reflection_pb2.DESCRIPTOR.CopyToProto(proto)
    proto.name, proto.package = V1_FILE, _V1.strip(".")
    proto.ClearField("options")
    for message in proto.message_type:
        for f in message.field:
            if f.HasField("type_name"):
                f.type_name = f.type_name.replace(_V1ALPHA, _V1)
    for service in proto.service:
        for method in service.method:
            method.input_type = method.input_type.replace(_V1ALPHA, _V1)
            method.output_type = method.output_type.replace(_V1ALPHA, _V1)
    return proto


def _add_v1_descriptors(pool: descriptor_pool.DescriptorPool) -> None:
    try:
        pool.FindFileByName(V1_FILE)
    except KeyError:
        pool.AddSerializedFile(v1_file_descriptor().SerializeToString())


def enable_reflection(service_names: Sequence[str], server: grpc.aio.Server) -> None:
    """Serve reflection v1 and v1alpha on `server`, listing `service_names` and themselves."""
    _add_v1_descriptors(descriptor_pool.Default())
    servicer = ReflectionServicer([*service_names, V1_SERVICE_NAME, reflection.SERVICE_NAME])
    v1 = grpc.stream_stream_rpc_method_handler(
        servicer.ServerReflectionInfo,
        request_deserializer=reflection_pb2.ServerReflectionRequest.FromString,
        response_serializer=reflection_pb2.ServerReflectionResponse.SerializeToString,
    )
    server.add_generic_rpc_handlers(
        [grpc.method_handlers_generic_handler(V1_SERVICE_NAME, {"ServerReflectionInfo": v1})]
    )
    reflection_pb2_grpc.add_ServerReflectionServicer_to_server(servicer, server)
