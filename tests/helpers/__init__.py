"""What tests of every service share. Start a new test here:

- this module: waiting for an asynchronous effect (`eventually`, `stays`) and reading gRPC errors;
- `auth`: bearer tokens the services under test accept;
- `plans`: what a statement reads (EXPLAIN ANALYZE), for tests that work follows rows, not tables;
- `cart`: the abandoned cart's trigger and template, the example every service's tests use;
- `profile`, `trigger`, `delivery`: one service running for a test, with calls and bus helpers;
- `system`: all three services, an SMTP sink and a manual clock, as the `system` fixture gives them;
- `fuzz`: hypothesis strategies for any RPC's request bytes and credentials, from its descriptors;
- `hostile`: the hostile-client corpus and a raw-bytes call that reads the whole answer;
- `local_stack`: the environment for a `relevans up` a test starts as a user would;
- this module's `serving`: whether a gRPC server answers its health check.

The fixtures (databases, bus, clock, the running services) are in the conftest.py files.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import grpc
import pytest
from google.rpc import error_details_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_status import rpc_status

T = TypeVar("T")


async def eventually(
    probe: Callable[[], Awaitable[T]], *, timeout: float = 10.0, interval: float = 0.02
) -> T:
    """Poll `probe` until it returns something truthy; fail after `timeout` real seconds.

    For waiting on asynchronous effects (a message crossing the bus), never for
    passing domain time: tests move the ManualClock for that.
    """
    deadline = time.monotonic() + timeout
    while True:
        result = await probe()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout}s (last result: {result!r})")
        await asyncio.sleep(interval)


async def stays(probe: Callable[[], Awaitable[T]], *, duration: float = 0.5, interval: float = 0.02) -> None:
    """Assert `probe` stays falsy for `duration` real seconds (an effect that must not happen)."""
    deadline = time.monotonic() + duration
    while time.monotonic() < deadline:
        result = await probe()
        if result:
            raise AssertionError(f"unexpected effect: {result!r}")
        await asyncio.sleep(interval)


def field_violations(err: grpc.aio.AioRpcError) -> dict[str, str]:
    """The google.rpc.BadRequest field violations of an error, as {field: description}."""
    status = rpc_status.from_call(err)  # type: ignore[arg-type]
    assert status is not None, "error carries no google.rpc.Status"
    out: dict[str, str] = {}
    for detail in status.details:
        if detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
            bad = error_details_pb2.BadRequest()
            detail.Unpack(bad)
            out.update({v.field: v.description for v in bad.field_violations})
    return out


async def rpc_error(call: Any) -> grpc.aio.AioRpcError:
    """The error a gRPC call fails with (the test fails if it succeeds). `call` is Any: the stubs type
    a call by its response, though grpc.aio returns an awaitable."""
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await call
    return caught.value


async def code_of(call: Any) -> grpc.StatusCode:
    """The status code a gRPC call fails with (the test fails if it succeeds)."""
    return (await rpc_error(call)).code()


async def serving(target: str) -> bool:
    """Whether the gRPC server at `target` answers its health check SERVING (False while it starts)."""
    async with grpc.aio.insecure_channel(target) as channel:
        try:
            reply = await health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(), timeout=1
            )
        except grpc.aio.AioRpcError:
            return False
    return reply.status == health_pb2.HealthCheckResponse.SERVING
