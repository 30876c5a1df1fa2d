"""The delivery service running for a test, with the profile service it asks for addresses and
consent, an SMTP sink and an SMS sink that keep what they receive, and delivery requests published
by the test."""

from __future__ import annotations

import asyncio
import uuid
from dataclasses import replace
from email.message import EmailMessage
from pathlib import Path
from typing import TYPE_CHECKING, Any

import grpc
import nats
from nats.js import JetStreamContext
from sqlalchemy.ext.asyncio import AsyncEngine

from relevans.common.v1 import common_pb2
from relevans.delivery.v1 import bus_pb2, delivery_pb2, delivery_pb2_grpc
from relevans.kit.clock import ManualClock
from relevans.kit.db import create_engine
from relevans.kit.proto import to_struct
from relevans.kit.server import ServiceHost
from relevans.kit.settings import Settings
from relevans.local.embedded import free_port
from relevans.local.sms_sink import SmsSink, StoredSms
from relevans.local.smtp_sink import SmtpScript, SmtpSink
from relevans.profile.v1 import profile_pb2, profile_pb2_grpc
from services.delivery.app import build
from services.profile.app import build as build_profile
from tests.helpers import eventually
from tests.helpers.auth import Tokens
from tests.helpers.cart import BODY, SUBJECT, TEMPLATE_ID

if TYPE_CHECKING:
    from relevans.delivery.v1.delivery_pb2_grpc import DeliveryServiceAsyncStub
    from relevans.profile.v1.profile_pb2_grpc import ProfileServiceAsyncStub

TENANT = "shop"
EMAIL = "ada@example.com"
token = Tokens(TENANT)


