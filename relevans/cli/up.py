"""`relevans up`: the whole system on its embedded default, in one terminal.

Starts a real PostgreSQL and NATS JetStream from pip-installed binaries with
their data under the data folder, migrates, runs the three services as child
processes (`relevans serve <name>`, restarted when one dies), an SMTP sink that
stores each mail as a file, an SMS sink (an HTTP provider) that stores each text message as
one and a webhook receiver that checks and stores each webhook (allowed to delivery by
`RELEVANS_WEBHOOK_ALLOW_ADDRESSES`, it alone on loopback), records the addresses and a dev
token in the data folder (relevans/cli/stack.py) and prints them, and stops everything on
Ctrl-C.
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import sys
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from relevans.cli.stack import DEV_TENANT, STATE_FILE, ensure_secret, write_state
from relevans.cli.supervisor import Spawn, Supervisor
from relevans.kit.auth import PUBLISHED_SECRETS, mint_token
from relevans.kit.db import migrate
from relevans.kit.settings import SERVICES, Settings, env_name
from relevans.local.embedded import EmbeddedNats, EmbeddedPostgres, free_port
from relevans.local.sms_sink import SmsSink
from relevans.local.smtp_sink import SmtpSink
from relevans.local.webhook_receiver import WebhookReceiver


def port_is_free(port: int, host: str = "127.0.0.1") -> bool:
    """Whether a server could listen on `port` now. Binds as servers do (SO_REUSEADDR), so a port
    whose last connections linger in TIME_WAIT after a restart counts as free."""
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


@dataclass
class PortChooser:
    """The configured ports where free; another, and a note saying so, where one is really taken."""

    notes: list[str] = field(default_factory=list)

    def choose(self, preferred: int, what: str) -> int:
        if preferred == 0 or port_is_free(preferred):
            return preferred
        chosen = free_port()
        self.notes.append(f"port {preferred} ({what}) is taken; {what} uses {chosen} instead")
        print(self.notes[-1], flush=True)
        return chosen


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
        "delivery_http_listen",
        "delivery_public_url",
        "profile_target",
        "profile_metrics_port",
        "trigger_metrics_port",
        "delivery_metrics_port",
        "smtp_host",
        "smtp_port",
        "webhook_allow_addresses",
        "sms_provider_url",
        "event_partitions",
        "log_level",
    ):
        env[env_name(name)] = str(getattr(settings, name))
    env[env_name("log_format")] = "json"
    return env


async def wait_serving(address: str, process: asyncio.subprocess.Process, timeout: float = 30.0) -> None:
    """Returns once the service at `address` answers its health check SERVING; RuntimeError when the
    process exits first or `timeout` passes."""
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
    settings: Settings, pg: EmbeddedPostgres, nats_server: EmbeddedNats, sink: SmtpSink, ports: PortChooser
) -> tuple[Settings, dict[str, str]]:
    """The settings the children get, and each service's listen address: the configured ports when free,
    others when not, and the addresses of the embedded servers, which are only known once they run."""
    listen = {s: f"127.0.0.1:{ports.choose(_port_of(settings.listen(s)), f'{s} gRPC')}" for s in SERVICES}
    metrics: dict[str, Any] = {
        f"{s}_metrics_port": ports.choose(settings.metrics_port(s), f"{s} metrics") for s in SERVICES
    }
    http_port = ports.choose(_port_of(settings.delivery_http_listen), "delivery HTTP")
    settings = replace(
        settings,
        delivery_http_listen=f"127.0.0.1:{http_port}",
        postgres_url=pg.url.rsplit("/", 1)[0],
        nats_url=nats_server.url,
        profile_listen=listen["profile"],
        trigger_listen=listen["trigger"],
        delivery_listen=listen["delivery"],
        profile_target=listen["profile"],
        smtp_port=sink.port,
        **metrics,
    )
    return settings, listen


def _allow_receiver(settings: Settings, receiver: WebhookReceiver) -> Settings:
    """The settings with the demo webhook receiver (plain http on loopback) allowed, and only it."""
    receiver_address = f"{receiver.host}:{receiver.port}"
    allowed = [a for a in settings.webhook_allow_addresses.split(",") if a.strip()]
    return replace(settings, webhook_allow_addresses=",".join([*allowed, receiver_address]))


def _spawner(settings: Settings, logs: Path) -> Spawn:
    """Starts `relevans serve <name>`, appending its output to logs/<name>.log."""
    env = _child_env(settings)

    async def spawn(service: str) -> asyncio.subprocess.Process:
        with (logs / f"{service}.log").open("ab") as log_file:
            return await asyncio.create_subprocess_exec(
                *(sys.executable, "-m", "relevans.cli.main", "serve", service),
                env=env,
                stdout=log_file,
                stderr=log_file,
                start_new_session=True,
            )

    return spawn


def _announce(
    data_dir: Path,
    settings: Settings,
    listen: dict[str, str],
    sink: SmtpSink,
    receiver: WebhookReceiver,
    sms_sink: SmsSink,
    logs: Path,
    ports: PortChooser,
) -> None:
    """Writes the state file the other commands read (addresses, a dev token) and prints the same."""
    token = mint_token(settings.token_secret, DEV_TENANT, ["admin"])
    links = settings.delivery_public_url or f"http://{settings.delivery_http_listen}"
    state = {
        **listen,
        "token": token,
        "tenant": DEV_TENANT,
        "mail_dir": str(sink.mail_dir),
        "postgres": settings.postgres_url,
        "nats": settings.nats_url,
        "smtp_port": sink.port,
        "webhook_receiver": f"http://{receiver.host}:{receiver.port}/hooks/",
        "webhook_dir": str(receiver.root),
        "sms_dir": str(sms_sink.sms_dir),
        "sms_port": sms_sink.port,
        "delivery_http": links,
        **{f"{s}_metrics_port": settings.metrics_port(s) for s in SERVICES},
        "moved": ports.notes,
        "pid": os.getpid(),
    }
    write_state(data_dir, state)
    print(
        "\nrelevans is up\n"
        f"  profile   grpc://{listen['profile']}   metrics :{settings.profile_metrics_port}\n"
        f"  trigger   grpc://{listen['trigger']}   metrics :{settings.trigger_metrics_port}\n"
        f"  delivery  grpc://{listen['delivery']}   metrics :{settings.delivery_metrics_port}\n"
        f"            {links}   (unsubscribe, open and click links)\n"
        f"  postgres  {settings.postgres_url}\n"
        f"  nats      {settings.nats_url}\n"
        f"  smtp sink 127.0.0.1:{sink.port} -> {sink.mail_dir}\n"
        f"  webhooks  http://{receiver.host}:{receiver.port}/hooks/<name> -> {receiver.root}\n"
        f"  sms sink  {sms_sink.url} -> {sms_sink.sms_dir}\n"
        f"  logs      {logs}\n"
        f"  recorded  {data_dir / STATE_FILE} (the other commands read it)\n"
        f"  dev token (tenant {DEV_TENANT!r}, admin):\n    {token}\n\n"
        "Try `relevans demo` in another terminal. A service that dies is restarted. Ctrl-C stops everything.",
        flush=True,
    )


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


async def run_up(settings: Settings, data_dir: Path) -> int:
    """Runs the stack until Ctrl-C (exit 0); 2 when the settings' token secret is a published one."""
    data_dir = data_dir.resolve()
    data_dir.mkdir(parents=True, exist_ok=True)
    if env_name("token_secret") not in os.environ:
        settings = replace(settings, token_secret=ensure_secret(data_dir))
    elif settings.token_secret in PUBLISHED_SECRETS:
        print(f"relevans up: {env_name('token_secret')} is a published default; unset it", file=sys.stderr)
        return 2
    stop = _install_stop_signals()
    ports = PortChooser()
    pg_port = ports.choose(_port_of(settings.postgres_url), "PostgreSQL")
    pg = EmbeddedPostgres(data_dir / "postgres", port=pg_port)
    nats_server = EmbeddedNats(data_dir / "nats", port=ports.choose(_port_of(settings.nats_url), "NATS"))
    sink = SmtpSink(data_dir / "mail", port=ports.choose(settings.smtp_port, "SMTP sink"))
    receiver = WebhookReceiver(data_dir / "webhooks")
    sms_port = urlsplit(settings.sms_provider_url).port or 0
    sms_sink = SmsSink(data_dir / "sms", port=ports.choose(sms_port, "SMS sink"))
    supervisor: Supervisor | None = None
    try:
        print("starting PostgreSQL and NATS …", flush=True)
        await pg.start()
        await nats_server.start()
        await sink.start()
        await receiver.start()
        await sms_sink.start()
        settings, listen = _point_at_embedded(settings, pg, nats_server, sink, ports)
        settings = replace(_allow_receiver(settings, receiver), sms_provider_url=sms_sink.url)
        for service in SERVICES:
            await migrate(service, settings.database_url(service))
        logs = data_dir / "logs"
        logs.mkdir(exist_ok=True)

        async def ready(service: str, child: asyncio.subprocess.Process) -> None:
            await wait_serving(listen[service], child)

        supervisor = Supervisor(_spawner(settings, logs), ready, lambda line: print(line, flush=True))
        await supervisor.start(SERVICES)
        _announce(data_dir, settings, listen, sink, receiver, sms_sink, logs, ports)
        await supervisor.run_until(stop)
        return 0
    finally:
        print("\nstopping …", flush=True)
        if supervisor is not None:
            await _stop_children(list(supervisor.children.values()), settings.shutdown_grace + 5)
        (data_dir / STATE_FILE).unlink(missing_ok=True)
        await sink.stop()
        await receiver.stop()
        await sms_sink.stop()
        await nats_server.stop()
        await pg.stop()
        print("stopped; data kept in", data_dir, flush=True)
