"""Every RPC of every service, fuzzed on the running system (issue 16).

The methods come from the services' descriptors (each host's bindings), so a new RPC is fuzzed
without a change here; tests/helpers/fuzz.py makes the requests and credentials. For each call:

- the code is one the README documents ("Status codes"): OK, INVALID_ARGUMENT, NOT_FOUND,
  ALREADY_EXISTS, FAILED_PRECONDITION, or RESOURCE_EXHAUSTED for a request over the size limit;
  without a usable token UNAUTHENTICATED and with a token lacking the scope PERMISSION_DENIED
  (or INVALID_ARGUMENT when the request cannot even be decoded) — never UNKNOWN or INTERNAL;
- a rejected call leaves the row count of every table of the service's database as it was;
- an OK reply decodes as the method's response type.

After each method's examples every service still answers its health check SERVING. Every offence
is collected (method, credentials, code, details, the smallest request that caused it) and the test
fails once at the end with all of them. `RELEVANS_FUZZ_EXAMPLES` (README, "Development") sets the
examples per method; unset, the suite runs a fixed, derandomized set of 15.
"""

from __future__ import annotations

import asyncio
import os
import re
from collections.abc import Callable, Coroutine
from contextlib import AsyncExitStack
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import grpc
import nats
import pytest
import sqlalchemy as sa
from google.protobuf import descriptor_pool, message_factory
from google.protobuf.descriptor import MethodDescriptor
from google.protobuf.message import DecodeError
from grpc_health.v1 import health_pb2, health_pb2_grpc
from hypothesis import HealthCheck, Phase, example, given, settings
from sqlalchemy.ext.asyncio import AsyncConnection

from relevans.kit.bus import Bus
from relevans.kit.db import create_engine
from relevans.kit.outbox import OutboxRelay, outbox_table
from tests.helpers import eventually
from tests.helpers.auth import token
from tests.helpers.cart import TEMPLATE_ID, TRIGGER_ID
from tests.helpers.fuzz import Credentials, Request, credentials, nested, oversize, requests, strings
from tests.helpers.system import System

TENANT, OTHER_TENANT = "fuzz", "fuzz-other"
EXAMPLES = int(os.environ.get("RELEVANS_FUZZ_EXAMPLES", "0")) or None
CALL_TIMEOUT_S = 30.0
DOCUMENTED = {
    grpc.StatusCode.OK,
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.NOT_FOUND,
    grpc.StatusCode.ALREADY_EXISTS,
    grpc.StatusCode.FAILED_PRECONDITION,
}
# Below this no documented size limit applies, so RESOURCE_EXHAUSTED there is an offence (as is the
# client's own "Stream removed" when an error's metadata is too large to read).
SMALLEST_LIMIT = 64 * 1024


@dataclass(frozen=True)
class Rpc:
    service: str  # the host serving it: profile, trigger or delivery
    path: str  # /package.Service/Method
    descriptor: MethodDescriptor
    scope: str

    @property
    def streaming(self) -> bool:
        return bool(self.descriptor.client_streaming)


@dataclass
class Offences:
    """Each distinct (method, code, details) with the smallest request seen causing it."""

    found: dict[tuple[str, str, str], tuple[Request, str, str]] = field(default_factory=dict)

    def add(self, rpc: Rpc, problem: str, details: str, request: Request, who: Credentials) -> None:
        generic = re.sub(r"\d+", "N", re.sub(r"with type '[^']+'", "with type T", details))
        key = (rpc.path, problem, generic[:120])
        seen = self.found.get(key)
        if seen is None or request.size < seen[0].size:
            self.found[key] = (request, who.kind, details[:300])

    def report(self) -> str:
        lines = [f"{len(self.found)} distinct offences:"]
        for (path, problem, _), (request, who, details) in sorted(self.found.items()):
            lines.append(f"- {path}: {problem} {details!r}")
            lines.append(f"    credentials {who}; request {request.sample()}")
        return "\n".join(lines)


def rpcs(system: System) -> list[Rpc]:
    """Every method of every gRPC service the running hosts serve, from the descriptors."""
    pool = descriptor_pool.Default()
    found = []
    for name, host in system.hosts.items():
        for binding in host.bindings:
            service = pool.FindServiceByName(binding.full_name)
            for method in service.methods:
                scope = binding.scopes.get(method.name, "admin")
                found.append(Rpc(name, f"/{service.full_name}/{method.name}", method, scope))
    return found


def decodable(rpc: Rpc, request: Request) -> bool:
    cls = message_factory.GetMessageClass(rpc.descriptor.input_type)
    try:
        for raw in request.messages:
            cls.FromString(raw)
    except (DecodeError, RecursionError):
        return False
    return True


