"""Bus messages -> domain: facts about people reach the triggers whose condition kind reacts to them.

`EventConsumer.handle` decodes a batch of `relevans.profile.v1.EnrichedEvent`s and
lets the store decide and apply what they mean in ONE transaction; the kit's
`Consumer` acks the batch only after that commit. Redelivered events change
nothing: timers are keyed by the fact that started them and cancels are idempotent.
The same holds for segment changes (`rv.profile.segments`) and trait changes
(`rv.profile.traits`, which also keep the service's copy of each person's traits);
consent changes (`rv.profile.consent`) keep its copy of their consents, and delivery's
status changes (`rv.delivery.status.*`) close the decision trace.

Profile merges and erasures (`rv.profile.merged`, the erasure stream) are followed by
the kit's runtime (`app.build` hands it `TriggerStore.merge_people` and `purge_people`).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from datetime import datetime

import structlog
from google.protobuf.message import DecodeError
from nats.aio.msg import Msg
from sqlalchemy.ext.asyncio import AsyncEngine

from relevans.common.v1 import common_pb2
from relevans.conditions import ProfileView
from relevans.delivery.v1 import bus_pb2 as delivery_bus_pb2
from relevans.delivery.v1 import delivery_pb2
from relevans.kit.bus import Bus, Consumer, partitioned
from relevans.kit.clock import Clock
from relevans.kit.enums import enum_name
from relevans.kit.partitions import PartitionLeases
from relevans.kit.proto import from_struct, from_timestamp, from_value
from relevans.profile.v1 import bus_pb2
from services.trigger.domain import EventFacts, Plan, SegmentChange, TraitChange
from services.trigger.facts_proto import profile_view
from services.trigger.person_rows import KnownConsent, KnownTraits, ProfileChanges
from services.trigger.store import TriggerStore
from services.trigger.trace import DeliveryOutcome

log = structlog.get_logger(__name__)

STREAM = "RV_EVENTS"
DURABLE = "trigger-events"  # one durable per partition: trigger-events-<p> on rv.events.<p>
SUBJECT = "rv.events"
LEGACY_DURABLE = "trigger-events"  # the one durable on rv.events.> before partitioned consumers
# Events per batch (one transaction) of a partition's consumer. 300 evaluates about a fifth more
# events per second than 200 (fewer transactions and round trips per event); the process's peak RSS
# grows with it (every partition holds a batch): 500 went past 200 MB (bench/README.md, "Trigger").
EVENT_BATCH = 300


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
    properties = from_struct(msg.event.properties)
    profile = msg.profile
    return EventFacts(
        tenant_id=msg.tenant_id,
        event_id=msg.event_id,
        profile_id=msg.profile_id,
        event_type=msg.event.type,
        occurred_at=occurred,
        properties=properties,
        profile=_once(lambda: profile_view(profile, properties)),
    )


def _once(build: Callable[[], ProfileView]) -> Callable[[], ProfileView]:
    """`build`'s result, built on the first call (cheaper to make per event than functools.cache)."""
    built: list[ProfileView] = []

    def get() -> ProfileView:
        if not built:
            built.append(build())
        return built[0]

    return get


# Transactions of event batches in flight at once per process (see `EventConsumer`).
EVENT_WRITERS = 2


class EventConsumer:
    """The handler of every event partition's consumer in a process. Batches that arrive while
    `EVENT_WRITERS` transactions are in flight wait and are then applied together, in one
    transaction (group commit): under a steady trickle each partition's batch is a few events,
    and a transaction per batch cost far more than its events (bench/README.md, "Trigger").
    A partition's next batch is fetched only after its batch is acked, so one person's events
    (one partition) stay in order; a group that fails is applied again batch by batch, so a bad
    event fails only its own batch (which the kit's `Consumer` then retries message by message)."""

    def __init__(
        self,
        store: TriggerStore,
        clock: Clock,
        wake: Callable[[], None] = lambda: None,
        writers: int = EVENT_WRITERS,
    ) -> None:
        self.store = store
        self.clock = clock
        # Wakes the timer worker: a fact that makes a message due now need not wait for its poll.
        self.wake = wake
        self._writers = asyncio.Semaphore(writers)
        # Batches waiting for a writer; each one's future says whether to apply it alone.
        self._waiting: list[tuple[list[EventFacts], asyncio.Future[bool]]] = []

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
        done: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        self._waiting.append((events, done))
        try:
            while not done.done():  # until a writer (this one or another) took it along
                async with self._writers:
                    if not done.done():
                        await self._apply_group(self._take_group())
        except asyncio.CancelledError:
            # Stopped (its partition's lease lost): a batch still waiting is not applied later.
            self._waiting = [w for w in self._waiting if w[1] is not done]
            raise
        if await done:
            await self._apply(events)

    def _take_group(self) -> list[tuple[list[EventFacts], asyncio.Future[bool]]]:
        """The batches waiting longest, up to `EVENT_BATCH` events (at least one batch): full
        batches need no company, and a bigger transaction held more memory than it saved."""
        size, taken = 0, 0
        for events, _ in self._waiting:
            if taken and size + len(events) > EVENT_BATCH:
                break
            size += len(events)
            taken += 1
        group, self._waiting = self._waiting[:taken], self._waiting[taken:]
        return group

    async def _apply_group(self, group: list[tuple[list[EventFacts], asyncio.Future[bool]]]) -> None:
        try:
            await self._apply([e for events, _ in group for e in events])
        except BaseException as exc:
            for _, done in group:
                if done.done():
                    continue
                if len(group) == 1 and isinstance(exc, Exception):
                    done.set_exception(exc)
                else:
                    done.set_result(True)  # applied again alone
            if not isinstance(exc, Exception):
                raise
        else:
            for _, done in group:
                if not done.done():
                    done.set_result(False)

    async def _apply(self, events: list[EventFacts]) -> None:
        now = self.clock.now()
        plan = await self.store.apply_facts(events, now)
        _wake_if_due(plan, now, self.wake)
        if plan.intents:
            log.debug(
                "events applied",
                events=len(events),
                scheduled=len(plan.schedules),
                cancels=len(plan.cancels),
            )


