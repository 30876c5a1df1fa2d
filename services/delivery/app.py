"""Assembles the delivery service: database, bus, outbox relay, gRPC servicer, consumers."""

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
from services.delivery.channels import open_transports
from services.delivery.channels.web import WebTransport
from services.delivery.consumers import DURABLE, request_consumer
from services.delivery.domain import Renderer
from services.delivery.domain.channels.web import WEB
from services.delivery.profiles import ProfileClient
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
    profiles = ProfileClient(
        settings.profile_target,
        deadline_s=settings.call_deadline,
        secret=settings.token_secret,
        clock=clock,
    )
    banner_rows = BannerRows(rt.engine)
    banners = BannerBoard(banner_rows, rt.bus, clock)
    await banners.load()
    transports = {**open_transports(settings), WEB: WebTransport(banner_rows, clock, rt.relay.notify)}
    worker = DeliveryWorker(
        store,
        profiles,
        transports,
        renderer,
        clock,
        make_id=new_message_id,
        notify=rt.relay.notify,
    )
    host = rt.host([binding(DeliveryServicer(store, renderer, clock, banners))])
    host.add_worker(DURABLE, request_consumer(rt.bus, worker).run)
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
    host.add_closer(profiles.close)
    return host
