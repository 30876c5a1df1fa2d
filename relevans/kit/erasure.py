"""The purging side of a GDPR erasure, shared by the services that hold personal data besides profile.

A consumer of `rv.profile.erased` (`relevans.profile.v1.ProfileErased`) purges the person's
rows with the service's own `purge` and enqueues `ErasureAcknowledged` on
`rv.profile.erasure_acks` through the service's outbox, in ONE transaction; the kit's
`Consumer` acks the bus message only after that commit, so a purge is never lost and a
redelivered message purges nothing more and acknowledges again (profile records acks idempotently).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from datetime import datetime

import sqlalchemy as sa
import structlog
from google.protobuf.message import DecodeError
from nats.aio.msg import Msg
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from relevans.kit.bus import Bus, Consumer
from relevans.kit.clock import Clock
from relevans.kit.outbox import OutboxMessage, enqueue
from relevans.profile.v1 import bus_pb2

log = structlog.get_logger(__name__)

STREAM = "RV_PROFILE"
ERASED_SUBJECT = "rv.profile.erased"
ACKS_SUBJECT = "rv.profile.erasure_acks"


@dataclass(frozen=True, slots=True)
class Erased:
    tenant_id: str
    profile_id: str
    erasure_id: str
    identifier_hashes: tuple[str, ...]


# Deletes what the service holds about the erased people, inside the caller's transaction.
Purge = Callable[[AsyncConnection, Sequence[Erased], datetime], Awaitable[None]]


def decode_erased(msgs: Sequence[Msg]) -> list[Erased]:
    out: list[Erased] = []
    for m in msgs:
        try:
            e = bus_pb2.ProfileErased.FromString(m.data)
        except DecodeError:
            log.error("undecodable erasure skipped", subject=m.subject, size=len(m.data))
            continue
        if not (e.tenant_id and e.profile_id and e.erasure_id):
            log.error("incomplete erasure skipped", subject=m.subject)
            continue
        out.append(Erased(e.tenant_id, e.profile_id, e.erasure_id, tuple(e.identifier_hashes)))
    return out


class ErasureHandler:
    def __init__(
        self,
        service: str,
        engine: AsyncEngine,
        outbox: sa.Table,
        purge: Purge,
        clock: Clock,
        notify: Callable[[], None],
    ) -> None:
        self.service = service
        self.engine = engine
        self.outbox = outbox
        self.purge = purge
        self.clock = clock
        self.notify = notify

    async def handle(self, msgs: Sequence[Msg]) -> None:
        erased = decode_erased(msgs)
        if not erased:
            return
        acks = [
            OutboxMessage(
                ACKS_SUBJECT,
                bus_pb2.ErasureAcknowledged(
                    tenant_id=e.tenant_id, erasure_id=e.erasure_id, service=self.service
                ).SerializeToString(),
            )
            for e in erased
        ]
        now = self.clock.now()
        async with self.engine.begin() as conn:
            await self.purge(conn, erased, now)
            await enqueue(conn, self.outbox, acks, now)
        log.info("people erased", service=self.service, count=len(erased))
        self.notify()


def erasure_consumer(
    bus: Bus,
    *,
    service: str,
    durable: str,
    engine: AsyncEngine,
    outbox: sa.Table,
    purge: Purge,
    clock: Clock,
    notify: Callable[[], None],
) -> Consumer:
    handler = ErasureHandler(service, engine, outbox, purge, clock, notify)
    return Consumer(
        bus,
        service=service,
        stream=STREAM,
        durable=durable,
        filter_subject=ERASED_SUBJECT,
        handler=handler.handle,
    )
