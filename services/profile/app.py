"""Assembles the profile service: database, bus, outbox relay and the gRPC servicer."""

from __future__ import annotations

from relevans.kit.clock import Clock
from relevans.kit.db import create_engine
from relevans.kit.runtime import open_runtime
from relevans.kit.server import ServiceHost
from relevans.kit.settings import Settings
from services.profile import enrichment_servicer, segment_servicer
from services.profile.consumers import ACKS_DURABLE, erasure_ack_consumer
from services.profile.servicer import ProfileServicer, binding, consent_changed, profile_merged
from services.profile.store import ProfileStore
from services.profile.store.enrichment import EnrichmentStore, TenantCache, load_enrichment
from services.profile.store.signals import SegmentRules
from services.profile.store.tables import outbox

SERVICE = "profile"


async def build(settings: Settings, clock: Clock) -> ServiceHost:
    """The profile service, not yet started; the caller migrates its database first."""
    rt = await open_runtime(SERVICE, settings, clock, outbox)
    enrichment = TenantCache(clock, load_enrichment)
    segment_rules = TenantCache(clock, SegmentRules().load)
    # ingest's own connections (up to 10), planned for key lookups only (see create_engine)
    ingest_engine = create_engine(settings.database_url(SERVICE), pool_size=5, lookups_only=True)
    store = ProfileStore(
        rt.engine,
        ingest_engine=ingest_engine,
        consent_message=consent_changed,
        merged_message=profile_merged,
        definitions=enrichment.get,
        segment_rules=segment_rules.get,
    )
    servicer = ProfileServicer(
        store, clock, event_partitions=settings.event_partitions, notify=rt.relay.notify
    )
    definitions = enrichment_servicer.EnrichmentServicer(EnrichmentStore(rt.engine), clock, enrichment)
    host = rt.host(
        [
            binding(servicer),
            enrichment_servicer.binding(definitions),
            segment_servicer.binding(rt.engine, clock, segment_rules),
        ]
    )
    host.add_closer(ingest_engine.dispose)
    host.add_worker(ACKS_DURABLE, erasure_ack_consumer(rt.bus, servicer.gdpr, clock).run)
    return host
