"""What every benchmark starts the same way: embedded PostgreSQL and NATS in a temp folder, the
services' databases migrated, and `relevans serve <service>` in its own process on a free port."""

from __future__ import annotations

import asyncio
import contextlib
import os
import sys
import time
from collections.abc import AsyncIterator, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import asyncpg
import psutil

from relevans.kit.db import migrate
from relevans.kit.settings import Settings, env_name
from relevans.local.embedded import EmbeddedNats, EmbeddedPostgres, free_port


@dataclass(frozen=True)
class Stack:
    folder: Path
    # PostgreSQL server URL (no database) and NATS URL.
    server: str
    nats_url: str

    def database(self, service: str) -> str:
        """A service's database, as a plain PostgreSQL URL (for asyncpg)."""
        return f"{self.server}/relevans_{service}"

    @property
    def profile_db(self) -> str:
        return self.database("profile")

    @property
    def trigger_db(self) -> str:
        return self.database("trigger")


@dataclass(frozen=True)
class Service:
    target: str
    process: asyncio.subprocess.Process


@asynccontextmanager
async def embedded_stack(
    folder: Path, services: Sequence[str] = ("profile",), pg_settings: Mapping[str, str] | None = None
) -> AsyncIterator[Stack]:
    """The stack with the databases of `services` migrated (PostgreSQL started with `pg_settings`)."""
    pg_server = EmbeddedPostgres(folder / "pg", server_settings=pg_settings)
    async with pg_server as pg, EmbeddedNats(folder / "nats") as ns:
        server = pg.url.rsplit("/", 1)[0]
        settings = Settings(postgres_url=server, nats_url=ns.url)
        for service in services:
            await migrate(service, settings.database_url(service))
        yield Stack(folder, server, ns.url)


@asynccontextmanager
async def service_process(stack: Stack, service: str, secret: str) -> AsyncIterator[Service]:
    """`relevans serve <service>` on a free port (RELEVANS_<SERVICE>_PROCESSES etc. from the
    environment apply), stopped with SIGTERM at the end; its database is migrated already."""
    port = free_port()
    env = dict(os.environ)
    env.update(
        {
            env_name("postgres_url"): stack.server,
            env_name("nats_url"): stack.nats_url,
            env_name("token_secret"): secret,
            env_name(f"{service}_listen"): f"127.0.0.1:{port}",
            env_name(f"{service}_metrics_port"): "0",
            env_name("log_level"): os.environ.get("RELEVANS_LOG_LEVEL", "warning"),
        }
    )
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "relevans.cli.main", "serve", service, env=env
    )
    try:
        await wait_port(port, proc, service)
        yield Service(f"127.0.0.1:{port}", proc)
    finally:
        if proc.returncode is None:
            proc.terminate()
        await proc.wait()


def profile_service(stack: Stack, secret: str) -> contextlib.AbstractAsyncContextManager[Service]:
    return service_process(stack, "profile", secret)


def trigger_service(stack: Stack, secret: str) -> contextlib.AbstractAsyncContextManager[Service]:
    """`relevans serve trigger`; the stack must have migrated its database
    (`embedded_stack(folder, ("profile", "trigger"))`)."""
    return service_process(stack, "trigger", secret)


