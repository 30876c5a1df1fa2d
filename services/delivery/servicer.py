"""The gRPC face of the delivery service: proto -> domain -> store -> proto, nothing more."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import grpc

from relevans.common.v1 import common_pb2
from relevans.delivery.v1 import delivery_pb2, delivery_pb2_grpc
from relevans.kit.clock import Clock
from relevans.kit.enums import enum_name, enum_value
from relevans.kit.errors import FieldViolation, InvalidArgument
from relevans.kit.paging import encode_page_token
from relevans.kit.proto import checked_duration, from_struct, to_duration, to_timestamp
from relevans.kit.server import ServiceBinding, principal
from services.delivery.banner_inbox import BannerBoard
from services.delivery.channels.address_guard import AddressGuard
from services.delivery.domain import (
    BOUNCED,
    CLICKED,
    FAILED,
    MESSAGE_PAGES,
    OPENED,
    PENDING,
    SENDING,
    SENT,
    SUPPRESSED,
    UNSUBSCRIBED,
    WITHDRAWN,
    MessageRecord,
    RawTemplate,
    Renderer,
    Template,
    check_template_id,
    page_before,
    validate_template,
)
from services.delivery.domain.banners import check_banner_request
from services.delivery.domain.channels.sms import SmsChannel, sms_segments
from services.delivery.domain.settings import TenantSettings, validate_settings
from services.delivery.domain.templates import pick_variant
from services.delivery.domain.webhooks import WebhookEndpoint
from services.delivery.previews import Previews
from services.delivery.store import DeliveryStore
from services.delivery.template_rows import TemplateRows
from services.delivery.test_sends import SendTestHandler, SendTestInput
from services.delivery.webhook_rows import WebhookRows

SERVICE_NAME = "relevans.delivery.v1.DeliveryService"
SCOPES = {
    "PutTemplate": "admin",
    "GetTemplate": "read",
    "PreviewTemplate": "read",
    "SendTest": "admin",
    "GetSettings": "read",
    "UpdateSettings": "admin",
    "GetMessage": "read",
    "ListMessages": "read",
    "PutWebhookEndpoint": "admin",
    "GetWebhookEndpoint": "read",
    "GetBanner": "read",
}

Context = grpc.aio.ServicerContext[Any, Any]

_STATUS = {
    PENDING: delivery_pb2.MESSAGE_STATUS_PENDING,
    SENDING: delivery_pb2.MESSAGE_STATUS_PENDING,
    SENT: delivery_pb2.MESSAGE_STATUS_SENT,
    SUPPRESSED: delivery_pb2.MESSAGE_STATUS_SUPPRESSED,
    FAILED: delivery_pb2.MESSAGE_STATUS_FAILED,
    BOUNCED: delivery_pb2.MESSAGE_STATUS_BOUNCED,
    OPENED: delivery_pb2.MESSAGE_STATUS_OPENED,
    CLICKED: delivery_pb2.MESSAGE_STATUS_CLICKED,
    UNSUBSCRIBED: delivery_pb2.MESSAGE_STATUS_UNSUBSCRIBED,
    WITHDRAWN: delivery_pb2.MESSAGE_STATUS_WITHDRAWN,
}

# ---- proto <-> domain -------------------------------------------------------------------------


def raw_template(t: delivery_pb2.Template) -> RawTemplate:
    return RawTemplate(
        template_id=t.template_id,
        channel=enum_name(common_pb2.Channel, t.channel, "CHANNEL_"),
        locale=t.locale,
        subject=t.subject,
        body_text=t.body_text,
        webhook_endpoint_id=t.webhook_endpoint_id,
        placement=t.placement,
        banner_lifetime=_lifetime(t),
        link_url=t.link_url,
    )


def _lifetime(t: delivery_pb2.Template) -> timedelta | None:
    """The banner lifetime; None when unset or not a valid duration."""
    if not t.HasField("banner_lifetime"):
        return None
    lifetime, bad = checked_duration(t.banner_lifetime)
    return None if bad else lifetime


def template_proto(t: Template) -> delivery_pb2.Template:
    return delivery_pb2.Template(
        template_id=t.template_id,
        channel=enum_value(common_pb2.Channel, t.channel, "CHANNEL_"),
        locale=t.locale,
        subject=t.subject,
        body_text=t.body_text,
        update_time=to_timestamp(t.updated_at),
        webhook_endpoint_id=t.webhook_endpoint_id,
        placement=t.placement,
        banner_lifetime=to_duration(t.banner_lifetime) if t.banner_lifetime is not None else None,
        link_url=t.link_url,
    )


def endpoint_proto(e: WebhookEndpoint, *, with_secret: bool) -> delivery_pb2.WebhookEndpoint:
    proto = delivery_pb2.WebhookEndpoint(
        endpoint_id=e.endpoint_id,
        url=e.url,
        secret=e.secret if with_secret else "",
        update_time=to_timestamp(e.updated_at),
    )
    proto.timeout.FromTimedelta(e.timeout)
    return proto


def message_proto(m: MessageRecord) -> delivery_pb2.Message:
    return delivery_pb2.Message(
        message_id=m.message_id,
        idempotency_key=m.idempotency_key,
        profile_id=m.profile_id,
        trigger_id=m.trigger_id,
        channel=enum_value(common_pb2.Channel, m.channel, "CHANNEL_"),
        template_id=m.template_id,
        status=_STATUS.get(m.status, delivery_pb2.MESSAGE_STATUS_UNSPECIFIED),
        reason=m.reason,
        recipient=m.recipient,
        subject=m.subject,
        history=[
            delivery_pb2.StatusChange(
                status=_STATUS.get(c.status, delivery_pb2.MESSAGE_STATUS_UNSPECIFIED),
                reason=c.reason,
                time=to_timestamp(c.at),
            )
            for c in m.history
        ],
        create_time=to_timestamp(m.created_at),
        sms_segments=m.sms_segments,
        attempts=m.attempts,
        test=m.test,
        locale=m.locale,
    )


def settings_proto(s: TenantSettings) -> delivery_pb2.Settings:
    return delivery_pb2.Settings(default_locale=s.default_locale, update_time=to_timestamp(s.updated_at))


# ---- servicer -----------------------------------------------------------------------------------


class DeliveryServicer(delivery_pb2_grpc.DeliveryServiceServicer):
    def __init__(
        self,
        store: DeliveryStore,
        templates: TemplateRows,
        previews: Previews,
        test_sends: SendTestHandler,
        renderer: Renderer,
        clock: Clock,
        *,
        webhooks: WebhookRows,
        address_guard: AddressGuard,
        banners: BannerBoard,
    ) -> None:
        self.store = store
        self.templates = templates
        self.previews = previews
        self.test_sends = test_sends
        self.renderer = renderer
        self.clock = clock
        self.webhooks = webhooks
        self.address_guard = address_guard
        self.banners = banners

    async def PutTemplate(
        self, request: delivery_pb2.PutTemplateRequest, context: Context
    ) -> delivery_pb2.PutTemplateResponse:
        tenant = principal().tenant_id
        raw = raw_template(request.template) if request.HasField("template") else None
        settings = await self.templates.settings(tenant)
        template = validate_template(raw, self.renderer, settings.default_locale)
        if template.webhook_endpoint_id:
            found = await self.webhooks.load([(tenant, template.webhook_endpoint_id)])
            if not found:
                raise InvalidArgument(
                    FieldViolation("template.webhook_endpoint_id", "no such webhook endpoint")
                )
        stored = await self.templates.put(tenant, template, self.clock.now())
        return delivery_pb2.PutTemplateResponse(template=template_proto(stored))

    async def GetTemplate(
        self, request: delivery_pb2.GetTemplateRequest, context: Context
    ) -> delivery_pb2.GetTemplateResponse:
        tenant = principal().tenant_id
        variants = await self.templates.variants(tenant, check_template_id(request.template_id))
        settings = await self.templates.settings(tenant)
        found = pick_variant(variants, "", settings.default_locale) or variants[0]
        return delivery_pb2.GetTemplateResponse(template=template_proto(found))

    async def PreviewTemplate(
        self, request: delivery_pb2.PreviewTemplateRequest, context: Context
    ) -> delivery_pb2.PreviewTemplateResponse:
        tenant = principal().tenant_id
        template_id = check_template_id(request.template_id)
        self.previews.check(request.profile_id, request.locale)
        variants = await self.previews.variants(tenant, template_id)
        person = await self.previews.person(tenant, request.profile_id)
        preview = await self.previews.render(
            tenant, variants, from_struct(request.variables), profile=person, locale=request.locale
        )
        body = preview.rendered.body_text
        segments = sms_segments(body).count if preview.template.channel == SmsChannel.name else 0
        return delivery_pb2.PreviewTemplateResponse(
            subject=preview.rendered.subject,
            body_text=body,
            locale=preview.template.locale,
            sms_segments=segments,
            link_url=preview.link_url,
        )

    async def SendTest(
        self, request: delivery_pb2.SendTestRequest, context: Context
    ) -> delivery_pb2.SendTestResponse:
        tenant = principal().tenant_id
        sent = await self.test_sends.send(
            tenant,
            SendTestInput(
                template_id=request.template_id,
                recipient=request.recipient,
                variables=from_struct(request.variables),
                profile_id=request.profile_id,
                locale=request.locale,
            ),
        )
        return delivery_pb2.SendTestResponse(message=message_proto(sent))

    async def GetSettings(
        self, request: delivery_pb2.GetSettingsRequest, context: Context
    ) -> delivery_pb2.GetSettingsResponse:
        tenant = principal().tenant_id
        found = await self.templates.settings(tenant)
        return delivery_pb2.GetSettingsResponse(settings=settings_proto(found))

    async def UpdateSettings(
        self, request: delivery_pb2.UpdateSettingsRequest, context: Context
    ) -> delivery_pb2.UpdateSettingsResponse:
        tenant = principal().tenant_id
        wanted = (
            TenantSettings(default_locale=request.settings.default_locale)
            if request.HasField("settings")
            else None
        )
        stored = await self.templates.update_settings(tenant, validate_settings(wanted), self.clock.now())
        return delivery_pb2.UpdateSettingsResponse(settings=settings_proto(stored))

    async def GetMessage(
        self, request: delivery_pb2.GetMessageRequest, context: Context
    ) -> delivery_pb2.GetMessageResponse:
        tenant = principal().tenant_id
        if not request.message_id:
            raise InvalidArgument(FieldViolation("message_id", "is required"))
        found = await self.store.get_message(tenant, request.message_id)
        return delivery_pb2.GetMessageResponse(message=message_proto(found))

    async def ListMessages(
        self, request: delivery_pb2.ListMessagesRequest, context: Context
    ) -> delivery_pb2.ListMessagesResponse:
        tenant = principal().tenant_id
        size = MESSAGE_PAGES.of(request.page_size)
        before = page_before(request.page_token, request.profile_id)
        found = await self.store.list_messages(
            tenant, profile_id=request.profile_id, before_seq=before, limit=size + 1
        )
        page, more = found[:size], len(found) > size
        return delivery_pb2.ListMessagesResponse(
            messages=[message_proto(m) for m in page],
            next_page_token=encode_page_token(before=page[-1].seq, profile=request.profile_id)
            if more
            else "",
        )

    async def GetBanner(  # type: ignore[override]  # answers bytes: see register()
        self, request: delivery_pb2.GetBannerRequest, context: Context
    ) -> bytes:
        """From this process's inbox alone: no database round trip. The answer is the
        GetBannerResponse already serialized (registered with a serializer that passes it on)."""
        tenant = principal().tenant_id
        check_banner_request(request.profile_id, request.anonymous_id, request.placement)
        return self.banners.answer(
            tenant, request.placement, profile_id=request.profile_id, anonymous_id=request.anonymous_id
        )

    async def PutWebhookEndpoint(
        self, request: delivery_pb2.PutWebhookEndpointRequest, context: Context
    ) -> delivery_pb2.PutWebhookEndpointResponse:
        tenant = principal().tenant_id
        if not request.HasField("endpoint"):
            raise InvalidArgument(FieldViolation("endpoint", "is required"))
        e = request.endpoint
        endpoint = await self.address_guard.endpoint_to_save(
            e.endpoint_id, e.url, e.timeout.seconds + e.timeout.nanos / 1e9
        )
        stored, fresh_secret = await self.webhooks.put(
            tenant, endpoint, self.clock.now(), rotate_secret=request.rotate_secret
        )
        return delivery_pb2.PutWebhookEndpointResponse(
            endpoint=endpoint_proto(stored, with_secret=fresh_secret)
        )

    async def GetWebhookEndpoint(
        self, request: delivery_pb2.GetWebhookEndpointRequest, context: Context
    ) -> delivery_pb2.GetWebhookEndpointResponse:
        tenant = principal().tenant_id
        found = await self.webhooks.get(tenant, check_template_id(request.endpoint_id, "endpoint_id"))
        return delivery_pb2.GetWebhookEndpointResponse(endpoint=endpoint_proto(found, with_secret=False))


def _as_is(answer: bytes) -> bytes:
    return answer


def register(servicer: DeliveryServicer, server: grpc.aio.Server) -> None:
    """The generated registration, but GetBanner's handler answers bytes. gRPC asks the generic
    handlers in the order they were added (the first that knows a method serves it), and looks
    registered methods up by name (a later one replaces an earlier)."""
    get_banner = {
        "GetBanner": grpc.unary_unary_rpc_method_handler(
            servicer.GetBanner,
            request_deserializer=delivery_pb2.GetBannerRequest.FromString,
            response_serializer=_as_is,
        )
    }
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE_NAME, get_banner),))
    delivery_pb2_grpc.add_DeliveryServiceServicer_to_server(servicer, server)
    server.add_registered_method_handlers(SERVICE_NAME, get_banner)  # type: ignore[attr-defined]  # not in the stubs


def binding(servicer: DeliveryServicer) -> ServiceBinding:
    return ServiceBinding(
        full_name=SERVICE_NAME,
        register=register,
        servicer=servicer,
        scopes=SCOPES,
    )
