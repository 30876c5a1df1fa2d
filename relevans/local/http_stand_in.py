"""What the local HTTP stand-ins (the SMS sink, the webhook receiver) share: an aiohttp server on
`host:port` (0 picks a free port, read `port` after `start`), started and stopped safely twice,
usable as `async with`, and the atomic file writes they keep what arrives in."""

from __future__ import annotations

import os
from abc import ABC, abstractmethod
from pathlib import Path
from types import TracebackType
from typing import Self

from aiohttp import web


def write_atomically(path: Path, content: bytes) -> None:
    """`content` at `path`, whole or not at all (a reader never sees half a file)."""
    tmp = path.with_name(f".{path.name}.tmp")
    with tmp.open("wb") as f:
        f.write(content)
    os.replace(tmp, path)


class HttpStandIn(ABC):
    """Subclasses say what they serve (`app`) and where they keep it (`folder`)."""

    def __init__(self, folder: Path, host: str, port: int) -> None:
        self.folder = Path(folder)
        self.host = host
        self.port = port
        self._runner: web.AppRunner | None = None

    @abstractmethod
    def app(self) -> web.Application:
        """The routes this stand-in serves."""

    async def start(self) -> None:
        if self._runner is not None:
            return
        self.folder.mkdir(parents=True, exist_ok=True)
        runner = web.AppRunner(self.app(), access_log=None, shutdown_timeout=1.0)
        await runner.setup()
        await web.TCPSite(runner, self.host, self.port).start()
        self._runner = runner
        self.port = runner.addresses[0][1]

    async def stop(self) -> None:
        runner, self._runner = self._runner, None
        if runner is not None:
            await runner.cleanup()

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.stop()