def _wake_if_due(plan: Plan, now: datetime, wake: Callable[[], None]) -> None:
    if any(s.due_at <= now for s in plan.schedules):
        wake()


def event_consumers(
    bus: Bus, store: TriggerStore, clock: Clock, partitions: int, wake: Callable[[], None] = lambda: None
) -> list[Consumer]:
    """One consumer per event partition; run them under `event_leases`, so one trigger process at a
    time consumes a partition and a profile's events are handled in the order profile published
    them (the exceptions: `partitioned`)."""
    handler = EventConsumer(store, clock, wake)
    return partitioned(
        bus,
        service="trigger",
        stream=STREAM,
        durable=DURABLE,
        subject=SUBJECT,
        partitions=partitions,
        handler=handler.handle,
        batch=EVENT_BATCH,
    )


# Advisory lock namespaces of the event partitions and of the processes sharing them, apart from
# the store's PROFILE_LOCK_NAMESPACE ("RVTG").
EVENT_PARTITION_LOCK_NAMESPACE = 0x52565045  # "RVPE"
EVENT_MEMBER_LOCK_NAMESPACE = 0x5256504D  # "RVPM"


def event_leases(engine: AsyncEngine, consumers: Sequence[Consumer]) -> PartitionLeases:
    """The trigger processes' shares of the event partitions: `consumers[p]` runs while this
    process holds partition p."""
    return PartitionLeases(
        engine,
        [c.run for c in consumers],
        namespace=EVENT_PARTITION_LOCK_NAMESPACE,
        member_namespace=EVENT_MEMBER_LOCK_NAMESPACE,
        name="trigger-events",
    )


# ---- profile changes ------------------------------------------------------------------------------

PROFILE_STREAM = "RV_PROFILE"
SEGMENTS_SUBJECT = "rv.profile.segments"
TRAITS_SUBJECT = "rv.profile.traits"
CONSENT_SUBJECT = "rv.profile.consent"
# One consumer over the stream keeps the three in order; merges and erasures have their own.
PROFILE_SUBJECTS = "rv.profile.>"


def segment_change(msg: bus_pb2.SegmentMembershipChanged, now: datetime) -> SegmentChange | None:
    if not (msg.tenant_id and msg.profile_id and msg.segment_id):
        return None
    at = from_timestamp(msg.change_time) if msg.HasField("change_time") else now
    return SegmentChange(msg.tenant_id, msg.profile_id, msg.segment_id, msg.entered, msg.event_id, at)


def trait_changes(msg: bus_pb2.TraitsChanged, now: datetime) -> list[TraitChange]:
    """One fact per changed trait, each with the person's traits after the change."""
    at = from_timestamp(msg.change_time) if msg.HasField("change_time") else now
    traits = {name: from_value(v) for name, v in msg.traits.items()}
    return [
        TraitChange(
            tenant_id=msg.tenant_id,
            profile_id=msg.profile_id,
            change_id=msg.change_id,
            name=name,
            before=from_value(msg.previous[name]) if name in msg.previous else None,
            after=traits.get(name),
            traits=traits,
            occurred_at=at,
        )
        for name in msg.changed
    ]


