"""Batches concurrent single-event `Track` calls into shared transactions (`TrackCoalescer`)."""

from __future__ import annotations

import asyncio
import contextvars
from collections.abc import Callable
from dataclasses import dataclass

from relevans.kit.clock import Clock
from relevans.profile.v1 import profile_pb2
from services.profile.domain import Event
from services.profile.domain.ids import time_ordered_ids
from services.profile.store import ProfileStore, TrackResult
from services.profile.wire import enriched_events


@dataclass(slots=True)
class _Waiting:
    proto: profile_pb2.Event
    event: Event
    result: asyncio.Future[TrackResult]


class TrackCoalescer:
    """Writes concurrent single-event `Track` calls of a tenant in shared transactions.

    A call never waits for a timer: while fewer than `max_writes` writes run, its event is
    written at once; otherwise it joins the events queued behind the running writes, and the
    next free writer takes them all in one transaction (up to `max_batch`). Under load this
    turns many small transactions (each a commit, each an outbox relay round) into a few larger
    ones. One writer is the default: with fewer, larger batches the service and PostgreSQL
    spend less CPU per event than with two, with no worse latency (bench/track.py measures it;
    figures: bench/README.md).
    Idempotency is unchanged: concurrent calls with one message_id store one event and
    the others get `duplicate`. A write that fails fails every call in it, and stores none.
    """

    def __init__(
        self,
        store: ProfileStore,
        clock: Clock,
        *,
        event_partitions: int,
        notify: Callable[[], None],
        max_writes: int = 1,
        max_batch: int = 500,
    ) -> None:
        self.store = store
        self.clock = clock
        self.event_partitions = event_partitions
        self.notify = notify
        self.max_writes = max_writes
        self.max_batch = max_batch
        self._queues: dict[str, list[_Waiting]] = {}
        self._writers = 0
        self._tasks: set[asyncio.Task[None]] = set()

    async def track(self, tenant: str, proto: profile_pb2.Event, event: Event) -> TrackResult:
        result: asyncio.Future[TrackResult] = asyncio.get_running_loop().create_future()
        self._queues.setdefault(tenant, []).append(_Waiting(proto, event, result))
        if self._writers < self.max_writes:
            self._writers += 1
            # A fresh context: the writer serves many calls, not the one that happened to start it.
            task = asyncio.create_task(self._write_all(), context=contextvars.Context())
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        return await result

    async def _write_all(self) -> None:
        try:
            while self._queues:
                tenant, waiting = next(iter(self._queues.items()))
                if len(waiting) > self.max_batch:
                    self._queues[tenant] = waiting[self.max_batch :]
                    waiting = waiting[: self.max_batch]
                else:
                    del self._queues[tenant]
                await self._write(tenant, waiting)
        finally:
            self._writers -= 1

    async def _write(self, tenant: str, waiting: list[_Waiting]) -> None:
        now = self.clock.now()
        events = [w.event for w in waiting]
        try:
            results = await self.store.track(
                tenant,
                events,
                now,
                enriched_events(tenant, [w.proto for w in waiting], events, now, self.event_partitions),
                make_id=time_ordered_ids(now),
            )
        except BaseException as exc:
            failure = exc if isinstance(exc, Exception) else RuntimeError("the write was cancelled")
            for w in waiting:
                if not w.result.done():
                    w.result.set_exception(failure)
            if not isinstance(exc, Exception):
                raise
            return
        for w, r in zip(waiting, results, strict=True):
            if not w.result.done():  # the caller may have gone; its event is stored all the same
                w.result.set_result(r)
        if not all(r.duplicate for r in results):
            self.notify()
