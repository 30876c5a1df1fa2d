"""What every benchmark starts the same way: embedded PostgreSQL and NATS in a temp folder, the
profile database migrated, and `relevans serve profile` in its own process on a free port."""

from __future__ import annotations

import asyncio
import os
import sys
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

from relevans.kit.db import migrate
from relevans.kit.embedded import EmbeddedNats, EmbeddedPostgres, free_port
from relevans.kit.settings import Settings, env_name


@dataclass(frozen=True)
class Stack:
    folder: Path
    # PostgreSQL server URL (no database) and NATS URL.
    server: str
    nats_url: str

    @property
    def profile_db(self) -> str:
        return f"{self.server}/relevans_profile"


@dataclass(frozen=True)
class Service:
    target: str
    process: asyncio.subprocess.Process


@asynccontextmanager
async def embedded_stack(folder: Path) -> AsyncIterator[Stack]:
    async with EmbeddedPostgres(folder / "pg") as pg, EmbeddedNats(folder / "nats") as ns:
        server = pg.url.rsplit("/", 1)[0]
        settings = Settings(postgres_url=server, nats_url=ns.url)
        await migrate("profile", settings.database_url("profile"))
        yield Stack(folder, server, ns.url)


@asynccontextmanager
async def profile_service(stack: Stack, secret: str) -> AsyncIterator[Service]:
    """The profile service as `relevans serve profile` (RELEVANS_PROFILE_PROCESSES etc. from the
    environment apply), stopped with SIGTERM at the end."""
    port = free_port()
    env = dict(os.environ)
    env.update(
        {
            env_name("postgres_url"): stack.server,
            env_name("nats_url"): stack.nats_url,
            env_name("token_secret"): secret,
            env_name("profile_listen"): f"127.0.0.1:{port}",
            env_name("profile_metrics_port"): "0",
            env_name("log_level"): os.environ.get("RELEVANS_LOG_LEVEL", "warning"),
        }
    )
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "relevans.cli.main", "serve", "profile", env=env
    )
    try:
        await wait_port(port)
        yield Service(f"127.0.0.1:{port}", proc)
    finally:
        if proc.returncode is None:
            proc.terminate()
        await proc.wait()


async def wait_port(port: int, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            _, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.close()
            return
        except OSError:
            await asyncio.sleep(0.1)
    raise RuntimeError("profile service did not start")
