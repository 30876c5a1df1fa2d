"""The benchmarks' HTTP/2 load client (bench/h2grpc.py) against a real grpc.aio server: it must get
the answers and status codes a grpc client gets, or the benchmarks' numbers mean nothing."""

from __future__ import annotations

import asyncio
import importlib.util
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from types import ModuleType
from typing import Any

import grpc
import pytest
import pytest_asyncio
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

CHECK = "/grpc.health.v1.Health/Check"
LONG_NAME = "s" * 2_000  # 2 kB a request: 100 calls in flight exceed HTTP/2's first 64 kB window


def _load_client() -> ModuleType:
    path = Path(__file__).parents[2] / "bench" / "h2grpc.py"
    spec = importlib.util.spec_from_file_location("h2grpc", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["h2grpc"] = module
    spec.loader.exec_module(module)
    return module


h2grpc = _load_client()


@pytest_asyncio.fixture
async def port() -> AsyncIterator[int]:
    server = grpc.aio.server()
    servicer = health.aio.HealthServicer()
    await servicer.set(LONG_NAME, health_pb2.HealthCheckResponse.SERVING)
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    bound = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    yield bound
    await server.stop(None)


async def open_channel(port: int, path: str = CHECK) -> Any:
    block = h2grpc.request_headers(f"127.0.0.1:{port}", path, [("x-request-id", "load")], timeout_s=5)
    return await h2grpc.Channel.open("127.0.0.1", port, block)


async def test_answers_match_what_a_grpc_client_gets(port: int) -> None:
    channel = await open_channel(port)
    request = health_pb2.HealthCheckRequest(service=LONG_NAME)
    try:
        ours = await channel.call(request.SerializeToString())
    finally:
        channel.close()
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as grpc_channel:
        theirs = await health_pb2_grpc.HealthStub(grpc_channel).Check(request)
    assert health_pb2.HealthCheckResponse.FromString(ours) == theirs
    assert theirs.status == health_pb2.HealthCheckResponse.SERVING


async def test_error_statuses_are_reported_by_name(port: int) -> None:
    channel = await open_channel(port)
    unknown = await open_channel(port, "/grpc.health.v1.Health/NoSuchMethod")
    try:
        with pytest.raises(h2grpc.CallError) as not_found:
            await channel.call(health_pb2.HealthCheckRequest(service="nobody").SerializeToString())
        with pytest.raises(h2grpc.CallError) as unimplemented:
            await unknown.call(b"")
    finally:
        channel.close()
        unknown.close()
    assert not_found.value.code == "NOT_FOUND"
    assert unimplemented.value.code == "UNIMPLEMENTED"


async def test_many_calls_in_flight_pass_the_flow_control_windows(port: int) -> None:
    channel = await open_channel(port)
    request = health_pb2.HealthCheckRequest(service=LONG_NAME).SerializeToString()
    try:
        for _ in range(3):  # 300 calls, 600 kB: the server must keep granting window
            answers = await asyncio.wait_for(asyncio.gather(*(channel.call(request) for _ in range(100))), 10)
            assert {health_pb2.HealthCheckResponse.FromString(a).status for a in answers} == {
                health_pb2.HealthCheckResponse.SERVING
            }
    finally:
        channel.close()


async def test_calls_fail_as_unavailable_when_the_server_goes_away() -> None:
    server = grpc.aio.server()
    health_pb2_grpc.add_HealthServicer_to_server(health.aio.HealthServicer(), server)
    bound = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    channel = await open_channel(bound)
    await server.stop(None)
    with pytest.raises(h2grpc.CallError) as gone:
        await asyncio.wait_for(channel.call(health_pb2.HealthCheckRequest().SerializeToString()), 5)
    assert gone.value.code == "UNAVAILABLE"
