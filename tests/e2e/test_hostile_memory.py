"""Memory stays bounded under hostile clients (issue 16, finding 2): the three services, each its own
`relevans serve` process, take the hostile corpus with and without a token, twenty 3 MB batches of
100,000 events each way, and stay under 200 MB RSS."""

from __future__ import annotations

import asyncio
import os
import sys
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack
from pathlib import Path

import grpc
import pytest
import pytest_asyncio

from relevans.kit.settings import SERVICES, Settings, env_name
from relevans.local.embedded import free_port
from relevans.profile.v1 import profile_pb2, profile_pb2_grpc
from tests.helpers import eventually, serving
from tests.helpers.auth import token
from tests.helpers.hostile import PROFILE, batch_track, corpus, raw_call

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="reads RSS from /proc")

MAX_RSS_MB = 200
BATCH_CALLS = 20
CORPUS_PASSES = 3


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError(f"no VmRSS for {pid}")


@pytest_asyncio.fixture
async def served(settings: Settings) -> AsyncIterator[dict[str, tuple[int, str]]]:
    """Each service as its own `relevans serve` process: {service: (pid, target)}."""
    targets = {service: f"127.0.0.1:{free_port()}" for service in SERVICES}
    env = dict(os.environ)
    env.update(
        {
            env_name("nats_url"): settings.nats_url,
            env_name("token_secret"): settings.token_secret,
            env_name("profile_target"): targets["profile"],
            # not the fixed default port, which tests in other workers (and other stacks) use too
            env_name("delivery_http_listen"): "127.0.0.1:0",
            env_name("log_level"): "error",
        }
    )
    for service in SERVICES:
        env[env_name(f"{service}_database_url")] = getattr(settings, f"{service}_database_url")
        env[env_name(f"{service}_listen")] = targets[service]
        env[env_name(f"{service}_metrics_port")] = "0"
    procs: list[asyncio.subprocess.Process] = []
    try:
        for service in SERVICES:
            procs.append(
                await asyncio.create_subprocess_exec(
                    sys.executable, "-m", "relevans.cli.main", "serve", service, env=env
                )
            )
        for target in targets.values():
            await eventually(lambda t=target: serving(t), timeout=60, interval=0.2)  # type: ignore[misc]
        yield {s: (p.pid, targets[s]) for s, p in zip(SERVICES, procs, strict=True)}
    finally:
        for proc in procs:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()


async def test_memory_stays_bounded_under_the_hostile_corpus(served: dict[str, tuple[int, str]]) -> None:
    sizes: dict[str, list[float]] = {service: [] for service in served}

    def measure() -> None:
        for service, (pid, _) in served.items():
            sizes[service].append(round(rss_mb(pid), 1))

    async with AsyncExitStack() as stack:
        channels = {
            s: await stack.enter_async_context(grpc.aio.insecure_channel(target))
            for s, (_, target) in served.items()
        }
        big = batch_track(100_000)
        assert len(big) > 3_000_000
        hostile = corpus()
        for metadata in (None, token("shop")):
            for _ in range(BATCH_CALLS):
                answer = await raw_call(channels["profile"], f"/{PROFILE}/BatchTrack", big, metadata)
                assert answer.code in (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.INVALID_ARGUMENT), (
                    answer
                )
            measure()
            for _ in range(CORPUS_PASSES):
                for service, method, payload in hostile:
                    answer = await raw_call(channels[service], method, payload, metadata)
                    assert answer.code not in (grpc.StatusCode.UNKNOWN, grpc.StatusCode.INTERNAL), (
                        method,
                        answer,
                    )
            measure()
        # still serving
        event = profile_pb2.Event(type="page_view", anonymous_id="a1")
        await profile_pb2_grpc.ProfileServiceStub(channels["profile"]).Track(
            profile_pb2.TrackRequest(event=event), metadata=token("shop", "ingest")
        )
    print(f"RSS after each part of the hostile corpus (MB): {sizes}")
    assert all(size < MAX_RSS_MB for taken in sizes.values() for size in taken), sizes
