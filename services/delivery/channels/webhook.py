"""The webhook channel's transport: a signed JSON POST (aiohttp) to the template's endpoint,
connected only to addresses the address guard checked.

For each message, in order: the endpoint is loaded; its URL passes the address guard (else
the message fails "address_blocked: ..." and nothing is claimed or sent; a name that does
not resolve is retried later); the request is signed at the clock's now; the message is
claimed; the request is posted. The connection's resolver answers aiohttp with the checked
addresses and nothing else, so there is no second DNS lookup between the check and the
connection.

Redirects are never followed by aiohttp. A 307 or 308 (which keep the method and body by
definition) is followed by hand, at most `MAX_REDIRECTS` times, each target passing the
same check first; another 3xx, or a redirect to a refused address, fails the message.
How each outcome ends the message: `domain/channels/webhook.py`.
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from types import SimpleNamespace
from typing import Any
from urllib.parse import urljoin

import aiohttp
import structlog
from aiohttp.abc import AbstractResolver, ResolveResult

from relevans.kit.clock import Clock
from services.delivery.channels.address_guard import (
    AddressGuard,
    AddressRefused,
    AddressRules,
    CheckedTarget,
    NameUnresolved,
    Resolver,
    system_resolver,
)
from services.delivery.channels.base import Handover, Outgoing
from services.delivery.domain import Send, SendFailure, SendOutcome
from services.delivery.domain.channels.webhook import STAGE_CONNECT, STAGE_SENT, WebhookChannel
from services.delivery.domain.webhooks import (
    ENDPOINT_NOT_FOUND,
    REDIRECT_NOT_FOLLOWED,
    SECRET_UNUSABLE,
    WEBHOOK_REJECTED,
    WebhookEndpoint,
    payload,
    signed_headers,
)
from services.delivery.webhook_rows import EndpointKey, WebhookRows

log = structlog.get_logger(__name__)

# Requests of one worker's batch in flight at once; each carries one message at a time.
WEBHOOK_CONNECTIONS = 8
MAX_REDIRECTS = 3
FOLLOWED_REDIRECTS = frozenset({307, 308})
USER_AGENT = "relevans-webhooks/1"


class PinnedResolver(AbstractResolver):
    """aiohttp's resolver: the addresses the guard checked for a host and port, nothing else."""

    def __init__(self) -> None:
        self.pinned: dict[tuple[str, int], tuple[str, ...]] = {}

    def pin(self, target: CheckedTarget) -> None:
        self.pinned[(target.host, target.port)] = target.addresses

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        addresses = self.pinned.get((host.lower(), port))
        if not addresses:
            raise OSError(f"{host}:{port} did not pass the address check")
        return [
            ResolveResult(
                hostname=host,
                host=address,
                port=port,
                family=socket.AF_INET6 if ":" in address else socket.AF_INET,
                proto=0,
                flags=socket.AI_NUMERICHOST,
            )
            for address in addresses
        ]

    async def close(self) -> None:
        return None


def tcp_connector(resolver: AbstractResolver) -> aiohttp.BaseConnector:
    return aiohttp.TCPConnector(resolver=resolver, use_dns_cache=False, limit=WEBHOOK_CONNECTIONS)


@dataclass(frozen=True, slots=True)
class WebhookNetwork:
    """How webhooks reach the network: the resolver the guard asks, and the connector the
    requests go through (given the pinned resolver). Tests inject both."""

    resolve: Resolver = system_resolver
    connector: Callable[[AbstractResolver], aiohttp.BaseConnector] = field(default=tcp_connector)


@dataclass(frozen=True, slots=True)
class WebhookOutgoing(Outgoing):
    """A webhook message: `recipient` is the endpoint id, `content` the JSON payload."""

    tenant_id: str = ""
    message_id: str = ""


async def _headers_sent(session: aiohttp.ClientSession, ctx: SimpleNamespace, params: Any) -> None:
    ctx.trace_request_ctx["sent"] = True


