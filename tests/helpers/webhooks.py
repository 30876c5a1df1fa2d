"""Webhooks under test: the services with delivery's network injected (a resolver answering from
a table, a connector recording every connection it is asked for and refusing any address that is
not loopback), a receiver, and the calls a test makes."""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field, replace
from datetime import timedelta
from pathlib import Path
from typing import Any

import aiohttp
import grpc
import nats
from aiohttp.abc import AbstractResolver, ResolveResult

from relevans.common.v1 import common_pb2
from relevans.delivery.v1 import bus_pb2, delivery_pb2
from relevans.kit.clock import ManualClock
from relevans.kit.proto import to_struct
from relevans.kit.settings import Settings
from relevans.local.smtp_sink import SmtpSink
from relevans.local.webhook_receiver import WebhookReceiver
from relevans.profile.v1 import profile_pb2
from services.delivery.app import build
from services.delivery.channels.webhook import WebhookNetwork
from services.delivery.domain.addresses import parse_address
from tests.helpers.auth import token
from tests.helpers.system import System

TENANT = "shop"
FINAL = (
    delivery_pb2.MESSAGE_STATUS_SENT,
    delivery_pb2.MESSAGE_STATUS_SUPPRESSED,
    delivery_pb2.MESSAGE_STATUS_FAILED,
)


def _loopback(host: str) -> bool:
    address = parse_address(host)
    return address is not None and address.is_loopback


class _LoopbackOnly(AbstractResolver):
    """Passes on the pinned answers, refusing any that is not loopback: a test never connects out."""

    def __init__(self, inner: AbstractResolver) -> None:
        self.inner = inner

    async def resolve(self, host: str, port: int = 0, family: Any = 0) -> list[ResolveResult]:
        found = await self.inner.resolve(host, port, family)
        if not all(_loopback(r["host"]) for r in found):
            raise OSError(f"the test refuses to connect to {host} ({[r['host'] for r in found]})")
        return found

    async def close(self) -> None:
        await self.inner.close()


@dataclass
class FakeNet:
    """Delivery's webhook network in a test: names resolve from `answers`; every connection the
    transport asks for is recorded in `connects` (host, port) before it is attempted."""

    answers: dict[str, list[str]] = field(default_factory=dict)
    asked: list[str] = field(default_factory=list)
    connects: list[tuple[str, int]] = field(default_factory=list)

    async def resolve(self, host: str) -> list[str]:
        self.asked.append(host)
        if host not in self.answers:
            raise OSError("no such host")
        return list(self.answers[host])

    def connector(self, resolver: AbstractResolver) -> aiohttp.BaseConnector:
        net = self

        class Recording(aiohttp.TCPConnector):
            async def connect(self, req: Any, traces: Any, timeout: Any) -> Any:
                net.connects.append((req.url.host, req.url.port))
                if parse_address(req.url.host) is not None and not _loopback(req.url.host):
                    raise aiohttp.ClientConnectionError(f"the test refuses to connect to {req.url.host}")
                return await super().connect(req, traces, timeout)

        return Recording(resolver=_LoopbackOnly(resolver), use_dns_cache=False)

    def network(self) -> WebhookNetwork:
        return WebhookNetwork(resolve=self.resolve, connector=self.connector)


async def start_system(
    settings: Settings, clock: ManualClock, tmp_path: Path, net: FakeNet, *, trigger: bool = False
) -> System:
    """Profile (and trigger), and delivery on `net`; close with `System.close`."""
    sink = SmtpSink(tmp_path / "mail")
    await sink.start()
    system = System(replace(settings, smtp_port=sink.port), clock, sink, {}, {})
    for service in ("profile", "trigger") if trigger else ("profile",):
        await system.start(service)
    host = await build(system.settings, clock, webhook_network=net.network())
    await host.start()
    system.hosts["delivery"] = host
    system.channels["delivery"] = grpc.aio.insecure_channel(f"127.0.0.1:{host.port}")
    return system


async def put_endpoint(
    system: System,
    endpoint_id: str,
    url: str,
    *,
    rotate: bool = False,
    timeout: timedelta | None = None,
    tenant: str = TENANT,
) -> delivery_pb2.WebhookEndpoint:
    endpoint = delivery_pb2.WebhookEndpoint(endpoint_id=endpoint_id, url=url)
    if timeout is not None:
        endpoint.timeout.FromTimedelta(timeout)
    reply = await system.delivery.PutWebhookEndpoint(
        delivery_pb2.PutWebhookEndpointRequest(endpoint=endpoint, rotate_secret=rotate),
        metadata=token(tenant, "admin"),
    )
    return reply.endpoint


async def put_template(system: System, template_id: str, endpoint_id: str, tenant: str = TENANT) -> None:
    await system.delivery.PutTemplate(
        delivery_pb2.PutTemplateRequest(
            template=delivery_pb2.Template(
                template_id=template_id,
                channel=common_pb2.CHANNEL_WEBHOOK,
                subject="Lead: {{ first_name | fallback('someone') }}",
                body_text="{{ first_name | fallback('Someone') }} downloaded {{ event.paper }}.",
                webhook_endpoint_id=endpoint_id,
            )
        ),
        metadata=token(tenant, "admin"),
    )


async def lead(system: System, email: str = "ada@example.com", first_name: str = "Ada") -> str:
    """A person who agreed to be handed to sales (marketing consent on the webhook channel)."""
    reply = await system.profiles.Identify(
        profile_pb2.IdentifyRequest(
            email=email,
            first_name=first_name,
            consents=[
                profile_pb2.ConsentInput(
                    purpose=common_pb2.PURPOSE_MARKETING,
                    channel=common_pb2.CHANNEL_WEBHOOK,
                    status=common_pb2.CONSENT_STATUS_GRANTED,
                    source="white_paper_form",
                )
            ],
        ),
        metadata=token(TENANT, "ingest"),
    )
    return str(reply.profile.profile_id)


async def request(system: System, profile_id: str, template_id: str) -> str:
    """Publish a webhook delivery request, as trigger does; its idempotency key."""
    key = f"lead:{profile_id}:{uuid.uuid4().hex}"
    msg = bus_pb2.DeliveryRequest(
        idempotency_key=key,
        tenant_id=TENANT,
        profile_id=profile_id,
        trigger_id="hot-lead",
        channel=common_pb2.CHANNEL_WEBHOOK,
        purpose=common_pb2.PURPOSE_MARKETING,
        template_id=template_id,
        variables=to_struct({"event": {"paper": "Pricing 2026"}, "score": 120}),
    )
    nc = await nats.connect(system.settings.nats_url)
    try:
        await nc.jetstream().publish("rv.delivery.requests", msg.SerializeToString())
    finally:
        await nc.close()
    return key


async def messages(system: System) -> list[delivery_pb2.Message]:
    reply = await system.delivery.ListMessages(
        delivery_pb2.ListMessagesRequest(), metadata=token(TENANT, "read")
    )
    return list(reply.messages)


async def final_message(system: System, key: str) -> delivery_pb2.Message | None:
    for m in await messages(system):
        if m.idempotency_key == key and m.status in FINAL:
            return m
    return None


def receiver(tmp_path: Path, clock: ManualClock) -> WebhookReceiver:
    """The local receiver on loopback, checking signatures against the test's clock."""
    return WebhookReceiver(tmp_path / "hooks", now=clock.now)
