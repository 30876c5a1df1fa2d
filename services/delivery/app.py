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
from services.delivery.engagements import UnsubscribeAwareProfiles
from services.delivery.http_endpoint import open_tracking
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
    tracking = open_tracking(settings, rt.engine, profiles.channel, clock, notify_relay=rt.relay.notify)
    worker = DeliveryWorker(
        store,
        profiles,
        open_transports(settings, tracking.links),
        renderer,
        clock,
        make_id=new_message_id,
        notify=rt.relay.notify,
    )
    host = rt.host([binding(DeliveryServicer(store, renderer, clock))])
    host.add_worker(DURABLE, request_consumer(rt.bus, worker).run)
    rt.follow_people(host, merge_people=store.merge_people, purge_people=store.purge_people)
    tracking.attach(host)
    host.add_closer(profiles.close)
    return host
