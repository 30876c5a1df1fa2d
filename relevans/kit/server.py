"""The grpc.aio server bootstrap every service uses.

`ServiceHost` runs one service: a gRPC server with health (NOT_SERVING during
shutdown), reflection, authentication, error mapping, metrics and per-call log
context, plus the service's background workers. `stop()` stops accepting
calls, lets in-flight calls finish within the grace period, stops the workers,
then runs the closers (drain NATS, dispose the database) — and is safe to call twice.
"""

from __future__ import annotations

import asyncio
import contextvars
import errno
import signal
import socket
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, cast

import grpc
import structlog
from google.protobuf.message import DecodeError
from google.rpc import status_pb2
from grpc_health.v1 import _async as health_aio
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_status import rpc_status

from relevans.kit import errors, metrics
from relevans.kit.auth import Principal, TokenError, verify_token
from relevans.kit.clock import Clock
from relevans.kit.nul_text import is_nul_refusal, nul_refusal
from relevans.kit.reflection import enable_reflection
from relevans.kit.status import CODES, refusal, to_rpc_status

log = structlog.get_logger(__name__)

# The largest request a method takes unless its binding says otherwise (README, "Limits").
DEFAULT_MAX_REQUEST_BYTES = 1024 * 1024
_principal: contextvars.ContextVar[Principal] = contextvars.ContextVar("relevans_principal")


def principal() -> Principal:
    """The authenticated caller of the current RPC."""
    return _principal.get()


@dataclass(frozen=True)
class ServiceBinding:
    """One gRPC service to serve: how to register it, which scope each method needs, and the
    methods that take requests larger than DEFAULT_MAX_REQUEST_BYTES (method name -> bytes)."""

    full_name: str
    register: Callable[[Any, grpc.aio.Server], None]
    servicer: Any
    scopes: Mapping[str, str]
    max_request_bytes: Mapping[str, int] = field(default_factory=dict)


class _Refused(Exception):
    """A call the guard answers itself, with `status`."""

    def __init__(self, code: grpc.StatusCode, reason: str, message: str, **metadata: str) -> None:
        super().__init__(message)
        self.code = code
        self.status = refusal(code, reason, message, metadata)


def _decoded(raw: bytes, decode: Callable[[bytes], Any], limit: int) -> Any:
    """The request message of `raw` bytes, refused when larger than `limit` or undecodable."""
    if len(raw) > limit:
        raise _Refused(
            grpc.StatusCode.RESOURCE_EXHAUSTED,
            "REQUEST_TOO_LARGE",
            f"the request is {len(raw)} bytes; this method takes at most {limit}",
            max_bytes=str(limit),
        )
    try:
        return decode(raw)
    except DecodeError as exc:
        raise _Refused(
            grpc.StatusCode.INVALID_ARGUMENT, "UNDECODABLE_REQUEST", f"the request cannot be decoded: {exc}"
        ) from None


async def _decoded_stream(
    raws: AsyncIterator[bytes], decode: Callable[[bytes], Any], limit: int
) -> AsyncIterator[Any]:
    async for raw in raws:
        yield _decoded(raw, decode, limit)


