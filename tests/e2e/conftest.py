"""The whole system in the test process: three real services over real PostgreSQL and NATS."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass, replace
from datetime import timedelta
from pathlib import Path

import grpc
import pytest_asyncio
from google.protobuf import duration_pb2

from relevans.cli.services import builder
from relevans.common.v1 import common_pb2
from relevans.delivery.v1 import delivery_pb2, delivery_pb2_grpc
from relevans.kit.auth import mint_token
from relevans.kit.clock import ManualClock
from relevans.kit.grpc_client import bearer
from relevans.kit.server import ServiceHost
from relevans.kit.settings import Settings
from relevans.local.smtp_sink import SmtpSink
from relevans.profile.v1 import profile_pb2, profile_pb2_grpc
from relevans.trigger.v1 import trigger_pb2, trigger_pb2_grpc
from tests.conftest import TEST_SECRET

CART_DELAY = timedelta(hours=4)
TEMPLATE_SUBJECT = "{{ first_name | fallback('Hello') }}, your cart is waiting"
TEMPLATE_BODY = "Hi {{ first_name | fallback('there') }},\nyou left {{ event.product_name }} in your cart.\n"


@dataclass
class System:
    settings: Settings
    clock: ManualClock
    sink: SmtpSink
    hosts: dict[str, ServiceHost]
    channels: dict[str, grpc.aio.Channel]

    def token(self, tenant: str, *scopes: str) -> tuple[tuple[str, str]]:
        return bearer(mint_token(TEST_SECRET, tenant, list(scopes) or ["admin"]))

    @property
    def profiles(self) -> profile_pb2_grpc.ProfileServiceStub:
        return profile_pb2_grpc.ProfileServiceStub(self.channels["profile"])

    @property
    def triggers(self) -> trigger_pb2_grpc.TriggerServiceStub:
        return trigger_pb2_grpc.TriggerServiceStub(self.channels["trigger"])

    @property
    def delivery(self) -> delivery_pb2_grpc.DeliveryServiceStub:
        return delivery_pb2_grpc.DeliveryServiceStub(self.channels["delivery"])

    async def start(self, service: str) -> None:
        host = await builder(service)(self.settings, self.clock)
        await host.start()
        self.hosts[service] = host
        self.settings = replace(self.settings, **{f"{service}_listen": f"127.0.0.1:{host.port}"})
        if service == "profile":
            self.settings = replace(self.settings, profile_target=f"127.0.0.1:{host.port}")
        if service in self.channels:
            await self.channels[service].close()
        self.channels[service] = grpc.aio.insecure_channel(f"127.0.0.1:{host.port}")

    async def kill(self, service: str) -> None:
        """Stop a service abruptly, as a crash would."""
        await self.hosts.pop(service).kill()

    async def close(self) -> None:
        for channel in self.channels.values():
            await channel.close()
        for host in reversed(list(self.hosts.values())):
            await host.stop()
        await self.sink.stop()

    def mails_to(self, address: str) -> list:  # type: ignore[type-arg]
        return [m for m in self.sink.messages() if address in str(m["To"])]

    async def setup_abandoned_cart(self, tenant: str, delay: timedelta = CART_DELAY) -> None:
        md = self.token(tenant, "admin")
        await self.delivery.PutTemplate(
            delivery_pb2.PutTemplateRequest(
                template=delivery_pb2.Template(
                    template_id="cart-reminder",
                    channel=common_pb2.CHANNEL_EMAIL,
                    subject=TEMPLATE_SUBJECT,
                    body_text=TEMPLATE_BODY,
                )
            ),
            metadata=md,
        )
        await self.triggers.CreateTrigger(
            trigger_pb2.CreateTriggerRequest(
                trigger=trigger_pb2.Trigger(
                    trigger_id="abandoned-cart",
                    absence=trigger_pb2.AbsenceCondition(
                        start_event_type="add_to_cart",
                        cancel_event_type="purchase",
                        delay=duration_pb2.Duration(seconds=int(delay.total_seconds())),
                    ),
                    channel=common_pb2.CHANNEL_EMAIL,
                    purpose=common_pb2.PURPOSE_MARKETING,
                    template_id="cart-reminder",
                )
            ),
            metadata=md,
        )

    async def customer(self, tenant: str, email: str, first_name: str = "", consent: bool = True) -> str:
        consents = (
            [
                profile_pb2.ConsentInput(
                    purpose=common_pb2.PURPOSE_MARKETING,
                    channel=common_pb2.CHANNEL_EMAIL,
                    status=common_pb2.CONSENT_STATUS_GRANTED,
                    source="signup_form",
                )
            ]
            if consent
            else []
        )
        reply = await self.profiles.Identify(
            profile_pb2.IdentifyRequest(email=email, first_name=first_name, consents=consents),
            metadata=self.token(tenant, "ingest"),
        )
        return str(reply.profile.profile_id)

    async def track(
        self, tenant: str, email: str, event_type: str, message_id: str = "", **props: object
    ) -> None:
        event = profile_pb2.Event(type=event_type, email=email, message_id=message_id)
        event.timestamp.FromDatetime(self.clock.now())
        event.properties.update(props)
        await self.profiles.Track(
            profile_pb2.TrackRequest(event=event), metadata=self.token(tenant, "ingest")
        )


@pytest_asyncio.fixture
async def system(settings: Settings, clock: ManualClock, tmp_path: Path) -> AsyncIterator[System]:
    sink = SmtpSink(tmp_path / "mail")
    await sink.start()
    sys_ = System(replace(settings, smtp_port=sink.port), clock, sink, {}, {})
    try:
        for service in ("profile", "trigger", "delivery"):
            await sys_.start(service)
        yield sys_
    finally:
        await sys_.close()
