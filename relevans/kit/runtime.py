"""Assembles a service process from the kit: database, bus, outbox relay and gRPC host.

Every service's `app.build()` goes through `open_runtime`, so no service carries
its own copy of the wiring.
"""

from __future__ import annotations

import gc
from dataclasses import dataclass, field

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncEngine

from relevans.kit.bus import Bus
from relevans.kit.clock import Clock
from relevans.kit.db import create_engine
from relevans.kit.erasure import Purge, erasure_consumer
from relevans.kit.merges import MergePeople, merge_consumer
from relevans.kit.outbox import OutboxRelay
from relevans.kit.server import ServiceBinding, ServiceHost
from relevans.kit.settings import Settings


@dataclass
class Runtime:
    service: str
    settings: Settings
    clock: Clock
    engine: AsyncEngine
    bus: Bus
    relay: OutboxRelay
    # Engines of the service's hot paths (`lookup_engine`), disposed with `engine`.
    lookup_engines: list[AsyncEngine] = field(default_factory=list)

    def lookup_engine(self, *, plan_each_run: bool) -> AsyncEngine:
        """Connections of a hot path whose every statement finds its rows by key (`create_engine`'s
        `lookups_only`; `plan_each_run` for statements over whole batches), beside `engine`."""
        engine = create_engine(
            self.settings.database_url(self.service),
            pool_size=5,
            lookups_only=True,
            plan_each_run=plan_each_run,
        )
        self.lookup_engines.append(engine)
        return engine

    def host(self, bindings: list[ServiceBinding]) -> ServiceHost:
        """A ServiceHost that runs the relay (unless settings turn it off) and closes the bus and
        the databases on stop."""
        s = self.settings
        host = ServiceHost(
            self.service,
            listen=s.listen(self.service),
            secret=s.token_secret,
            clock=self.clock,
            bindings=bindings,
            grace_s=s.shutdown_grace,
            metrics_port=s.metrics_port(self.service),
            metrics_host=s.metrics_host,
            reuse_port=s.processes(self.service) > 1,
            servers=s.grpc_servers,
        )
        if s.outbox_relay:
            host.add_worker("outbox-relay", self.relay.run)
        for engine in (self.engine, *self.lookup_engines):
            host.add_closer(engine.dispose)
        host.add_closer(self.bus.close, on_kill=self.bus.abort)
        return host

    def follow_people(self, host: ServiceHost, *, merge_people: MergePeople, purge_people: Purge) -> None:
        """Keep this service's copies of people in step with the profile service: one worker moves
        them to the surviving profile on a merge (durable `<service>-merges`), another purges them
        on an erasure and acknowledges it (durable `<service>-erasure`)."""
        merges, erasure = f"{self.service}-merges", f"{self.service}-erasure"
        host.add_worker(
            merges,
            merge_consumer(
                self.bus,
                service=self.service,
                durable=merges,
                engine=self.engine,
                merge_people=merge_people,
                clock=self.clock,
            ).run,
        )
        host.add_worker(
            erasure,
            erasure_consumer(
                self.bus,
                service=self.service,
                durable=erasure,
                engine=self.engine,
                outbox=self.relay.table,
                purge=purge_people,
                clock=self.clock,
                notify=self.relay.notify,
            ).run,
        )


async def open_runtime(service: str, settings: Settings, clock: Clock, outbox: sa.Table) -> Runtime:
    engine = create_engine(settings.database_url(service))
    bus = Bus(settings.nats_url, name=f"relevans-{service}")
    await bus.connect()
    await bus.ensure_streams()
    relay = OutboxRelay(engine, outbox, bus, service=service, clock=clock)
    return Runtime(service, settings, clock, engine, bus, relay)


# Python's default thresholds (700, 10, 10) suit short scripts. A service allocates tens of objects
# per event it handles: it ran a collection every few dozen events, and each full collection walked
# every object imported or cached at startup, a large share of the service's CPU under ingest.
# Not much larger than 10,000: grpc.aio leaves a few objects in a reference cycle per call, so a
# larger young generation holds more garbage and each collection pauses the service long enough for
# Track's p99 latency to show it. Figures: bench/README.md.
GC_THRESHOLDS = (10_000, 20, 20)


def settle_heap() -> None:
    """Call once a service process has started: collect what startup left, move what survived
    (modules, descriptors, caches) out of the collector's sight for good, and collect the young
    generation in larger steps. Reference counting still frees most objects at once; cycles are
    collected, only less often."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(*GC_THRESHOLDS)
