"""`relevans up`: the whole system on its embedded default, in one terminal.

Starts a real PostgreSQL and NATS JetStream from pip-installed binaries with
their data under the data folder, migrates, runs the three services as child
processes (`relevans serve <name>`) and an SMTP sink that stores each mail as a
file, prints the addresses and a dev token, and stops everything on Ctrl-C.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import sys
from dataclasses import replace
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from relevans.kit.auth import mint_token
from relevans.kit.db import migrate
from relevans.kit.settings import SERVICES, Settings, env_name
from relevans.local.embedded import EmbeddedNats, EmbeddedPostgres, free_port
from relevans.local.smtp_sink import SmtpSink

DEV_TENANT = "dev"
STATE_FILE = "up.json"


def _port_or_free(preferred: int) -> int:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", preferred))
        except OSError:
            return free_port()
    return preferred


def _port_of(address: str) -> int:
    return int(address.rsplit(":", 1)[1])


def _child_env(settings: Settings) -> dict[str, str]:
    env = dict(os.environ)
    for name in (
        "postgres_url",
        "nats_url",
        "token_secret",
        "profile_listen",
        "trigger_listen",
        "delivery_listen",
        "profile_target",
        "profile_metrics_port",
        "trigger_metrics_port",
        "delivery_metrics_port",
        "smtp_host",
        "smtp_port",
        "event_partitions",
        "log_level",
    ):
        env[env_name(name)] = str(getattr(settings, name))
    env[env_name("log_format")] = "json"
    return env


async def _wait_serving(address: str, process: asyncio.subprocess.Process, timeout: float = 30.0) -> None:
    async with grpc.aio.insecure_channel(address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        deadline = asyncio.get_running_loop().time() + timeout
        while True:
            if process.returncode is not None:
                raise RuntimeError(f"service at {address} exited with code {process.returncode}")
            try:
                reply = await stub.Check(health_pb2.HealthCheckRequest(), timeout=1.0)
                if reply.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.aio.AioRpcError:
                pass
            if asyncio.get_running_loop().time() > deadline:
                raise RuntimeError(f"service at {address} did not become healthy in {timeout}s")
            await asyncio.sleep(0.2)


def _install_stop_signals() -> asyncio.Event:
    """Ctrl-C and SIGTERM set an event instead of raising, so the shutdown in `run_up` always runs."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    return stop


def _point_at_embedded(
    settings: Settings, pg: EmbeddedPostgres, nats_server: EmbeddedNats, sink: SmtpSink
) -> tuple[Settings, dict[str, str]]:
    """The settings the children get, and each service's listen address: the configured ports when free,
    others when not, and the addresses of the embedded servers, which are only known once they run."""
    listen = {s: f"127.0.0.1:{_port_or_free(_port_of(settings.listen(s)))}" for s in SERVICES}
    settings = replace(
        settings,
        postgres_url=pg.url.rsplit("/", 1)[0],
        nats_url=nats_server.url,
        profile_listen=listen["profile"],
        trigger_listen=listen["trigger"],
        delivery_listen=listen["delivery"],
        profile_target=listen["profile"],
        smtp_port=sink.port,
        profile_metrics_port=_port_or_free(settings.profile_metrics_port),
        trigger_metrics_port=_port_or_free(settings.trigger_metrics_port),
        delivery_metrics_port=_port_or_free(settings.delivery_metrics_port),
    )
    return settings, listen


async def _spawn_services(settings: Settings, logs: Path, children: list[asyncio.subprocess.Process]) -> None:
    """Starts `relevans serve <name>` for each service, logging to a file each. Appends to `children` as
    it goes (not a returned list), so a failure half-way still leaves the started ones for shutdown."""
    env = _child_env(settings)
    for service in SERVICES:
        log_file = (logs / f"{service}.log").open("ab")
        children.append(
            await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                "relevans.cli.main",
                "serve",
                service,
                env=env,
                stdout=log_file,
                stderr=log_file,
                start_new_session=True,
            )
        )


