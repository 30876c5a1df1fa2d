"""Bus messages -> domain: enriched events reach the triggers whose condition kind reacts to them.

`EventConsumer.handle` decodes a batch of `relevans.profile.v1.EnrichedEvent`s and
lets the store decide and apply what they mean in ONE transaction; the kit's
`Consumer` acks the batch only after that commit. Redelivered events change
nothing: timers are keyed by the event that started them and cancels are idempotent.

Profile merges and erasures (`rv.profile.merged`, the erasure stream) are followed by
the kit's runtime (`app.build` hands it `TriggerStore.merge_people` and `purge_people`).
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime

import structlog
from google.protobuf.message import DecodeError
from nats.aio.msg import Msg

from relevans.kit.bus import Bus, Consumer, partitioned
from relevans.kit.clock import Clock
from relevans.kit.proto import from_struct, from_timestamp
from relevans.profile.v1 import bus_pb2
from services.trigger.domain import EventFacts
from services.trigger.store import TriggerStore

log = structlog.get_logger(__name__)

STREAM = "RV_EVENTS"
DURABLE = "trigger-events"  # one durable per partition: trigger-events-<p> on rv.events.<p>
SUBJECT = "rv.events"
LEGACY_DURABLE = "trigger-events"  # the one durable on rv.events.> before partitioned consumers


def event_facts(msg: bus_pb2.EnrichedEvent, now: datetime) -> EventFacts | None:
    """The facts of one enriched event; None if it is unusable (logged, never retried)."""
    if not (msg.tenant_id and msg.event_id and msg.profile_id and msg.event.type):
        return None
    occurred = now
    try:
        if msg.event.HasField("timestamp"):
            occurred = from_timestamp(msg.event.timestamp)
        elif msg.HasField("receive_time"):
            occurred = from_timestamp(msg.receive_time)
    except (ValueError, OverflowError):
        return None
    return EventFacts(
        tenant_id=msg.tenant_id,
        event_id=msg.event_id,
        profile_id=msg.profile_id,
        event_type=msg.event.type,
        occurred_at=occurred,
        properties=from_struct(msg.event.properties),
    )


class EventConsumer:
    def __init__(self, store: TriggerStore, clock: Clock) -> None:
        self.store = store
        self.clock = clock

    def decode(self, msgs: Sequence[Msg]) -> list[EventFacts]:
        now = self.clock.now()
        out: list[EventFacts] = []
        for m in msgs:
            try:
                event = bus_pb2.EnrichedEvent.FromString(m.data)
            except DecodeError:
                log.error("undecodable event skipped", subject=m.subject, size=len(m.data))
                continue
            facts = event_facts(event, now)
            if facts is None:
                log.error("incomplete event skipped", subject=m.subject, event_id=event.event_id)
                continue
            out.append(facts)
        return out

    async def handle(self, msgs: Sequence[Msg]) -> None:
        events = self.decode(msgs)
        if not events:
            return
        plan = await self.store.apply_events(events, self.clock.now())
        if plan.intents:
            log.debug(
                "events applied",
                events=len(events),
                scheduled=len(plan.schedules),
                cancels=len(plan.cancels),
            )


def event_consumers(bus: Bus, store: TriggerStore, clock: Clock, partitions: int) -> list[Consumer]:
    """One in-order consumer per event partition, shared by every trigger process: one
    profile's events are handled one batch after another, in the order profile published them.
    A message that keeps failing is retried later while its partition moves on past it: the
    one case where a profile's events are not handled in order."""
    handler = EventConsumer(store, clock)
    return partitioned(
        bus,
        service="trigger",
        stream=STREAM,
        durable=DURABLE,
        subject=SUBJECT,
        partitions=partitions,
        handler=handler.handle,
    )
