"""The retry worker: messages whose next attempt is due go back through the `DeliveryWorker`.

A transient failure leaves its message `pending` with `next_attempt_at` (the worker's
`RetryPolicy`); the bus request was acked, so the schedule is the row, and survives restarts.
Each round takes up to `batch` due messages, oldest due first, rebuilds their requests from the
rows and hands them to `DeliveryWorker.process`: the same lock / decide (consent asked for again)
/ claim / send path as a first attempt. Any number of processes may run one: the request's
advisory lock lets one worker at a time handle a message, and a message whose attempt another
worker just made is no longer due when it is read under the lock.

A due message still `sending` whose lock nobody holds was claimed for a retry by a worker that
died mid-send; `process` records it failed "outcome_unknown", never sends it again.

"Due" is measured on the injected clock: between rounds the worker (a `ClockDrivenWorker`) sleeps
on the clock until the next message is due, is woken at once when this process schedules a retry
(`wake`), and looks again every `poll_interval` seconds of real time for what other processes
scheduled.
"""

from __future__ import annotations

from datetime import datetime

import sqlalchemy as sa
import structlog
from sqlalchemy.ext.asyncio import AsyncEngine

from relevans.kit.clock import Clock
from relevans.kit.clock_worker import ClockDrivenWorker
from services.delivery.domain import PENDING, SENDING, DeliveryRequest
from services.delivery.tables import messages
from services.delivery.worker import DeliveryWorker

log = structlog.get_logger(__name__)

DEFAULT_BATCH = 200
DEFAULT_POLL_INTERVAL_S = 1.0

_m = messages


class RetrySchedule:
    """The queries of the retry schedule (the `messages_next_attempt` partial index)."""

    def __init__(self, engine: AsyncEngine) -> None:
        self.engine = engine

    async def due(self, now: datetime, limit: int) -> list[DeliveryRequest]:
        """The requests of up to `limit` messages whose next attempt is due, oldest due first."""
        query = (
            sa.select(
                _m.c.tenant_id,
                _m.c.idempotency_key,
                _m.c.profile_id,
                _m.c.trigger_id,
                _m.c.channel,
                _m.c.purpose,
                _m.c.template_id,
                _m.c.variables,
            )
            .where(
                _m.c.next_attempt_at.is_not(None),
                _m.c.next_attempt_at <= now,
                _m.c.status.in_((PENDING, SENDING)),
            )
            .order_by(_m.c.next_attempt_at)
            .limit(limit)
        )
        async with self.engine.connect() as conn:
            rows = (await conn.execute(query)).all()
        return [
            DeliveryRequest(
                idempotency_key=r.idempotency_key,
                tenant_id=r.tenant_id,
                profile_id=r.profile_id,
                trigger_id=r.trigger_id,
                channel=r.channel,
                purpose=r.purpose,
                template_id=r.template_id,
                variables=r.variables,
            )
            for r in rows
        ]

    async def next_due(self, now: datetime) -> datetime | None:
        """When the next message scheduled after `now` is due, None when there is none."""
        query = sa.select(sa.func.min(_m.c.next_attempt_at)).where(
            _m.c.next_attempt_at.is_not(None), _m.c.next_attempt_at > now, _m.c.status == PENDING
        )
        async with self.engine.connect() as conn:
            found: datetime | None = (await conn.execute(query)).scalar_one()
        return found


class RetryWorker(ClockDrivenWorker):
    def __init__(
        self,
        schedule: RetrySchedule,
        worker: DeliveryWorker,
        clock: Clock,
        *,
        batch: int = DEFAULT_BATCH,
        poll_interval: float = DEFAULT_POLL_INTERVAL_S,
    ) -> None:
        # `wake` sets the worker's event: it is set when the worker schedules a retry.
        super().__init__(clock, poll_interval=poll_interval, woken=worker.retries_scheduled)
        self.schedule = schedule
        self.worker = worker
        self.batch = batch

    async def round(self) -> bool:
        """One round: hand up to `batch` due messages to the worker; return whether more may be due
        now (a full batch, all of it handled here: not held by another worker)."""
        due = await self.schedule.due(self.clock.now(), self.batch)
        if not due:
            return False
        log.info("retrying due messages", count=len(due))
        left = await self.worker.process(due)
        if left:
            log.info("some due messages are left for later", why="; ".join(sorted(set(left))))
        return len(due) >= self.batch and not left

    async def next_due(self) -> datetime | None:
        return await self.schedule.next_due(self.clock.now())
