"""Fixtures of the integration tests: the profile service running on the test's databases and bus,
its database, and clients of the bus. The other services' tests start theirs with a harness
(tests/helpers/trigger.py, tests/helpers/delivery.py)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import TYPE_CHECKING

import grpc
import nats
import pytest
import pytest_asyncio
from sqlalchemy.ext.asyncio import AsyncEngine

from relevans.kit.bus import Bus
from relevans.kit.clock import ManualClock
from relevans.kit.db import create_engine
from relevans.kit.server import ServiceHost
from relevans.kit.settings import Settings
from relevans.profile.v1 import profile_pb2_grpc
from services.profile.app import build

if TYPE_CHECKING:
    from tests.helpers.profile import Stub


@pytest_asyncio.fixture
async def host(settings: Settings, clock: ManualClock) -> AsyncIterator[ServiceHost]:
    """The profile service, started."""
    host = await build(settings, clock)
    await host.start()
    try:
        yield host
    finally:
        await host.stop()


@pytest_asyncio.fixture
async def channel(host: ServiceHost) -> AsyncIterator[grpc.aio.Channel]:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{host.port}") as ch:
        yield ch


@pytest.fixture
def stub(channel: grpc.aio.Channel) -> Stub:
    return profile_pb2_grpc.ProfileServiceStub(channel)


@pytest_asyncio.fixture
async def db(settings: Settings) -> AsyncIterator[AsyncEngine]:
    """The profile database."""
    engine = create_engine(settings.database_url("profile"), pool_size=4)
    yield engine
    await engine.dispose()


@pytest_asyncio.fixture
async def js(settings: Settings) -> AsyncIterator[nats.js.JetStreamContext]:
    nc = await nats.connect(settings.nats_url)
    try:
        yield nc.jetstream()
    finally:
        await nc.close()


@pytest_asyncio.fixture
async def bus(settings: Settings) -> AsyncIterator[Bus]:
    """The kit's bus client, its streams created; closing it twice is safe."""
    bus = Bus(settings.nats_url, "test")
    await bus.connect()
    await bus.ensure_streams()
    yield bus
    await bus.close()
    await bus.close()
