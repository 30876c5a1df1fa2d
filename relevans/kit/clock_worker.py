"""A worker that does, round after round, what has fallen due on the injected clock (trigger's
timers, delivery's retries).

Between rounds it waits for the first of: the next due time on the clock (`next_due`; a
ManualClock reaches it only when a test moves it), `wake()` (this process just scheduled
something), `poll_interval` seconds of real time (for what other processes scheduled, which
nothing here hears of) or the stop event. A round that raises is logged and tried again after
`error_pause` real seconds.
"""

from __future__ import annotations

import asyncio
from abc import ABC, abstractmethod
from collections.abc import Coroutine
from datetime import datetime
from typing import Any

import structlog

from relevans.kit.clock import Clock

log = structlog.get_logger(__name__)

ERROR_PAUSE_S = 1.0


class ClockDrivenWorker(ABC):
    """Subclasses say what a round does (`round`) and, if they know it, when the next thing falls
    due (`next_due`). `woken` lets another object own the event `wake` sets."""

    def __init__(
        self,
        clock: Clock,
        *,
        poll_interval: float,
        error_pause: float = ERROR_PAUSE_S,
        woken: asyncio.Event | None = None,
    ) -> None:
        self.clock = clock
        self.poll_interval = poll_interval
        self.error_pause = error_pause
        self._woken = woken if woken is not None else asyncio.Event()

    def wake(self) -> None:
        """Run a round now: something became due, or will be sooner than the worker thinks."""
        self._woken.set()

    @abstractmethod
    async def round(self) -> bool:
        """Do what is due now; return whether more may be due at once (a full batch)."""

    async def next_due(self) -> datetime | None:
        """When the next thing falls due on the clock; None when unknown (then only a wake, the poll
        interval or the stop event ends the wait)."""
        return None

    async def run(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            self._woken.clear()  # a wake from here on ends the wait below
            try:
                if await self.round():
                    continue
                due = await self.next_due()
            except Exception:
                if stop.is_set():
                    break
                log.exception("round failed; trying again", worker=type(self).__name__)
                await first_of(self.error_pause, stop.wait())
                continue
            waits: list[Coroutine[Any, Any, object]] = [stop.wait(), self._woken.wait()]
            if due is not None:
                waits.append(self.clock.sleep((due - self.clock.now()).total_seconds()))
            await first_of(self.poll_interval, *waits)


async def first_of(seconds: float, *waits: Coroutine[Any, Any, object]) -> None:
    """Until one of `waits` is done or `seconds` have passed (real time)."""
    tasks = [asyncio.ensure_future(w) for w in waits]
    try:
        await asyncio.wait(tasks, timeout=seconds, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for t in tasks:
            t.cancel()
