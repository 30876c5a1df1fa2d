"""The gRPC face of the delivery service: proto -> domain -> store -> proto, nothing more."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import grpc

from relevans.common.v1 import common_pb2
from relevans.delivery.v1 import delivery_pb2, delivery_pb2_grpc
from relevans.kit.clock import Clock
from relevans.kit.enums import enum_name, enum_value
from relevans.kit.errors import FailedPrecondition, FieldViolation, InvalidArgument
from relevans.kit.paging import encode_page_token
from relevans.kit.proto import checked_duration, from_struct, to_duration, to_timestamp
from relevans.kit.server import ServiceBinding, principal
from services.delivery.banner_inbox import BannerBoard
from services.delivery.domain import (
    FAILED,
    MESSAGE_PAGES,
    OPENED,
    PENDING,
    SENDING,
    SENT,
    SUPPRESSED,
    WITHDRAWN,
    MessageRecord,
    RawTemplate,
    Renderer,
    RenderError,
    Template,
    check_template_id,
    page_before,
    template_variables,
    validate_template,
)
from services.delivery.domain.banners import check_banner_request
from services.delivery.domain.channels.web import MAX_LINK_CHARS
from services.delivery.store import DeliveryStore

SERVICE_NAME = "relevans.delivery.v1.DeliveryService"
SCOPES = {
    "PutTemplate": "admin",
    "GetTemplate": "read",
    "PreviewTemplate": "read",
    "GetMessage": "read",
    "ListMessages": "read",
    "GetBanner": "read",
}

Context = grpc.aio.ServicerContext[Any, Any]

_STATUS = {
    PENDING: delivery_pb2.MESSAGE_STATUS_PENDING,
    SENDING: delivery_pb2.MESSAGE_STATUS_PENDING,
    SENT: delivery_pb2.MESSAGE_STATUS_SENT,
    SUPPRESSED: delivery_pb2.MESSAGE_STATUS_SUPPRESSED,
    FAILED: delivery_pb2.MESSAGE_STATUS_FAILED,
    OPENED: delivery_pb2.MESSAGE_STATUS_OPENED,
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
        placement=t.placement,
        banner_lifetime=to_duration(t.banner_lifetime) if t.banner_lifetime is not None else None,
        link_url=t.link_url,
    )


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
    )


# ---- servicer -----------------------------------------------------------------------------------


class DeliveryServicer(delivery_pb2_grpc.DeliveryServiceServicer):
    def __init__(
        self, store: DeliveryStore, renderer: Renderer, clock: Clock, banners: BannerBoard | None = None
    ) -> None:
        self.store = store
        self.renderer = renderer
        self.clock = clock
        self.banners = banners

    async def PutTemplate(
        self, request: delivery_pb2.PutTemplateRequest, context: Context
    ) -> delivery_pb2.PutTemplateResponse:
        tenant = principal().tenant_id
        raw = raw_template(request.template) if request.HasField("template") else None
        template = validate_template(raw, self.renderer)
        stored = await self.store.put_template(tenant, template, self.clock.now())
        return delivery_pb2.PutTemplateResponse(template=template_proto(stored))

    async def GetTemplate(
        self, request: delivery_pb2.GetTemplateRequest, context: Context
    ) -> delivery_pb2.GetTemplateResponse:
        tenant = principal().tenant_id
        found = await self.store.get_template(tenant, check_template_id(request.template_id))
        return delivery_pb2.GetTemplateResponse(template=template_proto(found))

    async def PreviewTemplate(
        self, request: delivery_pb2.PreviewTemplateRequest, context: Context
    ) -> delivery_pb2.PreviewTemplateResponse:
        tenant = principal().tenant_id
        found = await self.store.get_template(tenant, check_template_id(request.template_id))
        variables = template_variables(from_struct(request.variables))
        try:
            rendered = self.renderer.render(found.subject, found.body_text, variables)
            link = (
                self.renderer.render_line("link_url", found.link_url, variables, MAX_LINK_CHARS)
                if found.link_url
                else ""
            )
        except RenderError as exc:
            raise FailedPrecondition(exc.reason) from None
        return delivery_pb2.PreviewTemplateResponse(
            subject=rendered.subject, body_text=rendered.body_text, link_url=link
        )

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

    async def GetBanner(
        self, request: delivery_pb2.GetBannerRequest, context: Context
    ) -> delivery_pb2.GetBannerResponse:
        """From this process's inbox alone: no database round trip."""
        tenant = principal().tenant_id
        check_banner_request(request.profile_id, request.anonymous_id, request.placement)
        assert self.banners is not None, "the service was built without its banner inbox"
        found = self.banners.banner_for(
            tenant, request.placement, profile_id=request.profile_id, anonymous_id=request.anonymous_id
        )
        return delivery_pb2.GetBannerResponse(banner=found)

    # Contract placeholders while issue 19 is built (each helper replaces its own).
    async def SendTest(self, request: Any, context: Context) -> Any:
        raise NotImplementedError

    async def PutWebhookEndpoint(self, request: Any, context: Context) -> Any:
        raise NotImplementedError

    async def GetWebhookEndpoint(self, request: Any, context: Context) -> Any:
        raise NotImplementedError

    async def GetSettings(self, request: Any, context: Context) -> Any:
        raise NotImplementedError

    async def UpdateSettings(self, request: Any, context: Context) -> Any:
        raise NotImplementedError


def binding(servicer: DeliveryServicer) -> ServiceBinding:
    return ServiceBinding(
        full_name=SERVICE_NAME,
        register=delivery_pb2_grpc.add_DeliveryServiceServicer_to_server,
        servicer=servicer,
        scopes=SCOPES,
    )
