"""Assembles the delivery service: database, bus, outbox relay, gRPC servicer, consumers, and the
HTTP endpoint of the links in its messages."""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from datetime import datetime

from sqlalchemy.ext.asyncio import AsyncConnection

from relevans.kit.clock import Clock
from relevans.kit.erasure import Erased
from relevans.kit.merges import ProfileMerge
from relevans.kit.runtime import open_runtime
from relevans.kit.server import ServiceHost
from relevans.kit.settings import Settings
from services.delivery.banner_inbox import BannerBoard, Expiry, Withdrawals, withdrawal_consumers
from services.delivery.banner_rows import BannerRows
from services.delivery.channels import open_transports, rate_limits
from services.delivery.channels.address_guard import AddressGuard, AddressRules
from services.delivery.channels.base import Closing
from services.delivery.channels.web import WebTransport
from services.delivery.channels.webhook import WebhookNetwork
from services.delivery.consumers import DURABLE, request_consumer
from services.delivery.domain import Renderer, RetryPolicy
from services.delivery.domain.channels.web import WEB
from services.delivery.engagements import UnsubscribeAwareProfiles
from services.delivery.http_endpoint import open_tracking
from services.delivery.previews import Previews
from services.delivery.retries import RetrySchedule, RetryWorker
from services.delivery.servicer import DeliveryServicer, binding
from services.delivery.store import DeliveryStore
from services.delivery.tables import outbox
from services.delivery.template_rows import TemplateRows
from services.delivery.test_sends import SendTestHandler
from services.delivery.webhook_rows import WebhookRows
from services.delivery.worker import DeliveryWorker

SERVICE = "delivery"


def new_message_id() -> str:
    return str(uuid.uuid4())


async def build(
    settings: Settings, clock: Clock, *, webhook_network: WebhookNetwork | None = None
) -> ServiceHost:
    """The delivery service, not yet started; the caller migrates its database first.
    `webhook_network`: how webhooks resolve names and connect (tests inject it)."""
    rt = await open_runtime(SERVICE, settings, clock, outbox)
    # the send path's own connections: every statement by key, planned for its batch (see
    # create_engine; a plan kept from when `messages` was nearly empty read all of it per batch)
    store = DeliveryStore(rt.engine, rt.lookup_engine(plan_each_run=True))
    renderer = Renderer()
    profiles = UnsubscribeAwareProfiles(
        settings.profile_target,
        deadline_s=settings.delivery_profile_deadline,
        secret=settings.token_secret,
        clock=clock,
        engine=rt.engine,
    )
    tracking = open_tracking(settings, rt.engine, profiles.channel, clock, notify_relay=rt.relay.notify)
    banner_rows = BannerRows(rt.engine)
    banners = BannerBoard(banner_rows, rt.bus, clock)
    await banners.load()
    transports = {
        **open_transports(
            settings, engine=rt.engine, clock=clock, webhook_network=webhook_network, links=tracking.links
        ),
        WEB: WebTransport(banner_rows, clock, rt.relay.notify),
    }
    worker = DeliveryWorker(
        store,
        profiles,
        transports,
        renderer,
        clock,
        make_id=new_message_id,
        notify=rt.relay.notify,
        retry_policy=RetryPolicy(settings.delivery_retry_delay, settings.delivery_retry_max_delay),
        rate_limits=rate_limits(settings),
    )
    network = webhook_network or WebhookNetwork()
    templates = TemplateRows(rt.engine)
    previews = Previews(templates, profiles, renderer)
    test_sends = SendTestHandler(store, previews, transports, clock, make_id=new_message_id)
    servicer = DeliveryServicer(
        store,
        templates,
        previews,
        test_sends,
        renderer,
        clock,
        webhooks=WebhookRows(rt.engine),
        address_guard=AddressGuard(AddressRules.from_settings(settings), network.resolve),
        banners=banners,
    )
    host = rt.host([binding(servicer)])
    host.add_worker(DURABLE, request_consumer(rt.bus, worker).run)
    host.add_worker("delivery-retries", RetryWorker(RetrySchedule(rt.engine), worker, clock).run)
    host.add_worker("delivery-banners", banners.run)
    host.add_worker("delivery-banner-shows", banners.flush_shows)
    host.add_worker("delivery-banner-expiry", Expiry(banner_rows, clock, rt.relay.notify).run)
    withdrawals = Withdrawals(rt.engine, banner_rows, clock, rt.relay.notify)
    for consumer in withdrawal_consumers(rt.bus, withdrawals):
        host.add_worker(consumer.durable, consumer.run)

    async def merge_people(conn: AsyncConnection, merges: Sequence[ProfileMerge], now: datetime) -> None:
        await store.merge_people(conn, merges, now)
        await banner_rows.merge_people(conn, merges, now)

    async def purge_people(conn: AsyncConnection, erased: Sequence[Erased], now: datetime) -> None:
        await store.purge_people(conn, erased, now)
        await banner_rows.purge_people(conn, erased, now)

    rt.follow_people(host, merge_people=merge_people, purge_people=purge_people)
    tracking.attach(host)
    host.add_closer(profiles.close)
    for transport in transports.values():
        if isinstance(transport, Closing):
            host.add_closer(transport.close)
    return host
