"""Assembles the profile service: database, bus, outbox relay and the gRPC servicer."""

from __future__ import annotations

from relevans.kit.clock import Clock
from relevans.kit.runtime import open_runtime
from relevans.kit.server import ServiceHost
from relevans.kit.settings import Settings
from services.profile.consumers import ACKS_DURABLE, erasure_ack_consumer
from services.profile.servicers import enrichment, profile, segments
from services.profile.store import ProfileStore
from services.profile.store.enrichment import EnrichmentStore, TenantCache, load_enrichment
from services.profile.store.signals import SegmentRules
from services.profile.store.tables import outbox
from services.profile.wire import consent_changed, profile_merged, traits_changed

SERVICE = "profile"


async def build(settings: Settings, clock: Clock) -> ServiceHost:
    """The profile service, not yet started; the caller migrates its database first."""
    rt = await open_runtime(SERVICE, settings, clock, outbox)
    enrichment_cache = TenantCache(clock, load_enrichment)
    segment_rules = TenantCache(clock, SegmentRules().load)
    # ingest's own connections, planned for key lookups only, once per statement (see create_engine)
    ingest_engine = rt.lookup_engine(plan_each_run=False)
    store = ProfileStore(
        rt.engine,
        ingest_engine=ingest_engine,
        consent_message=consent_changed,
        merged_message=profile_merged,
        traits_message=traits_changed,
        definitions=enrichment_cache.get,
        segment_rules=segment_rules.get,
    )
    servicer = profile.ProfileServicer(
        store, clock, event_partitions=settings.event_partitions, notify=rt.relay.notify
    )
    definitions = enrichment.EnrichmentServicer(EnrichmentStore(rt.engine), clock, enrichment_cache)
    host = rt.host(
        [
            profile.binding(servicer),
            enrichment.binding(definitions),
            segments.binding(rt.engine, clock, segment_rules),
        ]
    )
    host.add_worker(ACKS_DURABLE, erasure_ack_consumer(rt.bus, servicer.gdpr, clock).run)
    return host
