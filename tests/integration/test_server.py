"""The kit's gRPC bootstrap on a real server: auth, errors, health and graceful shutdown."""

from __future__ import annotations

import asyncio
import logging
from datetime import timedelta

import grpc
import pytest
import structlog
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client import REGISTRY
from structlog.testing import LogCapture

from relevans.kit.auth import mint_token
from relevans.kit.clock import ManualClock
from relevans.kit.errors import FieldViolation, InvalidArgument
from relevans.kit.grpc_client import bearer, open_channel
from relevans.kit.logging import configure_logging
from relevans.kit.server import ServiceBinding, ServiceHost, principal
from relevans.profile.v1 import profile_pb2, profile_pb2_grpc
from tests.helpers import eventually, field_violations

SECRET = "kit-secret"
FULL_NAME = "relevans.profile.v1.ProfileService"


class SlowProfiles(profile_pb2_grpc.ProfileServiceServicer):
    """A servicer whose GetProfile waits for the test to release it."""

    def __init__(self) -> None:
        self.entered = asyncio.Event()
        self.release = asyncio.Event()
        self.waiting = 0

    async def GetProfile(self, request, context):  # type: ignore[no-untyped-def]
        if request.email == "bad":
            raise InvalidArgument(FieldViolation("email", "is not an email address"))
        self.entered.set()
        self.waiting += 1
        await self.release.wait()
        return profile_pb2.GetProfileResponse(profile=profile_pb2.Profile(profile_id=principal().tenant_id))


def make_host(
    servicer: SlowProfiles, clock: ManualClock, *, listen: str = "127.0.0.1:0", servers: int = 1
) -> ServiceHost:
    binding = ServiceBinding(
        full_name=FULL_NAME,
        register=profile_pb2_grpc.add_ProfileServiceServicer_to_server,
        servicer=servicer,
        scopes={"GetProfile": "read"},
    )
    return ServiceHost(
        "kit-test", listen=listen, secret=SECRET, clock=clock, bindings=[binding], grace_s=5, servers=servers
    )


async def test_in_flight_calls_finish_and_health_says_not_serving_during_shutdown(clock: ManualClock) -> None:
    servicer = SlowProfiles()
    host = make_host(servicer, clock)
    worker_stopped = asyncio.Event()
    closed: list[str] = []

    async def worker(stop: asyncio.Event) -> None:
        await stop.wait()
        worker_stopped.set()

    async def closer() -> None:
        closed.append("db")

    host.add_worker("w", worker)
    host.add_closer(closer)
    await host.start()
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{host.port}")
    health = health_pb2_grpc.HealthStub(channel)
    watch = health.Watch(health_pb2.HealthCheckRequest(service=FULL_NAME))
    assert (await watch.read()).status == health_pb2.HealthCheckResponse.SERVING

    stub = profile_pb2_grpc.ProfileServiceStub(channel)
    call = asyncio.ensure_future(
        stub.GetProfile(
            profile_pb2.GetProfileRequest(), metadata=bearer(mint_token(SECRET, "acme", ["read"]))
        )
    )
    await asyncio.wait_for(servicer.entered.wait(), 5)
    stopping = asyncio.create_task(host.stop())
    assert (await watch.read()).status == health_pb2.HealthCheckResponse.NOT_SERVING
    assert not stopping.done()
    servicer.release.set()
    reply = await call
    assert reply.profile.profile_id == "acme"
    await stopping
    assert worker_stopped.is_set() and closed == ["db"]
    await host.stop()  # safe twice
    assert closed == ["db"]
    await channel.close()


def listeners_on(port: int) -> int:
    """Sockets listening on a TCP port of this machine (gRPC listens on IPv6 sockets, IPv4 mapped)."""
    rows = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with open(table) as lines:
            rows += [line.split() for line in lines.readlines()[1:]]
    return sum(1 for r in rows if int(r[1].rsplit(":", 1)[1], 16) == port and r[3] == "0A")


async def test_several_servers_share_the_port_and_all_finish_their_calls_on_shutdown(
    clock: ManualClock,
) -> None:
    servicer = SlowProfiles()
    host = make_host(servicer, clock, servers=3)
    await host.start()
    assert listeners_on(host.port) == 3
    token = bearer(mint_token(SECRET, "acme", ["read"]))
    # a connection each (no shared subchannels), so the kernel spreads them over the servers
    channels = [
        grpc.aio.insecure_channel(f"127.0.0.1:{host.port}", options=[("grpc.use_local_subchannel_pool", 1)])
        for _ in range(12)
    ]
    calls = [
        asyncio.ensure_future(
            profile_pb2_grpc.ProfileServiceStub(c).GetProfile(profile_pb2.GetProfileRequest(), metadata=token)
        )
        for c in channels
    ]
    watch = health_pb2_grpc.HealthStub(channels[0]).Watch(health_pb2.HealthCheckRequest())
    assert (await watch.read()).status == health_pb2.HealthCheckResponse.SERVING

    async def all_waiting() -> bool:
        return servicer.waiting == len(calls)

    await eventually(all_waiting)
    stopping = asyncio.create_task(host.stop())
    assert (await watch.read()).status == health_pb2.HealthCheckResponse.NOT_SERVING
    assert not stopping.done()  # the servers wait for their calls
    servicer.release.set()
    assert [r.profile.profile_id for r in await asyncio.gather(*calls)] == ["acme"] * len(calls)
    await stopping
    assert listeners_on(host.port) == 0
    for c in channels:
        await c.close()


