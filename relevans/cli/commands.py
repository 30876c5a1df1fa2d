"""The work behind `relevans migrate`, `health` and `token create`, with their expected failures
(an unreachable server, a published secret) said in one line."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from datetime import timedelta

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from rich.table import Table
from sqlalchemy.exc import SQLAlchemyError

from relevans.cli.console import fail, print_table, say
from relevans.cli.stack import SECRET_FILE, Stack
from relevans.kit.auth import PUBLISHED_SECRETS, mint_token
from relevans.kit.clock import SystemClock
from relevans.kit.db import migrate
from relevans.kit.settings import Settings

# What a PostgreSQL that is down, starting or unreachable raises.
UNREACHABLE = (OSError, TimeoutError, SQLAlchemyError)


def _server_of(url: str) -> str:
    """host:port of a PostgreSQL URL, without user or password."""
    return url.split("@", 1)[-1].split("/", 1)[0]


async def migrate_all(settings: Settings, services: Sequence[str], wait: float) -> None:
    """Migrates each service's database, saying so; retries for `wait` seconds while PostgreSQL
    cannot be reached (a container starting beside it), then fails in one line."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + wait
    for service in services:
        while True:
            try:
                await migrate(service, settings.database_url(service))
                break
            except UNREACHABLE as exc:
                where = _server_of(settings.database_url(service))
                reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
                if loop.time() >= deadline:
                    fail("migrate", f"cannot reach PostgreSQL at {where}: {reason}")
                say(f"relevans migrate: PostgreSQL at {where} not ready ({reason}); retrying")
                await asyncio.sleep(1.0)
        say(f"{service}: database {settings.database_url(service).rsplit('/', 1)[-1]} is up to date")


async def _status(address: str, timeout: float) -> str:
    async with grpc.aio.insecure_channel(address) as channel:
        try:
            reply = await health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(), timeout=timeout
            )
        except grpc.aio.AioRpcError as err:
            return "unreachable" if err.code() == grpc.StatusCode.UNAVAILABLE else err.code().name
    return str(health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status))


async def health(stack: Stack, services: Sequence[str], timeout: float) -> int:
    """A table of each service's health; 0 when every one is SERVING."""
    addresses = {s: stack.local_address(s) for s in services}
    statuses = await asyncio.gather(*(_status(a, timeout) for a in addresses.values()))
    table = Table("service", "address", "status")
    for (service, address), status in zip(addresses.items(), statuses, strict=True):
        table.add_row(service, address, status)
    print_table(table)
    return 0 if all(s == "SERVING" for s in statuses) else 1


def _lifetime(ttl: timedelta) -> str:
    seconds = int(ttl.total_seconds())
    for unit, size in (("days", 86400), ("hours", 3600), ("minutes", 60)):
        if seconds >= size and seconds % size == 0:
            return f"{seconds // size} {unit}"
    return f"{seconds} seconds"


def create_token(
    stack: Stack, tenant: str, scopes: list[str], ttl: timedelta, allow_dev_secret: bool
) -> None:
    """Prints a token on stdout (for `TOKEN=$(relevans token create …)`) and what it grants on stderr."""
    if stack.settings.token_secret in PUBLISHED_SECRETS and not allow_dev_secret:
        fail(
            "token create",
            f"no token secret: set RELEVANS_TOKEN_SECRET to the services' secret, or run `relevans up` once "
            f"(it keeps one in {stack.data_dir / SECRET_FILE})",
        )
    expires = SystemClock().now() + ttl
    try:
        token = mint_token(stack.settings.token_secret, tenant, scopes, expires_at=expires)
    except ValueError as exc:
        fail("token create", str(exc))
    print(token, flush=True)
    say(
        f"token for tenant {tenant!r}, scopes {', '.join(sorted(set(scopes)))}, "
        f"expires {expires:%Y-%m-%d %H:%M} UTC (in {_lifetime(ttl)})"
    )
