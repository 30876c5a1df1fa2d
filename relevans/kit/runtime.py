"""Assembles a service process from the kit: database, bus, outbox relay and gRPC host.

Every service's `app.build()` goes through `open_runtime`, so no service carries
its own copy of the wiring.
"""

from __future__ import annotations

from dataclasses import dataclass

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncEngine

from relevans.kit.bus import Bus
from relevans.kit.clock import Clock
from relevans.kit.db import create_engine
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

    def host(self, bindings: list[ServiceBinding]) -> ServiceHost:
        """A ServiceHost that runs the relay (unless settings turn it off) and closes the bus and
        database on stop."""
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
        )
        if s.outbox_relay:
            host.add_worker("outbox-relay", self.relay.run)
        host.add_closer(self.engine.dispose)
        host.add_closer(self.bus.close)
        return host


async def open_runtime(service: str, settings: Settings, clock: Clock, outbox: sa.Table) -> Runtime:
    engine = create_engine(settings.database_url(service))
    bus = Bus(settings.nats_url, name=f"relevans-{service}")
    await bus.connect()
    await bus.ensure_streams()
    relay = OutboxRelay(engine, outbox, bus, service=service, clock=clock)
    return Runtime(service, settings, clock, engine, bus, relay)