async def wait_port(port: int, proc: asyncio.subprocess.Process, service: str, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.returncode is None:
        try:
            _, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.close()
            return
        except OSError:
            await asyncio.sleep(0.1)
    raise RuntimeError(f"{service} service did not start (exit status {proc.returncode})")


class CpuWatch:
    """CPU seconds used by groups of processes (a group = a root process and its descendants)."""

    def __init__(self, roots: dict[str, list[psutil.Process]]) -> None:
        self.roots = roots
        self.restart()

    def restart(self) -> None:
        """Count from now."""
        self.before = self._sample()
        self.loops_before = self._loop_threads()
        self.started = time.perf_counter()

    def _loop_threads(self) -> dict[int, float]:
        """CPU seconds of the main thread (the event loop) of each service process."""
        out = {}
        for root in self.roots.get("service", []):
            try:
                for p in [root, *root.children(recursive=True)]:
                    for t in p.threads():
                        if t.id == p.pid:
                            out[p.pid] = t.user_time + t.system_time
            except psutil.NoSuchProcess:
                continue
        return out

    def loop_busy(self) -> float:
        """How busy the busiest service process's event loop thread was since the start (1.0 = all
        the time): a service whose loop is near 1.0 is at its limit, whatever the machine has left."""
        wall = time.perf_counter() - self.started
        after = self._loop_threads()
        return max(((after[pid] - self.loops_before.get(pid, 0.0)) / wall for pid in after), default=0.0)

    def _sample(self) -> dict[str, float]:
        busy = psutil.cpu_times()
        out: dict[str, float] = {"machine": busy.user + busy.system + busy.nice + busy.irq + busy.softirq}
        for name, procs in self.roots.items():
            total = 0.0
            for root in procs:
                try:
                    for p in [root, *root.children(recursive=True)]:
                        t = p.cpu_times()
                        total += t.user + t.system
                except psutil.NoSuchProcess:
                    continue
            out[name] = total
        return out

    def used(self) -> dict[str, float]:
        """CPU seconds per group since the start, and `machine`: all CPU the box used meanwhile."""
        after = self._sample()
        return {k: after[k] - self.before[k] for k in after}


def largest_rss_mb(pid: int) -> float:
    """The largest resident set among a service's processes (it and the workers it started), in MB:
    the memory target is per process."""
    root = psutil.Process(pid)
    return max(p.memory_info().rss for p in [root, *root.children(recursive=True)]) / 1e6


def process_roots(match: str) -> list[psutil.Process]:
    """Root processes whose command line mentions `match` (the embedded servers' data folders)."""
    found = []
    for p in psutil.process_iter(["cmdline", "ppid"]):
        cmd = " ".join(p.info["cmdline"] or ())
        if match in cmd:
            found.append(p)
    pids = {p.pid for p in found}
    return [p for p in found if p.info["ppid"] not in pids]


def stack_processes(stack: Stack, service: Service) -> dict[str, list[psutil.Process]]:
    """The process groups a benchmark's CPU is counted for: the service (with its worker
    processes), PostgreSQL and NATS."""
    return {
        "service": [psutil.Process(service.process.pid)],
        "postgres": process_roots(str(stack.folder / "pg")),
        "nats": process_roots(str(stack.folder / "nats")),
    }


class PeakRss:
    """The largest resident set a service's processes reach while it runs, sampled every `every`
    seconds in the background (`largest_rss_mb` at the end would miss a peak that has passed)."""

    def __init__(self, every: float = 0.2) -> None:
        self.every = every
        self.peak_mb = 0.0
        self._tasks: list[asyncio.Task[None]] = []

    def watch(self, pid: int) -> None:
        """Sample the service whose first process is `pid` until it exits or `stop`."""
        self._tasks.append(asyncio.create_task(self._sample(pid)))

    async def _sample(self, pid: int) -> None:
        while True:
            try:
                self.peak_mb = max(self.peak_mb, largest_rss_mb(pid))
            except psutil.NoSuchProcess:  # the service, or one of its workers, exited meanwhile
                if not psutil.pid_exists(pid):
                    return
            await asyncio.sleep(self.every)

    async def stop(self) -> None:
        for t in self._tasks:
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks.clear()


# PostgreSQL settings that make it count each statement's cost (`--pg-statements`).
PG_STATEMENTS = {"shared_preload_libraries": "pg_stat_statements", "pg_stat_statements.track_planning": "on"}
_STATEMENTS = """
SELECT queryid, calls, total_exec_time, total_plan_time, rows,
       left(regexp_replace(query, '\\s+', ' ', 'g'), 110) AS query
FROM pg_stat_statements JOIN pg_database d ON d.oid = dbid WHERE d.datname = $1
"""


async def reset_statements(db_url: str) -> None:
    """Count statements (and the server's WAL) from now, in a server started with `PG_STATEMENTS`."""
    conn = await asyncpg.connect(db_url)
    try:
        await conn.execute("CREATE EXTENSION IF NOT EXISTS pg_stat_statements")
        await conn.execute("SELECT pg_stat_statements_reset()")
        await conn.execute("SELECT pg_stat_reset_shared('wal')")
    finally:
        await conn.close()


async def statement_costs(db_url: str, database: str) -> list[asyncpg.Record]:
    """`database`'s statements as pg_stat_statements counts them since the reset: queryid, calls,
    total_exec_time and total_plan_time (ms), rows and the query's start, costliest first."""
    conn = await asyncpg.connect(db_url)
    try:
        rows = await conn.fetch(_STATEMENTS, database)
    finally:
        await conn.close()
    return sorted(rows, key=lambda r: -(r["total_exec_time"] + r["total_plan_time"]))