def _announce(data_dir: Path, settings: Settings, listen: dict[str, str], sink: SmtpSink, logs: Path) -> None:
    """Writes the state file `relevans demo` reads (addresses, a dev token) and prints the same for people."""
    token = mint_token(settings.token_secret, DEV_TENANT, ["admin"])
    state = {
        "profile": listen["profile"],
        "trigger": listen["trigger"],
        "delivery": listen["delivery"],
        "token": token,
        "tenant": DEV_TENANT,
        "mail_dir": str(sink.mail_dir),
        "postgres": settings.postgres_url,
        "nats": settings.nats_url,
    }
    (data_dir / STATE_FILE).write_text(json.dumps(state, indent=2))
    print(
        "\nrelevans is up\n"
        f"  profile   grpc://{listen['profile']}   metrics :{settings.profile_metrics_port}\n"
        f"  trigger   grpc://{listen['trigger']}   metrics :{settings.trigger_metrics_port}\n"
        f"  delivery  grpc://{listen['delivery']}   metrics :{settings.delivery_metrics_port}\n"
        f"  postgres  {settings.postgres_url}\n"
        f"  nats      {settings.nats_url}\n"
        f"  smtp sink 127.0.0.1:{sink.port} -> {sink.mail_dir}\n"
        f"  logs      {logs}\n"
        f"  dev token (tenant {DEV_TENANT!r}, admin):\n    {token}\n\n"
        "Try `relevans demo` in another terminal. Ctrl-C stops everything.",
        flush=True,
    )


async def _until_stopped(stop: asyncio.Event, children: list[asyncio.subprocess.Process]) -> int:
    """Waits for Ctrl-C (exit code 0) or for any service to exit on its own (1: the system is not whole)."""
    stopper = asyncio.create_task(stop.wait())
    exits = [asyncio.create_task(c.wait()) for c in children]
    done, _ = await asyncio.wait([stopper, *exits], return_when=asyncio.FIRST_COMPLETED)
    if stopper not in done:
        print("a service exited unexpectedly; see the logs. Stopping.", file=sys.stderr)
        return 1
    return 0


async def _stop_children(children: list[asyncio.subprocess.Process], grace: float) -> None:
    """SIGTERM to every service first, so they drain in parallel; then a kill for any still running after
    its grace period."""
    for child in children:
        if child.returncode is None:
            child.send_signal(signal.SIGTERM)
    for child in children:
        try:
            await asyncio.wait_for(child.wait(), timeout=grace)
        except TimeoutError:
            child.kill()


async def run_up(settings: Settings, data_dir_arg: str | None) -> int:
    data_dir = Path(data_dir_arg or settings.data_dir).resolve()
    data_dir.mkdir(parents=True, exist_ok=True)
    stop = _install_stop_signals()

    pg = EmbeddedPostgres(data_dir / "postgres", port=_port_or_free(_port_of(settings.postgres_url)))
    nats_server = EmbeddedNats(data_dir / "nats", port=_port_or_free(_port_of(settings.nats_url)))
    sink = SmtpSink(data_dir / "mail", port=_port_or_free(settings.smtp_port))
    children: list[asyncio.subprocess.Process] = []
    try:
        print("starting PostgreSQL and NATS …", flush=True)
        await pg.start()
        await nats_server.start()
        await sink.start()
        settings, listen = _point_at_embedded(settings, pg, nats_server, sink)
        for service in SERVICES:
            await migrate(service, settings.database_url(service))
        logs = data_dir / "logs"
        logs.mkdir(exist_ok=True)
        await _spawn_services(settings, logs, children)
        for service, child in zip(SERVICES, children, strict=True):
            await _wait_serving(listen[service], child)
        _announce(data_dir, settings, listen, sink, logs)
        return await _until_stopped(stop, children)
    finally:
        print("\nstopping …", flush=True)
        await _stop_children(children, settings.shutdown_grace + 5)
        (data_dir / STATE_FILE).unlink(missing_ok=True)
        await sink.stop()
        await nats_server.stop()
        await pg.stop()
        print("stopped; data kept in", data_dir, flush=True)
