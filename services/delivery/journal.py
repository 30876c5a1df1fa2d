"""The writes of a batch's sends as they happen: each message's claim right before its content goes
out, each outcome as soon as it is known, in small transactions, in the order they came.

- At most one message in flight per connection: a transport's connection carries one message at a
  time and claims it (`sending`) right before the content; its outcome is queued before the connection's
  next claim, and a write takes the queue in order, so the outcome is committed with that claim
  or earlier. After a kill -9 at most one `sending` row per connection is left: the only messages
  whose outcome cannot be known. A message claimed by no connection yet is still `pending`, and is
  simply tried again.
- Group commit: a write takes whatever the connections queued while the previous one ran, so eight
  connections cost a transaction for several messages, not two per message.
- PostgreSQL away: a failed write answers its claims False (those messages are not sent and stay
  `pending`) and keeps its outcomes, written again after a back-off on the injectable clock until
  they are; meanwhile further claims are refused at once. An outcome the server accepted is never
  dropped, and its message, still `sending`, is never sent a second time.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime
from types import TracebackType

import structlog
from sqlalchemy.ext.asyncio import AsyncConnection

from relevans.delivery.v1 import bus_pb2, delivery_pb2
from relevans.kit import metrics
from relevans.kit.clock import Clock
from relevans.kit.outbox import OutboxMessage
from relevans.kit.proto import to_timestamp
from services.delivery.domain import BOUNCED, FAILED, FINAL_STATUSES, PENDING, SENDING, SENT, SUPPRESSED
from services.delivery.domain.tracking import CLICKED, OPENED, UNSUBSCRIBED
from services.delivery.store import Claim, DeliveryStore, MessageRow, StatusUpdate
from services.delivery.suppressions import Suppression

log = structlog.get_logger(__name__)

STATUS_SUBJECT_PREFIX = "rv.delivery.status."
FIRST_BACKOFF_S = 0.1
MAX_BACKOFF_S = 10.0

_STATUS_ENUM = {
    PENDING: delivery_pb2.MESSAGE_STATUS_PENDING,
    SENDING: delivery_pb2.MESSAGE_STATUS_PENDING,
    SENT: delivery_pb2.MESSAGE_STATUS_SENT,
    SUPPRESSED: delivery_pb2.MESSAGE_STATUS_SUPPRESSED,
    FAILED: delivery_pb2.MESSAGE_STATUS_FAILED,
    BOUNCED: delivery_pb2.MESSAGE_STATUS_BOUNCED,
    OPENED: delivery_pb2.MESSAGE_STATUS_OPENED,
    CLICKED: delivery_pb2.MESSAGE_STATUS_CLICKED,
    UNSUBSCRIBED: delivery_pb2.MESSAGE_STATUS_UNSUBSCRIBED,
}


@dataclass(frozen=True, slots=True)
class Outcome:
    """A message's next state, with the channel it counts under and the address it suppresses
    from now on (a hard bounce)."""

    row: MessageRow
    channel: str
    update: StatusUpdate
    suppress: Suppression | None = None
    # Published as a DeliveryStatusChanged when final; a test message (SendTest) is not.
    announce: bool = True


def status_changed(row: MessageRow, status: str, reason: str, now: datetime) -> OutboxMessage:
    payload = bus_pb2.DeliveryStatusChanged(
        tenant_id=row.tenant_id,
        message_id=row.message_id,
        idempotency_key=row.idempotency_key,
        profile_id=row.profile_id,
        trigger_id=row.trigger_id,
        status=_STATUS_ENUM[status],
        reason=reason,
        time=to_timestamp(now),
    )
    return OutboxMessage(STATUS_SUBJECT_PREFIX + status, payload.SerializeToString())


def _published(outcomes: Sequence[Outcome], now: datetime) -> list[OutboxMessage]:
    """The status messages of the final outcomes."""
    return [
        status_changed(o.row, o.update.status, o.update.reason, now)
        for o in outcomes
        if o.update.status in FINAL_STATUSES and o.announce
    ]


def _suppressed(outcomes: Sequence[Outcome]) -> list[Suppression]:
    return [o.suppress for o in outcomes if o.suppress is not None]


async def write_outcomes(
    store: DeliveryStore, conn: AsyncConnection, outcomes: Sequence[Outcome], now: datetime
) -> None:
    """The outcomes and the status messages of the final ones, in the caller's transaction."""
    updates = [o.update for o in outcomes]
    await store.apply(conn, updates, now, _published(outcomes, now), _suppressed(outcomes))


