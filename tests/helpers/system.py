"""The whole system in the test process: three real services over real PostgreSQL and NATS, an SMTP
sink, an SMS sink and a manual clock, and what a test does with them as a shop would. The `system` fixture
(tests/conftest.py) starts it."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, replace
from datetime import timedelta
from typing import Any

import grpc
import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncConnection

from relevans.cli.services import builder
from relevans.common.v1 import common_pb2
from relevans.delivery.v1 import delivery_pb2, delivery_pb2_grpc
from relevans.kit.clock import ManualClock
from relevans.kit.db import create_engine
from relevans.kit.server import ServiceHost
from relevans.kit.settings import Settings
from relevans.local.sms_sink import SmsSink, StoredSms
from relevans.local.smtp_sink import SmtpSink
from relevans.profile.v1 import profile_pb2, profile_pb2_grpc
from relevans.trigger.v1 import trigger_pb2, trigger_pb2_grpc
from tests.helpers.auth import token
from tests.helpers.cart import BODY, DELAY, SUBJECT, TEMPLATE_ID, cart_trigger


@dataclass
class System:
    settings: Settings
    clock: ManualClock
    sink: SmtpSink
    hosts: dict[str, ServiceHost]
    channels: dict[str, grpc.aio.Channel]
    sms_sink: SmsSink | None = None

    token = staticmethod(token)

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
        # together, as `relevans up` stops them: each waits up to half a second for its bus
        # consumers' last pulls, which one after the other added up in every test's teardown
        await asyncio.gather(*(host.stop() for host in self.hosts.values()))
        await self.sink.stop()
        if self.sms_sink is not None:
            await self.sms_sink.stop()

    async def erasure_done(self, tenant: str, erasure_id: str) -> profile_pb2.GetErasureResponse | None:
        """The erasure's state once every service has done its part, else None."""
        reply: profile_pb2.GetErasureResponse = await self.profiles.GetErasure(
            profile_pb2.GetErasureRequest(erasure_id=erasure_id), metadata=self.token(tenant, "admin")
        )
        return reply if reply.state == profile_pb2.ERASURE_STATE_DONE else None

    @asynccontextmanager
    async def database(self, service: str) -> AsyncIterator[AsyncConnection]:
        """A connection to `service`'s database, to look at what the service wrote."""
        engine = create_engine(self.settings.database_url(service), pool_size=1)
        try:
            async with engine.connect() as conn:
                yield conn
        finally:
            await engine.dispose()

    async def rows(self, service: str, sql: str, **params: object) -> list[sa.Row[Any]]:
        async with self.database(service) as conn:
            return list((await conn.execute(sa.text(sql), params)).all())

    async def scalar(self, service: str, sql: str, **params: object) -> int:
        async with self.database(service) as conn:
            return int(await conn.scalar(sa.text(sql), params) or 0)

    def mails_to(self, address: str) -> list:  # type: ignore[type-arg]
        return [m for m in self.sink.messages() if address in str(m["To"])]

    def texts_to(self, phone: str) -> list[StoredSms]:
        return [t for t in (self.sms_sink.messages() if self.sms_sink else []) if t.to == phone]

    async def setup_abandoned_cart(self, tenant: str, delay: timedelta = DELAY) -> None:
        md = self.token(tenant, "admin")
        await self.delivery.PutTemplate(
            delivery_pb2.PutTemplateRequest(
                template=delivery_pb2.Template(
                    template_id=TEMPLATE_ID,
                    channel=common_pb2.CHANNEL_EMAIL,
                    subject=SUBJECT,
                    body_text=BODY,
                )
            ),
            metadata=md,
        )
        await self.triggers.CreateTrigger(
            trigger_pb2.CreateTriggerRequest(trigger=cart_trigger(delay=delay)), metadata=md
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