class Harness:
    """The profile service, an SMTP sink, an SMS sink, the delivery service and a JetStream client."""

    def __init__(self, settings: Settings, clock: ManualClock, nats_url: str, mail_dir: Path) -> None:
        self.settings = settings
        self.clock = clock
        self.nats_url = nats_url
        self.mail_dir = mail_dir
        self.hosts: list[ServiceHost] = []
        self.channels: list[grpc.aio.Channel] = []
        self.sink: SmtpSink | None = None
        self.sms_sink: SmsSink | None = None
        self.smtp_servers: list[asyncio.Server] = []
        self.engine: AsyncEngine = create_engine(settings.database_url("delivery"), pool_size=2)
        self._nc: Any = None
        self._js: JetStreamContext | None = None
        self.profiles: ProfileServiceAsyncStub
        self.delivery: DeliveryServiceAsyncStub

    async def start(
        self,
        *,
        smtp_port: int | None = None,
        sink: bool = True,
        script: SmtpScript | None = None,
        sms_provider_url: str | None = None,
    ) -> None:
        """Start the services: an SMTP sink unless `sink` is False (answering as `script` says), and
        an SMS sink unless `sms_provider_url` names another provider."""
        profile_host = await build_profile(self.settings, self.clock)
        await profile_host.start()
        self.hosts.append(profile_host)
        if sink:
            self.sink = SmtpSink(self.mail_dir, port=smtp_port or 0, script=script)
            await self.sink.start()
            smtp_port = self.sink.port
        if sms_provider_url is None:
            self.sms_sink = SmsSink(self.mail_dir.with_name(self.mail_dir.name + "-sms"))
            await self.sms_sink.start()
            sms_provider_url = self.sms_sink.url
        self.settings = replace(
            self.settings,
            profile_target=f"127.0.0.1:{profile_host.port}",
            smtp_port=smtp_port or free_port(),
            sms_provider_url=sms_provider_url,
        )
        delivery_host = await build(self.settings, self.clock)
        await delivery_host.start()
        self.hosts.append(delivery_host)
        profile_channel = grpc.aio.insecure_channel(f"127.0.0.1:{profile_host.port}")
        delivery_channel = grpc.aio.insecure_channel(f"127.0.0.1:{delivery_host.port}")
        self.channels += [profile_channel, delivery_channel]
        self.profiles = profile_pb2_grpc.ProfileServiceStub(profile_channel)
        self.delivery = delivery_pb2_grpc.DeliveryServiceStub(delivery_channel)
        self._nc = await nats.connect(self.nats_url)
        self._js = self._nc.jetstream()

    async def start_sink(self, port: int) -> None:
        self.sink = SmtpSink(self.mail_dir, port=port)
        await self.sink.start()

    async def close(self) -> None:
        for channel in self.channels:
            await channel.close(None)
        await asyncio.gather(*(host.stop() for host in self.hosts))  # together, as in System.close
        if self.sink is not None:
            await self.sink.stop()
        if self.sms_sink is not None:
            await self.sms_sink.stop()
        for server in self.smtp_servers:
            server.close()
            await server.wait_closed()
        if self._nc is not None:
            await self._nc.close()
        await self.engine.dispose()

    @property
    def js(self) -> JetStreamContext:
        assert self._js is not None
        return self._js

    # -- profile and templates

    async def customer(
        self,
        email: str = EMAIL,
        first_name: str = "Ada",
        consent: int = common_pb2.CONSENT_STATUS_GRANTED,
        tenant: str = TENANT,
    ) -> str:
        consents = [
            profile_pb2.ConsentInput(
                purpose=common_pb2.PURPOSE_MARKETING,
                channel=common_pb2.CHANNEL_EMAIL,
                status=consent,  # type: ignore[arg-type]
                source="signup_form",
            )
        ]
        reply = await self.profiles.Identify(
            profile_pb2.IdentifyRequest(
                email=email, first_name=first_name, consents=consents if consent else []
            ),
            metadata=token(tenant, "ingest"),
        )
        return str(reply.profile.profile_id)

    async def set_consent(self, profile_id: str, status: int) -> None:
        await self.profiles.SetConsent(
            profile_pb2.SetConsentRequest(
                profile_id=profile_id,
                consent=profile_pb2.ConsentInput(
                    purpose=common_pb2.PURPOSE_MARKETING,
                    channel=common_pb2.CHANNEL_EMAIL,
                    status=status,  # type: ignore[arg-type]
                    source="unsubscribe_link",
                ),
            ),
            metadata=token(TENANT, "ingest"),
        )

    async def sms_customer(
        self, phone: str, first_name: str = "Ada", consent: int = common_pb2.CONSENT_STATUS_GRANTED
    ) -> str:
        """A person with a `phone` trait and marketing consent for SMS (none when `consent` is 0)."""
        consents = [
            profile_pb2.ConsentInput(
                purpose=common_pb2.PURPOSE_MARKETING,
                channel=common_pb2.CHANNEL_SMS,
                status=consent,  # type: ignore[arg-type]
                source="signup_form",
            )
        ]
        request = profile_pb2.IdentifyRequest(
            customer_id=f"c-{uuid.uuid4().hex}", first_name=first_name, consents=consents if consent else []
        )
        request.traits.update({"phone": phone})
        reply = await self.profiles.Identify(request, metadata=token(TENANT, "ingest"))
        return str(reply.profile.profile_id)

    async def put_sms_template(self, body: str, template_id: str = "cart-sms") -> delivery_pb2.Template:
        reply = await self.delivery.PutTemplate(
            delivery_pb2.PutTemplateRequest(
                template=delivery_pb2.Template(
                    template_id=template_id, channel=common_pb2.CHANNEL_SMS, body_text=body
                )
            ),
            metadata=token(TENANT, "admin"),
        )
        return reply.template

    async def put_template(
        self, template_id: str = TEMPLATE_ID, subject: str = SUBJECT, body: str = BODY, tenant: str = TENANT
    ) -> delivery_pb2.Template:
        reply = await self.delivery.PutTemplate(
            delivery_pb2.PutTemplateRequest(
                template=delivery_pb2.Template(
                    template_id=template_id, channel=common_pb2.CHANNEL_EMAIL, subject=subject, body_text=body
                )
            ),
            metadata=token(tenant, "admin"),
        )
        return reply.template

    # -- requests, messages, mail

    async def request(
        self,
        profile_id: str,
        key: str | None = None,
        *,
        template_id: str = TEMPLATE_ID,
        purpose: int = common_pb2.PURPOSE_MARKETING,
        tenant: str = TENANT,
        channel: int = common_pb2.CHANNEL_EMAIL,
        **variables: Any,
    ) -> str:
        key = key or f"abandoned-cart:{profile_id}:{uuid.uuid4().hex}"
        msg = bus_pb2.DeliveryRequest(
            idempotency_key=key,
            tenant_id=tenant,
            profile_id=profile_id,
            trigger_id="abandoned-cart",
            channel=channel,  # type: ignore[arg-type]
            purpose=purpose,  # type: ignore[arg-type]
            template_id=template_id,
            variables=to_struct(variables or {"event": {"product_name": "Blue running shoes"}}),
        )
        await self.js.publish("rv.delivery.requests", msg.SerializeToString())
        return key

    async def messages(self, tenant: str = TENANT, profile_id: str = "") -> list[delivery_pb2.Message]:
        reply = await self.delivery.ListMessages(
            delivery_pb2.ListMessagesRequest(profile_id=profile_id), metadata=token(tenant, "read")
        )
        return list(reply.messages)

    async def message(self, key: str, *statuses: int) -> delivery_pb2.Message | None:
        """The message of an idempotency key once it has one of `statuses` (any status if none)."""
        for m in await self.messages():
            if m.idempotency_key == key and (not statuses or m.status in statuses):
                return m
        return None

    async def final(self, key: str) -> delivery_pb2.Message:
        final = (
            delivery_pb2.MESSAGE_STATUS_SENT,
            delivery_pb2.MESSAGE_STATUS_SUPPRESSED,
            delivery_pb2.MESSAGE_STATUS_FAILED,
            delivery_pb2.MESSAGE_STATUS_BOUNCED,
        )
        found = await eventually(lambda: self.message(key, *final))
        assert found is not None
        return found

    def mails(self) -> list[EmailMessage]:
        return self.sink.messages() if self.sink is not None else []

    def texts(self) -> list[StoredSms]:
        return self.sms_sink.messages() if self.sms_sink is not None else []

    async def some_mail(self) -> list[EmailMessage]:
        return self.mails()

    async def more_than_one_mail(self) -> bool:
        return len(self.mails()) > 1

    async def requests_done(self) -> bool:
        info = await self.js.consumer_info("RV_DELIVERY_REQUESTS", "delivery-requests")
        return not info.num_pending and not info.num_ack_pending

    async def status_events(self) -> list[tuple[str | None, bus_pb2.DeliveryStatusChanged]]:
        info = await self.js.stream_info("RV_DELIVERY_STATUS")
        out = []
        for seq in range(info.state.first_seq, info.state.last_seq + 1):
            if not info.state.messages:
                break
            raw = await self.js.get_msg("RV_DELIVERY_STATUS", seq)
            out.append((raw.subject, bus_pb2.DeliveryStatusChanged.FromString(raw.data or b"")))
        return out
