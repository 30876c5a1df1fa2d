"""Keeps `relevans up`'s services running: a service that dies is started again, the others untouched.

Each restart waits a delay that doubles with every exit in a row (1 s, 2 s, 4 s … at most 30 s), so
a service that cannot start does not spin; a run that lasted `healthy_after` seconds counts as
healthy and the next exit waits the first delay again. Every exit is said with its status.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass

Spawn = Callable[[str], Awaitable[asyncio.subprocess.Process]]
Ready = Callable[[str, asyncio.subprocess.Process], Awaitable[None]]


@dataclass(frozen=True)
class Backoff:
    first: float = 1.0
    longest: float = 30.0
    healthy_after: float = 60.0

    def delay(self, exits_in_a_row: int) -> float:
        """Seconds to wait before restart number `exits_in_a_row` (1 for the first)."""
        return float(min(self.first * 2 ** max(exits_in_a_row - 1, 0), self.longest))


def describe_exit(returncode: int) -> str:
    """`exit status 1` or `killed by SIGKILL`."""
    if returncode < 0:
        try:
            return f"killed by {signal.Signals(-returncode).name}"
        except ValueError:
            return f"killed by signal {-returncode}"
    return f"exit status {returncode}"


class Supervisor:
    """The services' current processes, and a watcher per service that restarts it when it exits."""

    def __init__(
        self,
        spawn: Spawn,
        ready: Ready,
        say: Callable[[str], None],
        *,
        backoff: Backoff = Backoff(),
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.spawn = spawn
        self.ready = ready
        self.say = say
        self.backoff = backoff
        self.sleep = sleep
        self.clock = clock
        self.children: dict[str, asyncio.subprocess.Process] = {}
        self.restarts: dict[str, int] = {}

    async def start(self, services: Iterable[str]) -> None:
        """Starts each service and waits until it serves; a failure raises (nothing is restarted yet)."""
        for service in services:
            self.children[service] = await self.spawn(service)
            self.restarts[service] = 0
        for service, child in self.children.items():
            await self.ready(service, child)

    async def run_until(self, stop: asyncio.Event) -> None:
        """Restarts services that exit until `stop` is set (Ctrl-C); then stops watching, leaving the
        processes to the caller's shutdown."""
        watchers = [asyncio.create_task(self._watch(service, stop)) for service in self.children]
        try:
            await stop.wait()
        finally:
            for watcher in watchers:
                watcher.cancel()
            await asyncio.gather(*watchers, return_exceptions=True)

    async def _watch(self, service: str, stop: asyncio.Event) -> None:
        exits_in_a_row = 0
        while not stop.is_set():
            child = self.children[service]
            started = self.clock()
            returncode = await child.wait()
            if stop.is_set():
                return
            exits_in_a_row = 1 if self.clock() - started >= self.backoff.healthy_after else exits_in_a_row + 1
            delay = self.backoff.delay(exits_in_a_row)
            self.say(
                f"{service} (pid {child.pid}) exited: {describe_exit(returncode)}; restarting in {delay:g} s"
            )
            await self.sleep(delay)
            self.children[service] = await self.spawn(service)
            self.restarts[service] += 1
            with contextlib.suppress(RuntimeError):
                await self.ready(service, self.children[service])
                self.say(f"{service} restarted (pid {self.children[service].pid}) and serving")