@dataclass(slots=True)
class _Waiting:
    claim: Claim
    answer: asyncio.Future[bool]


def _answer(waiting: _Waiting, claimed: bool) -> None:
    if not waiting.answer.done():  # its sender may have been cancelled
        waiting.answer.set_result(claimed)


class SendJournal:
    """`async with SendJournal(...) as journal:` writes in the background while the block sends;
    leaving the block waits until every recorded outcome is written (however long that takes)."""

    def __init__(
        self, store: DeliveryStore, clock: Clock, on_commit: Callable[[Sequence[Outcome]], None]
    ) -> None:
        self.store = store
        self.clock = clock
        self.on_commit = on_commit
        # Claims refused because they could not be written: their messages wait for a retry.
        self.unwritten_claims = 0
        self._claims: list[_Waiting] = []
        self._outcomes: list[Outcome] = []
        self._wake = asyncio.Event()
        self._closing = False
        self._failing = False
        self._task: asyncio.Task[None] | None = None

    async def __aenter__(self) -> SendJournal:
        self._task = asyncio.create_task(self._run(), name="delivery-send-journal")
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        assert self._task is not None
        if isinstance(exc, asyncio.CancelledError):
            self._task.cancel()
        self._closing = True
        self._wake.set()
        await self._task

    async def claim(self, claim: Claim) -> bool:
        """Mark the message `sending`; True once that is committed, False when it must not be sent
        (another worker claimed it, or the claim could not be written)."""
        if self._failing:
            self.unwritten_claims += 1
            return False
        waiting = _Waiting(claim, asyncio.get_running_loop().create_future())
        self._claims.append(waiting)
        self._wake.set()
        return await waiting.answer

    def record(self, outcome: Outcome) -> None:
        """Queue an outcome; it is written before any claim queued after it."""
        self._outcomes.append(outcome)
        self._wake.set()

    async def _run(self) -> None:
        outcomes: list[Outcome] = []  # taken, not yet written
        backoff = FIRST_BACKOFF_S
        while True:
            if not (outcomes or self._outcomes or self._claims):
                if self._closing:
                    return
                self._wake.clear()
                await self._wake.wait()
                continue
            claims, self._claims = self._claims, []
            outcomes += self._outcomes
            self._outcomes = []
            try:
                claimed = await self._write(claims, outcomes)
            except Exception:
                log.warning("delivery outcomes not written; retrying", count=len(outcomes), exc_info=True)
                metrics.DELIVERY_OUTCOME_WRITE_RETRIES.inc()
                self._failing = True
                self.unwritten_claims += len(claims)
                for w in claims:
                    _answer(w, False)
                await self.clock.sleep(backoff)
                backoff = min(backoff * 2, MAX_BACKOFF_S)
                continue
            self._failing = False
            backoff = FIRST_BACKOFF_S
            for w in claims:
                _answer(w, (w.claim.row.tenant_id, w.claim.row.message_id) in claimed)
            self.on_commit(outcomes)
            outcomes = []

    async def _write(self, claims: Sequence[_Waiting], outcomes: Sequence[Outcome]) -> set[tuple[str, str]]:
        now = self.clock.now()
        return await self.store.record_sends(
            [w.claim for w in claims],
            [o.update for o in outcomes],
            _published(outcomes, now),
            now,
            _suppressed(outcomes),
        )
