"""Bus messages -> profile: the erasure acknowledgements of trigger and delivery complete erasures.

`ErasureAckConsumer.handle` decodes a batch of `relevans.profile.v1.ErasureAcknowledged`
messages (`ACKS_SUBJECT`) and records them in one transaction (`GdprStore.record_acks`); the
kit's `Consumer` acks the batch only after that commit. Repeated acknowledgements change nothing.
"""

from __future__ import annotations

from collections.abc import Sequence

import structlog
from google.protobuf.message import DecodeError
from nats.aio.msg import Msg

from relevans.kit.bus import Bus, Consumer
from relevans.kit.clock import Clock
from relevans.kit.erasure import ACKS_SUBJECT, STREAM
from relevans.profile.v1 import bus_pb2
from services.profile.store.gdpr import GdprStore

log = structlog.get_logger(__name__)

ACKS_DURABLE = "profile-erasure-acks"


class ErasureAckConsumer:
    def __init__(self, store: GdprStore, clock: Clock) -> None:
        self.store = store
        self.clock = clock

    async def handle(self, msgs: Sequence[Msg]) -> None:
        acks: list[tuple[str, str, str]] = []
        for m in msgs:
            try:
                ack = bus_pb2.ErasureAcknowledged.FromString(m.data)
            except DecodeError:
                log.error("undecodable erasure ack skipped", subject=m.subject)
                continue
            if ack.tenant_id and ack.erasure_id and ack.service:
                acks.append((ack.tenant_id, ack.erasure_id, ack.service))
        if acks:
            await self.store.record_acks(acks, self.clock.now())


def erasure_ack_consumer(bus: Bus, store: GdprStore, clock: Clock) -> Consumer:
    return Consumer(
        bus,
        service="profile",
        stream=STREAM,
        durable=ACKS_DURABLE,
        filter_subject=ACKS_SUBJECT,
        handler=ErasureAckConsumer(store, clock).handle,
    )