@pytest.mark.parametrize("servers", [1, 2])
async def test_a_port_in_use_is_an_error_even_for_servers_that_share_it(
    clock: ManualClock, servers: int
) -> None:
    async with make_host(SlowProfiles(), clock) as first:
        second = make_host(SlowProfiles(), clock, listen=f"127.0.0.1:{first.port}", servers=servers)
        with pytest.raises(RuntimeError, match="cannot listen"):
            await second.start()
        assert listeners_on(first.port) == 1  # nothing of the second was left listening
        async with open_channel(f"127.0.0.1:{first.port}") as channel:
            health = health_pb2_grpc.HealthStub(channel)
            assert (
                await health.Check(health_pb2.HealthCheckRequest())
            ).status == health_pb2.HealthCheckResponse.SERVING


async def test_auth_errors_and_rich_status(clock: ManualClock) -> None:
    servicer = SlowProfiles()
    servicer.release.set()
    async with make_host(servicer, clock) as host:
        channel = open_channel(f"127.0.0.1:{host.port}", deadline_s=2)
        stub = profile_pb2_grpc.ProfileServiceStub(channel)
        with pytest.raises(grpc.aio.AioRpcError) as none:
            await stub.GetProfile(profile_pb2.GetProfileRequest())
        assert none.value.code() == grpc.StatusCode.UNAUTHENTICATED
        with pytest.raises(grpc.aio.AioRpcError) as scope:
            await stub.GetProfile(
                profile_pb2.GetProfileRequest(), metadata=bearer(mint_token(SECRET, "acme", ["ingest"]))
            )
        assert scope.value.code() == grpc.StatusCode.PERMISSION_DENIED
        with pytest.raises(grpc.aio.AioRpcError) as bad:
            await stub.GetProfile(
                profile_pb2.GetProfileRequest(email="bad"),
                metadata=bearer(mint_token(SECRET, "acme", ["read"])),
            )
        assert bad.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert field_violations(bad.value) == {"email": "is not an email address"}
        # A method missing from the scope map is not let through: it needs the admin scope.
        with pytest.raises(grpc.aio.AioRpcError) as unlisted:
            await stub.Track(profile_pb2.TrackRequest())
        assert unlisted.value.code() == grpc.StatusCode.UNAUTHENTICATED
        with pytest.raises(grpc.aio.AioRpcError) as not_admin:
            await stub.Track(
                profile_pb2.TrackRequest(), metadata=bearer(mint_token(SECRET, "acme", ["ingest"]))
            )
        assert not_admin.value.code() == grpc.StatusCode.PERMISSION_DENIED
        await channel.close()


async def test_outgoing_calls_get_the_default_deadline(clock: ManualClock) -> None:
    servicer = SlowProfiles()
    async with make_host(servicer, clock) as host:
        token = mint_token(SECRET, "acme", ["read"])
        channel = open_channel(f"127.0.0.1:{host.port}", deadline_s=0.3, token=lambda: token)
        stub = profile_pb2_grpc.ProfileServiceStub(channel)
        with pytest.raises(grpc.aio.AioRpcError) as slow:
            await stub.GetProfile(profile_pb2.GetProfileRequest())
        assert slow.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        servicer.release.set()
        await eventually(lambda: _ok(stub))
        await channel.close()


async def _ok(stub: profile_pb2_grpc.ProfileServiceStub) -> bool:
    reply = await stub.GetProfile(profile_pb2.GetProfileRequest())
    return reply.profile.profile_id == "acme"


class LoggingProfiles(profile_pb2_grpc.ProfileServiceServicer):
    async def GetProfile(self, request, context):  # type: ignore[no-untyped-def]
        structlog.get_logger("test").info("inside the call")
        return profile_pb2.GetProfileResponse()