def _refused(method: str, handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
    async def refuse(request: Any, context: grpc.aio.ServicerContext) -> Any:
        await context.abort(grpc.StatusCode.UNIMPLEMENTED, f"{method}: streaming responses are not served")

    wrap = (
        grpc.unary_unary_rpc_method_handler
        if not handler.request_streaming
        else grpc.stream_unary_rpc_method_handler
    )
    return wrap(
        refuse,
        request_deserializer=handler.request_deserializer,
        response_serializer=handler.response_serializer,
    )


def _failure(exc: Exception, request: Any) -> tuple[grpc.StatusCode, status_pb2.Status]:
    """The code and status a call that raised `exc` answers."""
    if isinstance(exc, _Refused):
        return exc.code, exc.status
    if isinstance(exc, errors.DomainError):
        return CODES.get(type(exc), grpc.StatusCode.UNKNOWN), to_rpc_status(exc)
    if is_nul_refusal(exc):
        return grpc.StatusCode.INVALID_ARGUMENT, to_rpc_status(nul_refusal(request))
    log.error("rpc failed", exc_info=exc)
    code = grpc.StatusCode.INTERNAL
    return code, refusal(code, "INTERNAL", "internal error")


class _CallGuard(grpc.aio.ServerInterceptor):
    """Authenticates, binds log context, maps domain errors and records metrics for every call.

    The guarded handler of a method is built once, on its first call, and reused;
    verified tokens are cached with their expiry (a failed verification never is).
    """

    TOKEN_CACHE_SIZE = 10_000

    def __init__(
        self,
        service: str,
        secret: str,
        clock: Clock,
        scopes: Mapping[str, str],
        guarded: set[str],
        limits: Mapping[str, int],
    ) -> None:
        self.service = service
        self.secret = secret
        self.clock = clock
        self.scopes = scopes
        self.guarded = guarded
        self.limits = limits  # method -> the largest request it takes, when not the default
        self._handlers: dict[str, grpc.RpcMethodHandler] = {}
        self._tokens: dict[str, Principal] = {}

    def scope_of(self, method: str) -> str | None:
        """The scope a method needs; methods of our services missing from the map need admin."""
        scope = self.scopes.get(method)
        if scope is None and method.rsplit("/", 1)[0].lstrip("/") in self.guarded:
            return "admin"
        return scope

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        method = details.method
        cached = self._handlers.get(method)
        if cached is not None:
            return cached
        handler = await continuation(details)
        if handler is None:  # unknown method: grpc answers UNIMPLEMENTED; nothing to cache
            return handler
        scope = self.scope_of(method)
        if scope is not None:
            handler = self._guard(method, scope, handler)
        self._handlers[method] = handler
        return handler

    def _guard(self, method: str, scope: str, handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
        """The guarded handler of one method with a single response (unary or client-streaming).

        Methods with streaming responses are refused until the guard covers them, so
        no method of a bound service is ever served unauthenticated. gRPC hands the guard the
        request's bytes, not its message: the caller is authenticated and the size checked
        before anything is decoded, and bytes that do not decode are an INVALID_ARGUMENT.
        """
        if handler.unary_unary is None and handler.stream_unary is None:
            return _refused(method, handler)
        inner = cast(
            Callable[[Any, grpc.aio.ServicerContext], Awaitable[Any]],
            handler.unary_unary or handler.stream_unary,
        )
        decode = cast(Callable[[bytes], Any], handler.request_deserializer)
        limit = self.limits.get(method, DEFAULT_MAX_REQUEST_BYTES)
        streaming = handler.stream_unary is not None
        name = method.rsplit("/", 1)[-1]
        service = self.service
        latency = metrics.RPC_LATENCY.labels(service, name)
        counters: dict[grpc.StatusCode, Any] = {}
        caller = self._caller
        bind = structlog.contextvars.bind_contextvars
        unbind = structlog.contextvars.unbind_contextvars
        perf_counter = time.perf_counter
        ok = grpc.StatusCode.OK

        async def guarded(request: Any, context: grpc.aio.ServicerContext) -> Any:
            started = perf_counter()
            code = ok
            header: Any = ""
            request_id: Any = None
            for key, value in context.invocation_metadata() or ():
                if key == "authorization":
                    header = value
                elif key == "x-request-id":
                    request_id = value
            bind(request_id=str(request_id) if request_id else uuid.uuid4().hex, method=method)
            try:
                try:
                    who = caller(str(header), scope)
                    bind(tenant=who.tenant_id)
                    request = (_decoded_stream if streaming else _decoded)(request, decode, limit)
                    token = _principal.set(who)
                    try:
                        return await inner(request, context)
                    finally:
                        _principal.reset(token)
                except (asyncio.CancelledError, grpc.aio.AbortError):
                    if code is ok:
                        code = context.code() or grpc.StatusCode.CANCELLED
                    raise
                except Exception as exc:
                    code, status = _failure(exc, request)
                # Abort outside the except clause, the request dropped: grpc keeps the abort's
                # exception in a reference cycle with the call, freed only when the garbage
                # collector runs, and its traceback (and an exception it chained) would keep a
                # request of megabytes alive that long (issue 16: +1 GB over 80 large calls).
                request = None
                await context.abort_with_status(rpc_status.to_status(status))  # type: ignore[attr-defined]
            finally:
                counter = counters.get(code)
                if counter is None:
                    counter = counters[code] = metrics.RPC_REQUESTS.labels(service, name, code.name)
                counter.inc()
                latency.observe(perf_counter() - started)
                unbind("request_id", "method", "tenant")

        wrap = grpc.stream_unary_rpc_method_handler if streaming else grpc.unary_unary_rpc_method_handler
        # no deserializer: gRPC passes the request's bytes, which `guarded` decodes
        return wrap(guarded, request_deserializer=None, response_serializer=handler.response_serializer)

    def _caller(self, header: str, scope: str) -> Principal:
        """The caller a call's authorization header names, if it may use `scope`; else refused."""
        who = self._authenticate(header)
        if who is None:
            code = grpc.StatusCode.UNAUTHENTICATED
            raise _Refused(code, code.name, "missing or invalid bearer token")
        if not who.allows(scope):
            code = grpc.StatusCode.PERMISSION_DENIED
            raise _Refused(code, code.name, f"token lacks the {scope!r} scope", scope=scope)
        return who

    def _authenticate(self, header: str) -> Principal | None:
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not token:
            return None
        token = token.strip()
        now = self.clock.now()
        cached = self._tokens.get(token)
        if cached is not None:
            if cached.expires_at is None or now.timestamp() < cached.expires_at:
                return cached
            del self._tokens[token]  # expired: verify again, which rejects it
        try:
            who = verify_token(self.secret, token, now)
        except TokenError:
            return None  # never cached: a bad token is checked again on every call
        if len(self._tokens) >= self.TOKEN_CACHE_SIZE:
            del self._tokens[next(iter(self._tokens))]  # the oldest entry
        self._tokens[token] = who
        return who


def _port_taken(listen: str) -> bool:
    """Whether something already listens on `listen` (host:port; port 0 is never taken). Servers
    that share a port cannot see this when they bind, so it is asked first."""
    host, _, port = listen.rpartition(":")
    if int(port) == 0:
        return False
    try:
        addresses = socket.getaddrinfo(host.strip("[]") or None, int(port), type=socket.SOCK_STREAM)
    except socket.gaierror:
        return False  # the server's own bind reports the bad address
    for family, kind, proto, _, address in addresses:
        with socket.socket(family, kind, proto) as probe:
            # as gRPC's listeners do: a closed connection's TIME_WAIT does not count, a listener does
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                probe.bind(address)
            except OSError as exc:
                if exc.errno == errno.EADDRINUSE:
                    return True
    return False


Worker = Callable[[asyncio.Event], Awaitable[None]]
Closer = Callable[[], Awaitable[None]]


async def _cancel_until_ended(tasks: Iterable[asyncio.Task[None]], every_s: float = 1.0) -> None:
    """Cancel the tasks, again every `every_s` until each has ended: before Python 3.12,
    `asyncio.wait_for` drops a cancellation that arrives as what it waits for completes (nats-py's
    fetch waits that way), and the task goes on as if never cancelled."""
    tasks = set(tasks)
    pending = tasks
    while pending:
        for task in pending:
            task.cancel()
        _, pending = await asyncio.wait(pending, timeout=every_s)
    for task in tasks:
        if not task.cancelled():
            task.exception()  # retrieved: the worker's own loop logged it


class ServiceHost:
    """Lifecycle of one service process: `async with ServiceHost(...)` or `run_until_signal()`."""

    def __init__(
        self,
        name: str,
        *,
        listen: str,
        secret: str,
        clock: Clock,
        bindings: list[ServiceBinding],
        grace_s: float = 5.0,
        metrics_port: int = 0,
        metrics_host: str = "127.0.0.1",
        reuse_port: bool = False,
        servers: int = 1,
    ) -> None:
        self.name = name
        self.listen = listen
        self.grace_s = grace_s
        self.metrics_port = metrics_port
        self.metrics_host = metrics_host
        # Several processes serving one port share it (SO_REUSEPORT); off otherwise, so a port
        # already in use is an error rather than silently shared.
        self.reuse_port = reuse_port
        # gRPC servers this process runs on its port (see start()).
        self.servers = servers
        self.bindings = bindings
        self.port = 0
        self._scopes = {
            f"/{b.full_name}/{method}": scope for b in bindings for method, scope in b.scopes.items()
        }
        self._limits = {
            f"/{b.full_name}/{method}": size for b in bindings for method, size in b.max_request_bytes.items()
        }
        self._guard = _CallGuard(
            name, secret, clock, self._scopes, {b.full_name for b in bindings}, self._limits
        )
        self._workers: list[tuple[str, Worker]] = []
        self._closers: list[Closer] = []
        self._killers: list[Closer] = []
        self._tasks: list[asyncio.Task[None]] = []
        self._stop_workers = asyncio.Event()
        self._servers: list[grpc.aio.Server] = []
        self._health = health_aio.HealthServicer()
        self._stopped = False

    def add_worker(self, name: str, worker: Worker) -> None:
        """A background loop that runs until the event passed to it is set."""
        self._workers.append((name, worker))

    def add_closer(self, closer: Closer, *, on_kill: Closer | None = None) -> None:
        """Run on stop, after workers end, in reverse order of adding; `on_kill` instead of it
        when the host is killed (a crash does not drain a connection, say)."""
        self._closers.append(closer)
        self._killers.append(on_kill or closer)

    async def start(self) -> None:
        """Serve on `listen` with `servers` grpc.aio servers sharing the port (SO_REUSEPORT).

        A grpc.aio server takes the next call of a method only after its event loop has run the
        previous one's acceptance (about one per loop turn), so under load calls queue inside
        gRPC before any handler sees them, and latency grows with the queue (figures:
        bench/README.md). The kernel spreads connections over the servers; each takes calls side
        by side. One connection is served by one server.
        """
        shared = self.reuse_port or self.servers > 1
        if shared and not self.reuse_port and _port_taken(self.listen):
            raise RuntimeError(f"{self.name}: cannot listen on {self.listen}: the port is in use")
        listen = self.listen
        try:
            for _ in range(self.servers):
                server = self._make_server(reuse_port=shared)
                try:
                    port = server.add_insecure_port(listen)
                except RuntimeError as exc:  # grpc's own "Failed to bind to address ..."
                    raise RuntimeError(f"{self.name}: cannot listen on {listen}: {exc}") from None
                if port == 0:
                    raise RuntimeError(f"{self.name}: cannot listen on {listen}")
                await server.start()
                self._servers.append(server)
                if not self.port:
                    self.port = port
                    listen = f"{self.listen.rsplit(':', 1)[0]}:{port}"  # the others share its port
        except BaseException:
            await asyncio.gather(*(server.stop(None) for server in self._servers))
            self._servers.clear()
            raise
        for n in ["", *self._service_names()]:
            await self._health.set(n, health_pb2.HealthCheckResponse.SERVING)
        for worker_name, worker in self._workers:
            self._tasks.append(asyncio.create_task(self._run_worker(worker_name, worker), name=worker_name))
        metrics.serve_metrics(self.metrics_port, self.metrics_host)
        log.info("service started", service=self.name, listen=self.listen, port=self.port)

    def _service_names(self) -> list[str]:
        return [b.full_name for b in self.bindings]

    def _make_server(self, *, reuse_port: bool) -> grpc.aio.Server:
        server = grpc.aio.server(
            interceptors=[self._guard],
            options=[
                # larger requests are refused by gRPC before they reach Python
                ("grpc.max_receive_message_length", max([DEFAULT_MAX_REQUEST_BYTES, *self._limits.values()])),
                ("grpc.so_reuseport", int(reuse_port)),
            ],
        )
        for b in self.bindings:
            b.register(b.servicer, server)
        health_pb2_grpc.add_HealthServicer_to_server(self._health, server)
        enable_reflection([*self._service_names(), health.SERVICE_NAME], server)
        return server

    async def _run_worker(self, name: str, worker: Worker) -> None:
        while not self._stop_workers.is_set():
            try:
                await worker(self._stop_workers)
                return
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("worker crashed; restarting", service=self.name, worker=name)
                await asyncio.sleep(1.0)

    async def stop(self) -> None:
        if self._stopped:
            return
        self._stopped = True
        await self._health.enter_graceful_shutdown()
        await asyncio.gather(*(server.stop(self.grace_s) for server in self._servers))
        self._stop_workers.set()
        if self._tasks:
            _, pending = await asyncio.wait(self._tasks, timeout=self.grace_s)
            await _cancel_until_ended(pending)
        for closer in reversed(self._closers):
            try:
                await closer()
            except Exception:
                log.exception("closer failed", service=self.name)
        log.info("service stopped", service=self.name)

    async def kill(self) -> None:
        """Stop abruptly, as a crashed process would: no grace, workers cancelled mid-flight."""
        self._stopped = True
        await _cancel_until_ended(self._tasks)
        await asyncio.gather(*(server.stop(None) for server in self._servers))
        for closer in reversed(self._killers):
            try:
                await closer()
            except Exception:
                log.debug("closer failed during kill", service=self.name)

    async def __aenter__(self) -> ServiceHost:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    async def run_until_signal(self, until: Sequence[Awaitable[object]] = ()) -> None:
        """Serve until SIGTERM or SIGINT, or until any of `until` completes (a sibling process of
        a service run as several exiting), then shut down gracefully."""
        loop = asyncio.get_running_loop()
        stop = asyncio.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        async with self:
            waits = [asyncio.ensure_future(stop.wait()), *(asyncio.ensure_future(u) for u in until)]
            try:
                await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
            finally:
                for w in waits:
                    w.cancel()
            log.info(
                "shutdown signal received" if stop.is_set() else "a sibling process exited", service=self.name
            )
