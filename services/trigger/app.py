"""Assembles the trigger service: database, bus, outbox relay, gRPC servicer, consumers, timers."""

from __future__ import annotations

from datetime import timedelta

from relevans.kit.bus import ensure_durables, take_over
from relevans.kit.clock import Clock
from relevans.kit.runtime import open_runtime
from relevans.kit.server import ServiceHost
from relevans.kit.settings import Settings
from services.trigger.consumers import (
    LEGACY_DURABLE,
    delivery_status_consumer,
    event_consumers,
    event_leases,
    profile_change_consumer,
)
from services.trigger.servicer import TriggerServicer, binding
from services.trigger.store import TriggerStore
from services.trigger.tables import outbox
from services.trigger.timers import DecisionPruner, TimerWorker

SERVICE = "trigger"


async def build(settings: Settings, clock: Clock) -> ServiceHost:
    """The trigger service, not yet started; the caller migrates its database first."""
    rt = await open_runtime(SERVICE, settings, clock, outbox)
    # the hot path's own connections (facts and timer rounds): key lookups only, each batch's
    # statements planned for the batch (see create_engine)
    hot_engine = rt.lookup_engine(plan_each_run=True)
    store = TriggerStore(rt.engine, hot_engine)
    host = rt.host([binding(TriggerServicer(store, clock))])
    timers = TimerWorker(store, clock, rt.relay.notify)
    events = event_consumers(rt.bus, store, clock, settings.event_partitions, timers.wake)
    await take_over(rt.bus, LEGACY_DURABLE, events)
    await ensure_durables(rt.bus, events)
    leases = event_leases(rt.engine, events)
    host.add_worker("trigger-event-partitions", leases.run)
    host.add_closer(leases.close)  # before the engine's dispose, which leaves a checked-out connection open
    host.add_worker("trigger-profile-changes", profile_change_consumer(rt.bus, store, clock, timers.wake).run)
    host.add_worker("trigger-delivery-status", delivery_status_consumer(rt.bus, store, clock).run)
    rt.follow_people(host, merge_people=store.merge_people, purge_people=store.purge_people)
    host.add_worker("timers", timers.run)
    retention = timedelta(days=settings.trigger_decision_retention_days)
    host.add_worker("decision-retention", DecisionPruner(store, clock, retention).run)
    return host