async def test_calls_are_logged_with_request_id_and_tenant_and_counted(clock: ManualClock) -> None:
    capture = LogCapture()
    structlog.configure(
        processors=[structlog.contextvars.merge_contextvars, capture],
        wrapper_class=structlog.make_filtering_bound_logger(logging.INFO),
    )
    binding = ServiceBinding(
        full_name=FULL_NAME,
        register=profile_pb2_grpc.add_ProfileServiceServicer_to_server,
        servicer=LoggingProfiles(),
        scopes={"GetProfile": "read"},
    )
    before = REGISTRY.get_sample_value(
        "relevans_rpc_requests_total", {"service": "log-test", "method": "GetProfile", "code": "OK"}
    )
    try:
        host = ServiceHost("log-test", listen="127.0.0.1:0", secret=SECRET, clock=clock, bindings=[binding])
        async with host:
            token = mint_token(SECRET, "acme", ["read"])
            async with grpc.aio.insecure_channel(f"127.0.0.1:{host.port}") as channel:
                stub = profile_pb2_grpc.ProfileServiceStub(channel)
                await stub.GetProfile(
                    profile_pb2.GetProfileRequest(), metadata=(*bearer(token), ("x-request-id", "req-42"))
                )
    finally:
        configure_logging(level="warning", fmt="console")
    [line] = [e for e in capture.entries if e["event"] == "inside the call"]
    assert line["request_id"] == "req-42"
    assert line["tenant"] == "acme"
    assert line["method"] == f"/{FULL_NAME}/GetProfile"
    after = REGISTRY.get_sample_value(
        "relevans_rpc_requests_total", {"service": "log-test", "method": "GetProfile", "code": "OK"}
    )
    assert (after or 0) - (before or 0) == 1


async def test_a_cached_token_is_never_accepted_after_it_expires(clock: ManualClock) -> None:
    servicer = SlowProfiles()
    servicer.release.set()
    host = make_host(servicer, clock)
    async with host:
        channel = grpc.aio.insecure_channel(f"127.0.0.1:{host.port}")
        stub = profile_pb2_grpc.ProfileServiceStub(channel)
        token = mint_token(SECRET, "acme", ["read"], expires_at=clock.now() + timedelta(minutes=1))
        for _ in range(2):  # the second call is answered from the token cache
            reply = await stub.GetProfile(profile_pb2.GetProfileRequest(), metadata=bearer(token))
            assert reply.profile.profile_id == "acme"
        await clock.advance(timedelta(seconds=59))
        await stub.GetProfile(profile_pb2.GetProfileRequest(), metadata=bearer(token))
        await clock.advance(timedelta(seconds=1))
        with pytest.raises(grpc.aio.AioRpcError) as expired:
            await stub.GetProfile(profile_pb2.GetProfileRequest(), metadata=bearer(token))
        assert expired.value.code() == grpc.StatusCode.UNAUTHENTICATED
        # A forged token is rejected on every call and never cached.
        forged = token[:-4] + ("AAAA" if not token.endswith("AAAA") else "BBBB")
        for _ in range(2):
            with pytest.raises(grpc.aio.AioRpcError) as bad:
                await stub.GetProfile(profile_pb2.GetProfileRequest(), metadata=bearer(forged))
            assert bad.value.code() == grpc.StatusCode.UNAUTHENTICATED
        await channel.close()


def test_token_cache_is_bounded_and_evicts_the_oldest(clock: ManualClock) -> None:
    guard = make_host(SlowProfiles(), clock)._guard
    guard.TOKEN_CACHE_SIZE = 3
    tokens = [mint_token(SECRET, f"t{i}", ["read"]) for i in range(5)]
    for token in tokens:
        who = guard._authenticate(f"Bearer {token}")
        assert who is not None
    assert list(guard._tokens) == tokens[2:]
    assert guard._authenticate("Bearer rv1.forged.token") is None
    assert guard._authenticate(f"Bearer {tokens[0][:-2]}xx") is None
    assert list(guard._tokens) == tokens[2:]


async def test_a_killed_host_runs_its_crash_closers_not_its_graceful_ones(clock: ManualClock) -> None:
    host = make_host(SlowProfiles(), clock)
    closed: list[str] = []

    async def drain() -> None:
        closed.append("drained")

    async def abort() -> None:
        closed.append("aborted")

    async def close_db() -> None:
        closed.append("db")

    host.add_closer(close_db)
    host.add_closer(drain, on_kill=abort)
    await host.start()
    await host.kill()
    assert closed == ["aborted", "db"]  # reverse order; a closer without its own runs on a kill too


async def test_a_kill_ends_a_worker_whose_cancellation_was_lost(clock: ManualClock) -> None:
    # Before Python 3.12 `asyncio.wait_for` drops a cancellation that arrives as what it waits for
    # completes (nats-py's fetch waits that way): the worker goes on as if never cancelled.
    host = make_host(SlowProfiles(), clock)
    lost = 0

    async def worker(stop: asyncio.Event) -> None:
        nonlocal lost
        while True:
            try:
                await asyncio.sleep(3600)
            except asyncio.CancelledError:
                if lost:
                    raise
                lost += 1

    host.add_worker("w", worker)
    await host.start()
    await asyncio.wait_for(host.kill(), 10)
    assert lost == 1