class ProfileChangeConsumer:
    """Segment, trait and consent changes (other rv.profile.* subjects are not this consumer's):
    a batch is remembered and decided in one transaction."""

    def __init__(self, store: TriggerStore, clock: Clock, wake: Callable[[], None] = lambda: None) -> None:
        self.store = store
        self.clock = clock
        self.wake = wake

    async def handle(self, msgs: Sequence[Msg]) -> None:
        now = self.clock.now()
        changes = ProfileChanges()
        for m in msgs:
            try:
                if m.subject == SEGMENTS_SUBJECT:
                    found = segment_change(bus_pb2.SegmentMembershipChanged.FromString(m.data), now)
                    if found is not None:
                        changes.facts.append(found)
                elif m.subject == TRAITS_SUBJECT:
                    self._traits(changes, bus_pb2.TraitsChanged.FromString(m.data), now)
                elif m.subject == CONSENT_SUBJECT:
                    self._consent(changes, bus_pb2.ConsentChanged.FromString(m.data), now)
            except DecodeError:
                log.error("undecodable profile change skipped", subject=m.subject, size=len(m.data))
        if changes:
            _wake_if_due(await self.store.apply_profile_changes(changes, now), now, self.wake)

    @staticmethod
    def _traits(changes: ProfileChanges, msg: bus_pb2.TraitsChanged, now: datetime) -> None:
        if not (msg.tenant_id and msg.profile_id):
            return
        at = from_timestamp(msg.change_time) if msg.HasField("change_time") else now
        traits = {name: from_value(v) for name, v in msg.traits.items()}
        changes.traits.append(KnownTraits(msg.tenant_id, msg.profile_id, traits, at))
        changes.facts += trait_changes(msg, now)

    @staticmethod
    def _consent(changes: ProfileChanges, msg: bus_pb2.ConsentChanged, now: datetime) -> None:
        if not (msg.tenant_id and msg.profile_id and msg.HasField("consent")):
            return
        c = msg.consent
        changes.consents.append(
            KnownConsent(
                msg.tenant_id,
                msg.profile_id,
                enum_name(common_pb2.Purpose, c.purpose, "PURPOSE_"),
                enum_name(common_pb2.Channel, c.channel, "CHANNEL_"),
                enum_name(common_pb2.ConsentStatus, c.status, "CONSENT_STATUS_"),
                from_timestamp(c.update_time) if c.HasField("update_time") else now,
            )
        )


def profile_change_consumer(
    bus: Bus, store: TriggerStore, clock: Clock, wake: Callable[[], None] = lambda: None
) -> Consumer:
    return Consumer(
        bus,
        service="trigger",
        stream=PROFILE_STREAM,
        durable="trigger-profile-changes",
        filter_subject=PROFILE_SUBJECTS,
        handler=ProfileChangeConsumer(store, clock, wake).handle,
    )


# ---- delivery outcomes ------------------------------------------------------------------------------

DELIVERY_STATUS_STREAM = "RV_DELIVERY_STATUS"
DELIVERY_STATUS_SUBJECT = "rv.delivery.status.>"
_OUTCOMES = {
    delivery_pb2.MESSAGE_STATUS_SENT: "delivery_sent",
    delivery_pb2.MESSAGE_STATUS_SUPPRESSED: "delivery_suppressed",
    delivery_pb2.MESSAGE_STATUS_FAILED: "delivery_failed",
    # a hard bounce: not sent, the reason says so ("hard_bounce: ...")
    delivery_pb2.MESSAGE_STATUS_BOUNCED: "delivery_failed",
}


def delivery_outcome(msg: delivery_bus_pb2.DeliveryStatusChanged, now: datetime) -> DeliveryOutcome | None:
    """A status of a message a trigger asked for that ends its story; None for any other."""
    outcome = _OUTCOMES.get(msg.status)
    if outcome is None or not (msg.tenant_id and msg.profile_id and msg.trigger_id and msg.idempotency_key):
        return None
    at = from_timestamp(msg.time) if msg.HasField("time") else now
    return DeliveryOutcome(
        msg.tenant_id, msg.profile_id, msg.trigger_id, msg.idempotency_key, outcome, msg.reason, at
    )


class DeliveryStatusConsumer:
    def __init__(self, store: TriggerStore, clock: Clock) -> None:
        self.store = store
        self.clock = clock

    async def handle(self, msgs: Sequence[Msg]) -> None:
        now = self.clock.now()
        outcomes = []
        for m in msgs:
            try:
                found = delivery_outcome(delivery_bus_pb2.DeliveryStatusChanged.FromString(m.data), now)
            except DecodeError:
                log.error("undecodable delivery status skipped", subject=m.subject, size=len(m.data))
                continue
            if found is not None:
                outcomes.append(found)
        if outcomes:
            await self.store.record_delivery(outcomes)


def delivery_status_consumer(bus: Bus, store: TriggerStore, clock: Clock) -> Consumer:
    return Consumer(
        bus,
        service="trigger",
        stream=DELIVERY_STATUS_STREAM,
        durable="trigger-delivery-status",
        filter_subject=DELIVERY_STATUS_SUBJECT,
        handler=DeliveryStatusConsumer(store, clock).handle,
    )
