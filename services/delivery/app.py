"""Assembles the delivery service: database, bus, outbox relay, gRPC servicer, consumers, and the
HTTP endpoint of the links in its messages."""

from __future__ import annotations

import uuid

from relevans.kit.clock import Clock
from relevans.kit.runtime import open_runtime
from relevans.kit.server import ServiceHost
from relevans.kit.settings import Settings
from services.delivery.channels import open_transports, rate_limits
from services.delivery.channels.address_guard import AddressGuard, AddressRules
from services.delivery.channels.base import Closing
from services.delivery.channels.webhook import WebhookNetwork
from services.delivery.consumers import DURABLE, request_consumer
from services.delivery.domain import Renderer, RetryPolicy
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
    store = DeliveryStore(rt.engine)
    renderer = Renderer()
    profiles = UnsubscribeAwareProfiles(
        settings.profile_target,
        deadline_s=settings.call_deadline,
        secret=settings.token_secret,
        clock=clock,
        engine=rt.engine,
    )
    tracking = open_tracking(settings, rt.engine, profiles.channel, clock, notify_relay=rt.relay.notify)
    transports = open_transports(
        settings, engine=rt.engine, clock=clock, webhook_network=webhook_network, links=tracking.links
    )
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
    )
    host = rt.host([binding(servicer)])
    host.add_worker(DURABLE, request_consumer(rt.bus, worker).run)
    host.add_worker("delivery-retries", RetryWorker(RetrySchedule(rt.engine), worker, clock).run)
    rt.follow_people(host, merge_people=store.merge_people, purge_people=store.purge_people)
    tracking.attach(host)
    host.add_closer(profiles.close)
    for transport in transports.values():
        if isinstance(transport, Closing):
            host.add_closer(transport.close)
    return host