def allowed(rpc: Rpc, request: Request, who: Credentials, code: grpc.StatusCode, details: str) -> bool:
    if code == grpc.StatusCode.RESOURCE_EXHAUSTED:
        return request.size >= SMALLEST_LIMIT and "Stream removed" not in details
    if who.expect == "valid":
        return code in DOCUMENTED
    refused = grpc.StatusCode.UNAUTHENTICATED if who.expect == "bad" else grpc.StatusCode.PERMISSION_DENIED
    return code == refused or (code == grpc.StatusCode.INVALID_ARGUMENT and not decodable(rpc, request))


class Fuzzer:
    """Calls one system's RPCs with raw bytes and checks each answer."""

    def __init__(
        self, system: System, conns: dict[str, AsyncConnection], relays: list[OutboxRelay], js: Any
    ) -> None:
        self.system = system
        self.conns = conns
        self.relays = relays
        self.js = js
        self.offences = Offences()
        self.calls = 0
        self.count_queries: dict[str, str] = {}

    async def counts(self, service: str) -> dict[str, int]:
        """Rows in each table of `service`'s database."""
        conn = self.conns[service]
        query = self.count_queries.get(service)
        if query is None:  # the tables are the migrations' and stay for the whole test
            names = (
                await conn.execute(
                    sa.text(
                        "SELECT table_name FROM information_schema.tables WHERE table_schema = 'public' "
                        "AND table_type = 'BASE TABLE' AND table_name <> 'alembic_version' ORDER BY 1"
                    )
                )
            ).scalars()
            query = " UNION ALL ".join(f"SELECT '{n}', count(*) FROM \"{n}\"" for n in names)
            self.count_queries[service] = query
        rows = (await conn.execute(sa.text(query))).all()
        await conn.commit()
        return {str(name): int(count) for name, count in rows}

    async def settled(self) -> bool:
        """Whether every outbox is published and every bus consumer has acked all it was given, so
        no effect of an earlier call is still on its way into a database."""
        for relay in self.relays:
            if await relay.backlog():
                return False
        for stream in await self.js.streams_info():
            for consumer in await self.js.consumers_info(stream.config.name):
                if consumer.num_pending or consumer.num_ack_pending:
                    return False
        return True

    async def settle(self) -> None:
        await eventually(self.settled)
        await eventually(self.settled)  # twice: a consumer may have written to an outbox meanwhile

    async def send(self, rpc: Rpc, request: Request, who: Credentials) -> tuple[grpc.StatusCode, str, bytes]:
        metadata = who.metadata or None
        if rpc.streaming:
            port = self.system.hosts[rpc.service].port
            return await asyncio.to_thread(_send_stream, port, rpc.path, request.messages, metadata)
        channel = self.system.channels[rpc.service]
        try:
            call = channel.unary_unary(rpc.path, request_serializer=None, response_deserializer=None)
            reply = await call(request.messages[0], metadata=metadata, timeout=CALL_TIMEOUT_S)
        except grpc.aio.AioRpcError as err:
            return err.code(), err.details() or "", b""
        return grpc.StatusCode.OK, "", reply

    async def check(self, rpc: Rpc, request: Request, who: Credentials) -> None:
        self.calls += 1
        before = await self.counts(rpc.service)
        code, details, reply = await self.send(rpc, request, who)
        if not allowed(rpc, request, who, code, details):
            self.offences.add(rpc, code.name, details, request, who)
        if code == grpc.StatusCode.OK:
            try:
                message_factory.GetMessageClass(rpc.descriptor.output_type).FromString(reply)
            except DecodeError as exc:
                self.offences.add(rpc, "OK with an undecodable reply", str(exc), request, who)
            await self.settle()
            return
        after = await self.counts(rpc.service)
        changed = {t: (before[t], after.get(t)) for t in before if before[t] != after.get(t)}
        if changed:
            self.offences.add(rpc, f"{code.name} yet rows changed", str(changed), request, who)

    async def healthy(self) -> list[str]:
        """The services (and gRPC services) not answering SERVING."""
        sick = []
        for name, host in self.system.hosts.items():
            stub = health_pb2_grpc.HealthStub(self.system.channels[name])
            for service in ["", *(b.full_name for b in host.bindings)]:
                try:
                    reply = await stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=10)
                    if reply.status != health_pb2.HealthCheckResponse.SERVING:
                        sick.append(f"{name} {service!r}: {reply.status}")
                except grpc.aio.AioRpcError as err:
                    sick.append(f"{name} {service!r}: {err.code().name} {err.details()}")
        return sick


