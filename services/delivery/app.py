"""Assembles the delivery service: database, bus, outbox relay, gRPC servicer, consumers, and the
HTTP endpoint of the links in its messages."""

from __future__ import annotations

import uuid

from relevans.kit.clock import Clock
from relevans.kit.runtime import open_runtime
from relevans.kit.server import ServiceHost
from relevans.kit.settings import Settings
from services.delivery.channels import open_transports
from services.delivery.consumers import DURABLE, request_consumer
from services.delivery.domain import Renderer
from services.delivery.domain.tracking import LinkMaker, LinkSigner, tracking_key
from services.delivery.engagements import EngagementStore, ProfileReporter, UnsubscribeAwareProfiles
from services.delivery.http_endpoint import TrackingEndpoint, bind, public_url
from services.delivery.servicer import DeliveryServicer, binding
from services.delivery.store import DeliveryStore
from services.delivery.tables import outbox
from services.delivery.worker import DeliveryWorker

SERVICE = "delivery"


def new_message_id() -> str:
    return str(uuid.uuid4())


async def build(settings: Settings, clock: Clock) -> ServiceHost:
    """The delivery service, not yet started; the caller migrates its database first."""
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
    http_socket = bind(settings.delivery_http_listen)
    signer = LinkSigner(tracking_key(settings.token_secret))
    links = LinkMaker(signer, settings.delivery_public_url or public_url(http_socket))
    reporter = ProfileReporter(
        rt.engine,
        profiles.channel,
        secret=settings.token_secret,
        clock=clock,
        deadline_s=settings.call_deadline,
    )
    endpoint = TrackingEndpoint(
        http_socket,
        signer=signer,
        store=EngagementStore(rt.engine, notify_relay=rt.relay.notify),
        reporter=reporter,
        clock=clock,
        grace_s=settings.shutdown_grace,
    )
    worker = DeliveryWorker(
        store,
        profiles,
        open_transports(settings, links),
        renderer,
        clock,
        make_id=new_message_id,
        notify=rt.relay.notify,
    )
    host = rt.host([binding(DeliveryServicer(store, renderer, clock))])
    host.add_worker(DURABLE, request_consumer(rt.bus, worker).run)
    rt.follow_people(host, merge_people=store.merge_people, purge_people=store.purge_people)
    host.add_worker("tracking-http", endpoint.serve)
    host.add_worker("profile-reports", reporter.run)
    host.add_closer(profiles.close)
    host.add_closer(endpoint.close)
    return host
