"""ClockDrivenWorker (relevans/kit/clock_worker.py) on a ManualClock: it sleeps until the next due
time on the clock, wakes early when told, runs again at once after a full batch and keeps going
after a failed round. The poll interval is an hour of real time, so only what each test does can
end a wait."""

from __future__ import annotations

import asyncio
from datetime import datetime, timedelta

import pytest

from relevans.kit.clock import ManualClock
from relevans.kit.clock_worker import ClockDrivenWorker

HOUR_S = 3600.0


class Schedule(ClockDrivenWorker):
    """Does the due times of `times` that the clock has reached, one per round (a batch of one)."""

    def __init__(self, clock: ManualClock, times: list[datetime], *, fail_once: bool = False) -> None:
        super().__init__(clock, poll_interval=HOUR_S, error_pause=0.0)
        self.times = sorted(times)
        self.done: list[datetime] = []
        self.rounds = 0
        self.fail_once = fail_once
        self.progress = asyncio.Event()

    async def round(self) -> bool:
        self.rounds += 1
        self.progress.set()
        if self.fail_once:
            self.fail_once = False
            raise RuntimeError("the database went away")
        due = [t for t in self.times if t <= self.clock.now()]
        if not due:
            return False
        self.times.remove(due[0])
        self.done.append(due[0])
        return len(due) > 1

    async def next_due(self) -> datetime | None:
        return self.times[0] if self.times else None

    async def settled(self, rounds: int) -> None:
        """Until at least `rounds` rounds have run and the worker waits again."""
        while self.rounds < rounds:
            self.progress.clear()
            await asyncio.wait_for(self.progress.wait(), timeout=10)
        for _ in range(5):
            await asyncio.sleep(0)


@pytest.fixture
def clock() -> ManualClock:
    return ManualClock()


def start(worker: Schedule, stop: asyncio.Event) -> asyncio.Task[None]:
    return asyncio.create_task(worker.run(stop))


async def test_it_sleeps_until_the_next_due_time_on_the_clock(clock: ManualClock) -> None:
    w = Schedule(clock, [clock.now() + timedelta(minutes=10)])
    stop = asyncio.Event()
    task = start(w, stop)
    await w.settled(1)
    await clock.advance(timedelta(minutes=9))
    await w.settled(1)
    assert (w.rounds, w.done) == (1, [])
    await clock.advance(timedelta(minutes=1))
    await w.settled(2)
    assert w.done == [clock.now()]
    stop.set()
    await asyncio.wait_for(task, timeout=10)


async def test_wake_runs_a_round_at_once(clock: ManualClock) -> None:
    w = Schedule(clock, [])
    stop = asyncio.Event()
    task = start(w, stop)
    await w.settled(1)
    w.times.append(clock.now())  # scheduled by this process, already due
    w.wake()
    await w.settled(2)
    assert w.done == [clock.now()]
    stop.set()
    await asyncio.wait_for(task, timeout=10)


async def test_a_full_batch_runs_again_without_waiting(clock: ManualClock) -> None:
    w = Schedule(clock, [clock.now() - timedelta(seconds=s) for s in range(3)])
    stop = asyncio.Event()
    task = start(w, stop)
    await w.settled(3)
    assert (w.rounds, len(w.done), w.times) == (3, 3, [])
    stop.set()
    await asyncio.wait_for(task, timeout=10)


async def test_a_failed_round_is_tried_again(clock: ManualClock) -> None:
    w = Schedule(clock, [clock.now()], fail_once=True)
    stop = asyncio.Event()
    task = start(w, stop)
    await w.settled(2)
    assert w.done == [clock.now()]
    stop.set()
    await asyncio.wait_for(task, timeout=10)


async def test_stop_ends_the_wait_with_nothing_due(clock: ManualClock) -> None:
    w = Schedule(clock, [])
    stop = asyncio.Event()
    task = start(w, stop)
    await w.settled(1)
    stop.set()
    await asyncio.wait_for(task, timeout=10)
    assert w.rounds == 1