def _send_stream(
    port: int, path: str, messages: tuple[bytes, ...], metadata: Any
) -> tuple[grpc.StatusCode, str, bytes]:
    """A client-streaming call through grpc's synchronous client: when the server answers before the
    client has sent its whole stream (a refused token, say), grpc.aio's client reports its own
    INTERNAL "Internal error from Core" instead of the server's status (grpc/grpc#36066); the
    synchronous client reports the server's."""
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        call = channel.stream_unary(path, request_serializer=None, response_deserializer=None)
        try:
            reply = call(iter(messages), metadata=metadata, timeout=CALL_TIMEOUT_S)
        except grpc.RpcError as err:
            return err.code(), err.details() or "", b""  # type: ignore[attr-defined]
    return grpc.StatusCode.OK, "", reply


def fuzz_method(
    rpc: Rpc, pool: list[str], now: datetime, run: Callable[[Coroutine[Any, Any, None]], None], fuzzer: Fuzzer
) -> None:
    """Run hypothesis over one method (in a worker thread; `run` hands each call to the test's loop)."""

    @settings(
        max_examples=EXAMPLES or 15,
        deadline=None,
        derandomize=EXAMPLES is None,
        database=None,
        phases=[Phase.explicit, Phase.generate],
        suppress_health_check=list(HealthCheck),
    )
    @given(
        request=requests(rpc.descriptor.input_type, pool, rpc.streaming),
        who=credentials(rpc.scope, TENANT, OTHER_TENANT, now),
    )
    def fuzz(request: Request, who: Credentials) -> None:
        run(fuzzer.check(rpc, request, who))

    for request, who in _fixed_examples(rpc):
        fuzz = example(request=request, who=who)(fuzz)
    fuzz()


def _fixed_examples(rpc: Rpc) -> list[tuple[Request, Credentials]]:
    """What every method is sent besides hypothesis's examples: issue 16's hostile inputs, with
    and without a token."""
    valid, missing = Credentials("admin", "valid", token(TENANT, "admin")), Credentials("missing", "bad", ())
    kind = rpc.descriptor.input_type
    fixed = {
        "empty": b"",
        "oversize": oversize(),
        "NUL in every string": strings(kind, b"a\x00b"),
        "invalid UTF-8 in every string": strings(kind, b"a\xffb"),
        "1 MiB in every string": strings(kind, b"x" * 2**20),
    }
    deep = nested(kind, 200)
    if deep is not None:
        fixed["200 deep"] = deep
    return [(Request((raw,), name), who) for name, raw in fixed.items() for who in (valid, missing)]


async def _seed(system: System) -> list[str]:
    """Some data in the fuzzed tenant, and the ids and names requests may pick to reach it."""
    await system.setup_abandoned_cart(TENANT)
    profile_id = await system.customer(TENANT, "ann@example.com", first_name="Ann")
    return [
        profile_id,
        "ann@example.com",
        TRIGGER_ID,
        TEMPLATE_ID,
        "add_to_cart",
        "purchase",
        TENANT,
        "fuzz-1",
    ]


@pytest.mark.timeout(240 + 8 * (EXAMPLES or 0))
async def test_every_rpc_answers_only_documented_codes_and_writes_nothing_when_refused(
    system: System,
) -> None:
    pool = await _seed(system)
    loop = asyncio.get_running_loop()

    def run(coro: Coroutine[Any, Any, None]) -> None:
        asyncio.run_coroutine_threadsafe(coro, loop).result()

    async with AsyncExitStack() as stack:
        conns = {s: await stack.enter_async_context(system.database(s)) for s in system.hosts}
        relays = []
        for service in system.hosts:
            engine = create_engine(system.settings.database_url(service), pool_size=1)
            stack.push_async_callback(engine.dispose)
            relays.append(
                OutboxRelay(
                    engine,
                    outbox_table(sa.MetaData()),
                    Bus(system.settings.nats_url, name="fuzz"),
                    service=service,
                    clock=system.clock,
                )
            )
        nc = await nats.connect(system.settings.nats_url)
        stack.push_async_callback(nc.close)
        fuzzer = Fuzzer(system, conns, relays, nc.jetstream())
        await fuzzer.settle()
        methods = rpcs(system)
        for rpc in methods:
            await asyncio.to_thread(fuzz_method, rpc, pool, system.clock.now(), run, fuzzer)
            sick = await fuzzer.healthy()
            if sick:
                pytest.fail(f"after fuzzing {rpc.path}: {sick}\n{fuzzer.offences.report()}", pytrace=False)
    assert len(methods) >= 35, [m.path for m in methods]
    if fuzzer.offences.found:
        pytest.fail(f"{fuzzer.calls} calls; {fuzzer.offences.report()}", pytrace=False)
