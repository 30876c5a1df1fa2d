"""The timer worker: due timers become `DeliveryRequest`s on `rv.delivery.requests`, once each.

Any number of workers (in one process or many) share the `timers` table: each
round claims up to `batch` due rows with `FOR UPDATE SKIP LOCKED`, marks them
fired and writes their requests to the outbox in the same transaction, then
wakes the relay. "Due" is measured on the injected clock; between rounds that left nothing due
the worker (a `ClockDrivenWorker`) waits `poll_interval` seconds of real time, because a
ManualClock never moves by itself, or until `wake` says a timer fell due.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from datetime import datetime, timedelta

import structlog
from prometheus_client import Counter

from relevans.common.v1 import common_pb2
from relevans.delivery.v1 import bus_pb2
from relevans.kit.clock import Clock
from relevans.kit.clock_worker import ClockDrivenWorker, first_of
from relevans.kit.enums import enum_value
from relevans.kit.outbox import OutboxMessage
from relevans.kit.proto import to_struct, to_timestamp
from services.trigger.domain import Firing
from services.trigger.store import TriggerStore

log = structlog.get_logger(__name__)

TIMERS_FIRED = Counter("relevans_trigger_timers_fired_total", "Timers fired into delivery requests")

DELIVERY_SUBJECT = "rv.delivery.requests"
DEFAULT_BATCH = 200
DEFAULT_POLL_INTERVAL_S = 0.2


def delivery_request(f: Firing, now: datetime) -> bus_pb2.DeliveryRequest:
    return bus_pb2.DeliveryRequest(
        idempotency_key=f.idempotency_key,
        tenant_id=f.tenant_id,
        profile_id=f.profile_id,
        trigger_id=f.trigger_id,
        channel=enum_value(common_pb2.Channel, f.channel, "CHANNEL_"),
        purpose=enum_value(common_pb2.Purpose, f.purpose, "PURPOSE_"),
        template_id=f.template_id,
        variables=to_struct(f.variables),
        request_time=to_timestamp(now),
        priority=f.priority,
        expire_time=to_timestamp(f.expire_at),
    )


def delivery_message(f: Firing, now: datetime) -> OutboxMessage:
    return OutboxMessage(DELIVERY_SUBJECT, delivery_request(f, now).SerializeToString())


class TimerWorker(ClockDrivenWorker):
    def __init__(
        self,
        store: TriggerStore,
        clock: Clock,
        notify: Callable[[], None],
        *,
        batch: int = DEFAULT_BATCH,
        poll_interval: float = DEFAULT_POLL_INTERVAL_S,
    ) -> None:
        super().__init__(clock, poll_interval=poll_interval)
        self.store = store
        self.notify = notify
        self.batch = batch

    async def _round(self) -> tuple[int, int]:
        result = await self.store.fire_due(self.clock.now(), self.batch, delivery_message)
        if result.fired:
            self.notify()
            TIMERS_FIRED.inc(result.fired)
            log.info("timers fired", fired=result.fired)
        return result.claimed, result.fired

    async def fire_due(self) -> int:
        """One round: fire up to `batch` due timers; return how many delivery requests were written."""
        _, fired = await self._round()
        return fired

    async def round(self) -> bool:
        claimed, _ = await self._round()
        return claimed >= self.batch


PRUNE_EVERY_S = 3600.0


class DecisionPruner:
    """Deletes decision-trace rows older than the retention, hourly (real time), in batches."""

    def __init__(self, store: TriggerStore, clock: Clock, retention: timedelta) -> None:
        self.store = store
        self.clock = clock
        self.retention = retention

    async def prune(self) -> int:
        """Delete every row older than the retention; return how many."""
        total = 0
        while True:
            deleted = await self.store.prune_decisions(self.clock.now() - self.retention)
            total += deleted
            if deleted == 0:
                return total

    async def run(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            try:
                deleted = await self.prune()
                if deleted:
                    log.info("decision trace pruned", deleted=deleted)
            except Exception:
                if stop.is_set():
                    break
                log.exception("pruning the decision trace failed; retrying later")
            await first_of(PRUNE_EVERY_S, stop.wait())
