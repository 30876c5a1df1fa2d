"""`relevans serve profile` with RELEVANS_PROFILE_PROCESSES=2: one port, one lifecycle, every
process's events published."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import nats
import pytest
import pytest_asyncio

from relevans.kit.auth import mint_token
from relevans.kit.grpc_client import bearer
from relevans.kit.settings import Settings, env_name
from relevans.local.embedded import free_port
from relevans.profile.v1 import profile_pb2, profile_pb2_grpc
from tests.helpers import eventually, serving

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="SO_REUSEPORT port sharing is Linux's")


def _children(pid: int) -> list[int]:
    text = Path(f"/proc/{pid}/task/{pid}/children").read_text()
    return [int(c) for c in text.split()]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] != "Z"


@pytest_asyncio.fixture
async def served(settings: Settings) -> AsyncIterator[tuple[asyncio.subprocess.Process, str]]:
    target = f"127.0.0.1:{free_port()}"
    env = dict(os.environ)
    env.update(
        {
            env_name("nats_url"): settings.nats_url,
            env_name("token_secret"): settings.token_secret,
            env_name("profile_database_url"): settings.profile_database_url,
            env_name("profile_listen"): target,
            env_name("profile_metrics_port"): "0",
            env_name("profile_processes"): "2",
            env_name("shutdown_grace"): "1",
            env_name("log_level"): "warning",
        }
    )
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "relevans.cli.main", "serve", "profile", env=env
    )
    try:
        await eventually(lambda: serving(target), timeout=30, interval=0.2)
        yield proc, target
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


async def test_two_processes_share_the_port_and_stop_together(
    served: tuple[asyncio.subprocess.Process, str], settings: Settings
) -> None:
    proc, target = served
    workers = await eventually(lambda: _async(_children(proc.pid)), timeout=10)
    assert len(workers) == 1
    md = bearer(mint_token(settings.token_secret, "t1", ["ingest"]))
    # separate connections, so the kernel spreads them over both processes
    options = [("grpc.use_local_subchannel_pool", 1)]
    channels = [grpc.aio.insecure_channel(target, options=options) for _ in range(8)]
    try:
        replies = await asyncio.gather(
            *(
                profile_pb2_grpc.ProfileServiceStub(c).Track(
                    profile_pb2.TrackRequest(
                        event=profile_pb2.Event(type="page_view", customer_id=f"c-{i}", message_id=f"m-{i}")
                    ),
                    metadata=md,
                    timeout=10,
                )
                for i, c in enumerate(channels * 4)
            )
        )
    finally:
        for c in channels:
            await c.close()
    assert len({r.event_id for r in replies}) == 32
    # every process's outbox rows are published
    nc = await nats.connect(settings.nats_url)
    try:
        js = nc.jetstream()
        await eventually(lambda: _stream_has(js, 32), timeout=10)
    finally:
        await nc.close()
    proc.send_signal(signal.SIGTERM)
    assert await asyncio.wait_for(proc.wait(), timeout=20) == 0
    assert not _alive(workers[0])


async def test_a_worker_stops_when_the_first_process_is_killed(
    served: tuple[asyncio.subprocess.Process, str],
) -> None:
    proc, _ = served
    workers = await eventually(lambda: _async(_children(proc.pid)), timeout=10)
    proc.kill()
    await proc.wait()
    await eventually(lambda: _async(not _alive(workers[0])), timeout=15, interval=0.1)


async def _async(value: object) -> object:
    return value


async def _stream_has(js: nats.js.JetStreamContext, n: int) -> bool:
    return (await js.stream_info("RV_EVENTS")).state.messages >= n
