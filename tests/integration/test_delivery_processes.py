"""`relevans serve delivery` with RELEVANS_DELIVERY_PROCESSES=2: both processes listen on the one
gRPC port and the one HTTP port, answer, and stop together."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from pathlib import Path

import aiohttp
import grpc
import pytest

from relevans.delivery.v1 import delivery_pb2, delivery_pb2_grpc
from relevans.kit.auth import mint_token
from relevans.kit.grpc_client import bearer
from relevans.kit.settings import Settings, env_name
from relevans.local.embedded import free_port
from tests.helpers import eventually, serving

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="SO_REUSEPORT port sharing is Linux's")


def _listening_ports(pid: int) -> set[int]:
    """The TCP ports process `pid` listens on (its sockets' inodes in /proc/net/tcp{,6})."""
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            link = os.readlink(fd)
        except OSError:
            continue
        if link.startswith("socket:["):
            inodes.add(int(link[8:-1]))
    ports = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            if fields[3] == "0A" and int(fields[9]) in inodes:  # 0A: LISTEN
                ports.add(int(fields[1].rsplit(":", 1)[1], 16))
    return ports


async def test_two_delivery_processes_share_both_ports_and_stop_together(settings: Settings) -> None:
    grpc_port, http_port = free_port(), free_port()
    target = f"127.0.0.1:{grpc_port}"
    env = dict(os.environ)
    env.update(
        {
            env_name("nats_url"): settings.nats_url,
            env_name("token_secret"): settings.token_secret,
            env_name("delivery_database_url"): settings.delivery_database_url,
            env_name("profile_target"): "127.0.0.1:1",  # not asked here
            env_name("delivery_listen"): target,
            env_name("delivery_http_listen"): f"127.0.0.1:{http_port}",
            env_name("delivery_metrics_port"): "0",
            env_name("delivery_processes"): "2",
            env_name("shutdown_grace"): "1",
            env_name("log_level"): "warning",
        }
    )
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "relevans.cli.main", "serve", "delivery", env=env
    )
    try:
        await eventually(lambda: serving(target), timeout=30, interval=0.2)
        children = Path(f"/proc/{proc.pid}/task/{proc.pid}/children").read_text().split()
        assert len(children) == 1
        worker = int(children[0])
        for pid in (proc.pid, worker):
            await eventually(
                lambda pid=pid: _ready({grpc_port, http_port} <= _listening_ports(pid)),
                timeout=30,
                interval=0.2,
            )

        md = bearer(mint_token(settings.token_secret, "t1", ["read"]))
        # separate connections, so the kernel spreads them over both processes
        channels = [
            grpc.aio.insecure_channel(target, options=[("grpc.use_local_subchannel_pool", 1)])
            for _ in range(8)
        ]
        try:
            answers = await asyncio.gather(
                *(
                    delivery_pb2_grpc.DeliveryServiceStub(c).GetBanner(
                        delivery_pb2.GetBannerRequest(profile_id=f"p-{i}", placement="cart"),
                        metadata=md,
                        timeout=10,
                    )
                    for i, c in enumerate(channels)
                )
            )
        finally:
            for c in channels:
                await c.close()
        assert all(not a.HasField("banner") for a in answers)
        for _ in range(8):  # a connection each
            async with (
                aiohttp.ClientSession() as http,
                http.get(f"http://127.0.0.1:{http_port}/u/forged") as page,
            ):
                assert page.status == 400  # a forged token's page, from whichever process took it

        assert proc.returncode is None
        proc.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(proc.wait(), timeout=20) == 0
        assert (
            not Path(f"/proc/{worker}").exists() or "Z" in Path(f"/proc/{worker}/stat").read_text().split()[2]
        )
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


async def _ready(value: bool) -> bool:
    return value