class WebhookTransport:
    def __init__(
        self,
        endpoints: WebhookRows,
        rules: AddressRules,
        clock: Clock,
        network: WebhookNetwork | None = None,
        *,
        connections: int = WEBHOOK_CONNECTIONS,
    ) -> None:
        self.endpoints = endpoints
        self.network = network or WebhookNetwork()
        self.guard = AddressGuard(rules, self.network.resolve)
        self.clock = clock
        self.connections = max(1, connections)
        self.rules = WebhookChannel()

    def compose(self, message_id: str, send: Send, now: datetime) -> Outgoing:
        request, template = send.request, send.template
        if request is None or template is None or not template.webhook_endpoint_id:
            raise ValueError("a webhook message needs its request and its template's endpoint")
        body = payload(
            message_id=message_id,
            trigger_id=request.trigger_id,
            profile_id=send.recipient,
            subject=send.subject,
            text=send.body_text,
            variables=request.variables,
            now=now,
        )
        return WebhookOutgoing(
            template.webhook_endpoint_id, body, tenant_id=request.tenant_id, message_id=message_id
        )

    async def send_many(self, messages: Sequence[Outgoing], handover: Handover) -> None:
        hooks = [m if isinstance(m, WebhookOutgoing) else None for m in messages]
        try:
            endpoints = await self.endpoints.load((m.tenant_id, m.recipient) for m in hooks if m is not None)
        except Exception as exc:  # the database is away: nothing was sent, try again later
            for index in range(len(messages)):
                handover.report(index, SendOutcome("transient", f"webhook endpoints not loaded: {exc}"))
            return
        resolver = PinnedResolver()
        trace = aiohttp.TraceConfig()
        trace.on_request_headers_sent.append(_headers_sent)
        queue = iter(enumerate(hooks))
        async with aiohttp.ClientSession(
            connector=self.network.connector(resolver),
            trace_configs=[trace],
            cookie_jar=aiohttp.DummyCookieJar(),
            headers={"user-agent": USER_AGENT},
        ) as session:
            lanes = min(self.connections, len(messages))
            await asyncio.gather(
                *(self._lane(session, resolver, queue, endpoints, handover) for _ in range(lanes))
            )

    async def _lane(
        self,
        session: aiohttp.ClientSession,
        resolver: PinnedResolver,
        queue: Iterator[tuple[int, WebhookOutgoing | None]],
        endpoints: Mapping[EndpointKey, WebhookEndpoint],
        handover: Handover,
    ) -> None:
        for index, hook in queue:
            if hook is None:
                handover.report(index, SendOutcome("permanent", "not a webhook message"))
                continue
            endpoint = endpoints.get((hook.tenant_id, hook.recipient))
            if endpoint is None:
                handover.report(index, SendOutcome("permanent", f"{ENDPOINT_NOT_FOUND}: {hook.recipient}"))
                continue
            outcome = await self._send_one(session, resolver, index, hook, endpoint, handover)
            if outcome is not None:
                handover.report(index, outcome)

    async def _send_one(
        self,
        session: aiohttp.ClientSession,
        resolver: PinnedResolver,
        index: int,
        hook: WebhookOutgoing,
        endpoint: WebhookEndpoint,
        handover: Handover,
    ) -> SendOutcome | None:
        """The outcome of one message: checked, claimed, signed and posted; None when its claim
        was refused."""
        try:
            target = await self.guard.check(endpoint.url)
        except AddressRefused as exc:
            return SendOutcome("permanent", str(exc))
        except NameUnresolved as exc:
            return SendOutcome("transient", str(exc))
        try:
            headers = signed_headers(endpoint.secret, hook.message_id, self.clock.now(), hook.content)
        except ValueError as exc:  # a secret not written by new_secret()
            return SendOutcome("permanent", f"{SECRET_UNUSABLE}: {exc}")
        if not await handover.claim(index):
            return None
        timeout = aiohttp.ClientTimeout(total=endpoint.timeout.total_seconds())
        return await self._post(session, resolver, target, headers, hook.content, timeout)

    async def _post(
        self,
        session: aiohttp.ClientSession,
        resolver: PinnedResolver,
        target: CheckedTarget,
        headers: Mapping[str, str],
        body: bytes,
        timeout: aiohttp.ClientTimeout,
    ) -> SendOutcome:
        """POST to the checked target, following 307/308 to targets that pass the check."""
        redirects = 0
        while True:
            resolver.pin(target)
            attempt = {"sent": False}
            try:
                async with session.post(
                    target.url,
                    data=body,
                    headers=headers,
                    allow_redirects=False,
                    timeout=timeout,
                    trace_request_ctx=attempt,
                ) as response:
                    status, reason = response.status, response.reason or ""
                    location = response.headers.get("location", "")
            except Exception as exc:  # no connection, reset, timeout, TLS: whatever broke the request
                kind = self.rules.classify(
                    SendFailure(STAGE_SENT if attempt["sent"] else STAGE_CONNECT, None)
                )
                detail = f"{type(exc).__name__}: {exc}".strip()
                if kind == "unknown":
                    log.warning("webhook request broke after it went out; outcome unknown", error=detail)
                return SendOutcome(kind, detail)
            answer = f"{status} {reason}".strip()
            if 200 <= status < 300:
                return SendOutcome("sent", answer)
            if status in FOLLOWED_REDIRECTS and location:
                if redirects == MAX_REDIRECTS:
                    return SendOutcome("permanent", f"{REDIRECT_NOT_FOLLOWED}: more than {MAX_REDIRECTS}")
                redirects += 1
                try:
                    target = await self.guard.check(urljoin(target.url, location))
                except AddressRefused as exc:
                    return SendOutcome("permanent", f"{exc} (a redirect from {target.host})")
                except NameUnresolved as exc:
                    return SendOutcome("transient", f"{exc} (a redirect from {target.host})")
                continue
            if 300 <= status < 400:
                return SendOutcome("permanent", f"{REDIRECT_NOT_FOLLOWED}: {answer} (only 307 and 308 are)")
            kind = self.rules.classify(SendFailure(STAGE_SENT, status))
            return SendOutcome(kind, f"{WEBHOOK_REJECTED}: {answer}" if kind == "permanent" else answer)
